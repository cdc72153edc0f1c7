// Desktop notifications of mentions. Permission is asked for only when the
// user clicks "Enable notifications": a prompt at page load is refused by
// browsers without a click, and by users. A mention is shown only while this
// page is hidden, and not once another tab or device of the user has read it.

// How long a hidden page waits before it notifies: a tab of the same user
// that shows the room reads the mention within about a second (SEND_EVERY_MS
// in readstate.js), its `read` reaches this page, and the user is already
// looking at it. Every tab of the user gets the `mention`; the notification's
// tag makes them one.
const NOTIFY_AFTER_MS = 2000;

function supported() {
  return typeof window.Notification === "function";
}

// button: "Enable notifications", shown while the browser has not been
// asked. current: this room's slug. roomUrl(slug): a room's page;
// roomTitle(slug): what it is called (#general, @bob).
// isRead(room, seq): a tab or device of the user has read `room` up to `seq`.
// onDecided(): a mention was shown or let go (for tests to wait on).
export function createNotifications({ button, current, roomUrl, roomTitle, isRead, onDecided }) {
  function renderButton() {
    button.hidden = !supported() || Notification.permission !== "default";
  }

  button.addEventListener("click", async () => {
    if (!supported()) return;
    try {
      await Notification.requestPermission();
    } catch (err) {
      console.warn("notification permission request failed", err);
    }
    renderButton();
  });

  function show(frame) {
    const note = new Notification("@" + frame.user + " in " + roomTitle(frame.room), {
      body: frame.message,
      tag: "mention-" + frame.id,
    });
    note.addEventListener("click", () => {
      window.focus();
      if (frame.room !== current) location.assign(roomUrl(frame.room));
      note.close();
    });
  }

  function decide(frame) {
    try {
      if (
        document.hidden &&
        supported() &&
        Notification.permission === "granted" &&
        !isRead(frame.room, frame.seq)
      ) {
        show(frame);
      }
    } finally {
      onDecided();
    }
  }

  renderButton();

  return {
    // Called with a `mention` event (for any of the user's rooms).
    mention(frame) {
      // The user is looking at this page: the room list and the message
      // itself say it.
      if (!document.hidden || !supported() || Notification.permission !== "granted") {
        onDecided();
        return;
      }
      setTimeout(() => decide(frame), NOTIFY_AFTER_MS);
    },
  };
}
