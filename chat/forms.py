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
    private = forms.BooleanField(
        label="Private: only people I add can see it",
        required=False,
        help_text="Applies when the room is new.",
    )

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip().lower()
        if not protocol.is_valid_room_name(name):
            raise forms.ValidationError(
                "Use 1-64 lower-case letters, digits, - or _, starting with a "
                "letter or digit."
            )
        return name


class MemberForm(forms.Form):
    username = forms.CharField(label="Add a member", max_length=150)


class SignUpForm(UserCreationForm):
    pass
