// This room's read position: how far the user has read, as the server knows
// it (the `welcome`'s read_seq, and `read` events from any of their tabs and
// devices), moved on by what this page shows while it is visible and focused
// and sent back as `read` frames, at most about once a second. It also keeps
// the "New" line above the first message that was unread on entry, and
// counts the messages (and mentions) after the position.

// The server takes about one `read` a second from a socket; more would only
// be coalesced there.
const SEND_EVERY_MS = 1000;

// Returns true when the user can be reading this page: a message in view of a
// background tab, or of a window behind another one, was not seen.
function canRead() {
  return document.visibilityState === "visible" && document.hasFocus();
}

// timeline: the message list (what is shown, and in view). list: its element.
// send(frame) -> bool: the connection's. hasMore(): older messages exist
// before the first one shown. roomEl: gets data-read-seq, the position, for
// tests to wait on. onChange(): the position or the counts changed.
export function createReadState({ timeline, list, send, hasMore, roomEl, onChange }) {
  let entered = false; // the first welcome came
  let settled = false; // the welcome's messages are shown and scrolled to
  let serverSeq = 0; // the position the server told us (welcome, read events)
  let seen = 0; // the highest seq seen on this page
  let sentSeq = 0; // the highest seq sent on this socket
  let lastSentAt = -Infinity;
  let timer = null;
  // On a first visit (read_seq null) what was there before is not news: only
  // what comes after the welcome's last_seq counts as unread.
  let quietUpTo = 0;
  // The read position on entry: the "New" line marks what came after it,
  // until another tab or device reads past it.
  let lineAfter = null;
  // On entry the view follows the line up while older pages load, until it
  // reaches the first unread message or the reader scrolls; not after, or
  // the view would jump back up to it as the conversation goes on below.
  let revealing = false;
  let checkQueued = false;

  const position = () => Math.max(serverSeq, seen);

  function counts() {
    const floor = Math.max(position(), quietUpTo);
    const { unread, mentions } = timeline.othersAfter(floor);
    // Unread messages older than the oldest one shown are not loaded yet:
    // counted (some may be the user's own, or deleted) until they are.
    const oldest = timeline.oldestSeq();
    const unloaded = hasMore() && oldest > floor + 1 ? oldest - floor - 1 : 0;
    return { unread: unread + unloaded, mentions };
  }

  function changed() {
    if (!entered) return;
    roomEl.dataset.readSeq = String(position());
    onChange();
  }

  function placeLine() {
    if (lineAfter === null) return;
    timeline.setNewLine(timeline.othersAfter(lineAfter).first);
  }

  function flush() {
    clearTimeout(timer);
    timer = null;
    if (seen <= Math.max(serverSeq, sentSeq)) return;
    // Not connected: the next socket's welcome sends it.
    if (!send({ type: "read", seq: seen })) return;
    sentSeq = seen;
    lastSentAt = Date.now();
  }

  function schedule(now) {
    if (seen <= Math.max(serverSeq, sentSeq)) return;
    const wait = now ? 0 : lastSentAt + SEND_EVERY_MS - Date.now();
    if (wait <= 0) flush();
    else if (!timer) timer = setTimeout(flush, wait);
  }

  // True once the first message after the entry's position is shown (or
  // nothing older is left to load).
  function firstUnreadLoaded() {
    return !hasMore() || timeline.oldestSeq() <= lineAfter + 1;
  }

  // True while the view waits, on entry, for the first unread message to be
  // loaded: what is in view then lies after unread ones, and the position
  // is a high-water mark, so taking it as seen would skip those.
  function waitingForFirstUnread() {
    return revealing && timeline.hasNewLine() && !firstUnreadLoaded();
  }

  // Takes what is in view as seen, if the user can see it. now: send at
  // once (the user just came back to the page), not within the second.
  function check(now = false) {
    if (!settled || !canRead() || waitingForFirstUnread()) return;
    const seq = timeline.highestInView();
    if (seq > position()) {
      seen = seq;
      changed();
    }
    schedule(now);
  }

  // Scrolling fires many times a frame; one look per frame is enough.
  list.addEventListener("scroll", () => {
    if (checkQueued) return;
    checkQueued = true;
    requestAnimationFrame(() => {
      checkQueued = false;
      check();
    });
  });
  // The reader moves the view: it no longer follows the line.
  for (const type of ["wheel", "touchstart", "keydown", "pointerdown"]) {
    list.addEventListener(type, () => (revealing = false), { passive: true });
  }
  window.addEventListener("resize", () => check());
  window.addEventListener("focus", () => check(true));
  document.addEventListener("visibilitychange", () => check(true));

  return {
    position,
    counts,
    // Called with each `welcome`, before its messages are shown.
    welcome(frame) {
      const readSeq = Number.isInteger(frame.read_seq) ? frame.read_seq : null;
      if (!entered) {
        entered = true;
        if (readSeq === null) quietUpTo = Number(frame.last_seq) || 0;
        else {
          lineAfter = readSeq;
          revealing = true;
        }
      }
      if (readSeq !== null) serverSeq = Math.max(serverSeq, readSeq);
      // A new socket: what the last one sent may never have arrived, and
      // the welcome says what did.
      sentSeq = 0;
      settled = false;
    },
    // Called once the welcome's messages are shown and the view is where
    // the reader starts: from now on, what is in view is seen.
    settle() {
      if (revealing) {
        // Nothing was unread on entry: what comes while the page is open
        // is read as it comes, and gets no line.
        if (!timeline.hasNewLine()) lineAfter = null;
        if (lineAfter === null || firstUnreadLoaded()) revealing = false;
      }
      settled = true;
      changed();
      check(true);
    },
    // Called after messages were shown or taken away.
    shown() {
      placeLine();
      if (revealing) {
        timeline.revealNewLine();
        if (firstUnreadLoaded()) revealing = false;
      }
      changed();
      check();
    },
    check,
    // Called with a `read` event for this room: this page's own (the
    // server's answer) or another tab's or device's.
    remote(seq) {
      if (!Number.isInteger(seq) || seq <= serverSeq) return;
      serverSeq = seq;
      // Read elsewhere past the line: it no longer says what is new here.
      if (lineAfter !== null && seq > sentSeq && seq >= timeline.othersAfter(lineAfter).first) {
        lineAfter = null;
        revealing = false;
        timeline.setNewLine(0);
      }
      changed();
    },
  };
}
