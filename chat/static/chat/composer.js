// The message box: Enter sends, Shift+Enter starts a line, text over the
// server's length limit stays to be cut. The text stays in the box whatever
// happens to the connection: only sending stops.

// At most this tall, then the box scrolls.
const MAX_HEIGHT_PX = 200;

// maxLength: the server's CHAT_MAX_MESSAGE_LENGTH (data-max-length).
// onPost(text): a post to send. onKeystroke(): the text changed.
export function createComposer({ form, input, sendButton, errorEl, maxLength, onPost, onKeystroke }) {
  let disabled = false;

  function autosize() {
    input.style.height = "auto";
    input.style.height = Math.min(input.scrollHeight + 2, MAX_HEIGHT_PX) + "px";
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (disabled) return;
    const text = input.value.trim();
    if (!text) return;
    // Code points, as the server counts them; the text stays to be cut.
    const length = Array.from(text).length;
    if (length > maxLength) {
      errorEl.textContent =
        "Your message is " + length + " characters long; the limit is " + maxLength + ".";
      return;
    }
    onPost(text);
    input.value = "";
    autosize();
    errorEl.textContent = "";
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  input.addEventListener("input", () => {
    autosize();
    onKeystroke();
  });

  return {
    hasText: () => Boolean(input.value.trim()),
    focus: () => input.focus(),
    // Puts a post that was not sent back, before anything typed since.
    giveBack(text) {
      input.value = input.value ? text + "\n" + input.value : text;
      autosize();
    },
    showError(text) {
      errorEl.textContent = text;
    },
    // Clears the error shown, if it starts with `prefix`.
    clearError(prefix) {
      if (errorEl.textContent.startsWith(prefix)) errorEl.textContent = "";
    },
    // Stops (or allows again) sending; the text stays, to be copied.
    setDisabled(off) {
      disabled = off;
      input.readOnly = off;
      input.setAttribute("aria-disabled", String(off));
      sendButton.disabled = off;
    },
  };
}
