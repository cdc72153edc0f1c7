// "x is typing", both ways: who is shown as typing (each for a while after
// their last `typing`), and this page's own `typing` frames, at most one per
// the server's interval.

// Sent a little less often than the server's interval allows: timers and the
// network are not exact, and a frame that arrives early is dropped by the
// server's throttle.
const SEND_MARGIN_MS = 500;

// me: this page's user. el: where "x is typing" goes. intervalMs: the
// server's interval (data-typing-interval-ms). send(frame) -> bool: the
// connection's. hasText(): whether the composer holds something to send.
export function createTyping({ me, el, intervalMs, send, hasText }) {
  const sendEveryMs = intervalMs + SEND_MARGIN_MS;
  // A typist's next frame comes within sendEveryMs: shown for twice the
  // interval, a name stays on while they keep typing.
  const showMs = 2 * intervalMs;
  const typers = new Map(); // user -> timer
  let lastSent = 0;
  let timer = null; // a throttled keystroke, sent when the interval ends

  function render() {
    const names = Array.from(typers.keys()).sort();
    el.textContent = names.length
      ? names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…")
      : "";
  }

  function stop(user) {
    if (typers.has(user)) {
      clearTimeout(typers.get(user));
      typers.delete(user);
      render();
    }
  }

  function sendNow() {
    timer = null;
    if (hasText() && send({ type: "typing" })) lastSent = Date.now();
  }

  return {
    // Called with a `typing` event.
    show(user) {
      if (user === me) return;
      stop(user);
      typers.set(user, setTimeout(() => stop(user), showMs));
      render();
    },
    // `user` is no longer typing (they posted, or left).
    stop,
    stopAll() {
      Array.from(typers.keys()).forEach(stop);
    },
    // Called on every keystroke in the composer. At most one `typing` per
    // interval (the server drops more), and a throttled keystroke is sent
    // when the interval ends, so that typing right after a post still shows.
    keystroke() {
      if (!hasText() || timer) return;
      const wait = lastSent + sendEveryMs - Date.now();
      if (wait <= 0) sendNow();
      else timer = setTimeout(sendNow, wait);
    },
    // Called when a post went out: a pending `typing` is no longer news.
    posted() {
      clearTimeout(timer);
      timer = null;
    },
  };
}
