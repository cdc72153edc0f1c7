"""Forms of the chat pages."""

from django import forms
from django.contrib.auth.forms import UserCreationForm

from chat import protocol


class RoomForm(forms.Form):
    name = forms.CharField(
        label="Room name",
        max_length=64,
        help_text="Lower-case letters, digits, - and _; starts with a letter or digit.",
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip().lower()
        if not protocol.is_valid_room_name(name):
            raise forms.ValidationError(
                "Use 1-64 lower-case letters, digits, - or _, starting with a "
                "letter or digit."
            )
        return name


class SignUpForm(UserCreationForm):
    pass
