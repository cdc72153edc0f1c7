// The message list: messages in seq order above the posts still being sent,
// grouped by author and day, the reader's place kept while things come in
// above or below, the "new messages" marker and the unread count in the tab's
// title. It also remembers which seqs were received. User text is only ever
// set with textContent.

// A message continues its author's group within this long of the previous one.
const GROUP_GAP_MS = 5 * 60 * 1000;
const NEAR_BOTTOM_PX = 40;

function dayKey(date) {
  return date.getFullYear() + "-" + (date.getMonth() + 1) + "-" + date.getDate();
}

function dayLabel(date) {
  const today = new Date();
  const yesterday = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 1);
  if (dayKey(date) === dayKey(today)) return "Today";
  if (dayKey(date) === dayKey(yesterday)) return "Yesterday";
  return date.toLocaleDateString([], {
    weekday: "long",
    year: "numeric",
    month: "long",
    day: "numeric",
  });
}

function nextMessage(el) {
  let next = el ? el.nextElementSibling : null;
  while (next && !next.classList.contains("message")) next = next.nextElementSibling;
  return next;
}

function previousMessage(el) {
  let prev = el.previousElementSibling;
  while (prev && !prev.classList.contains("message")) prev = prev.previousElementSibling;
  return prev;
}

// A message starts a group (shows its author) unless it directly follows one
// by the same author on the same day within a few minutes; the first message
// of a day carries the day's heading.
function regroup(item) {
  if (!item || !item.classList.contains("message")) return;
  const prev = previousMessage(item);
  const newDay = !prev || prev.dataset.day !== item.dataset.day;
  let divider = item.querySelector(":scope > .day");
  if (newDay && !divider) {
    divider = document.createElement("div");
    divider.className = "day";
    divider.setAttribute("role", "separator");
    item.prepend(divider);
  } else if (!newDay && divider) {
    divider.remove();
  }
  if (divider) divider.textContent = dayLabel(new Date(Number(item.dataset.time)));
  const continued =
    !newDay &&
    item.previousElementSibling === prev &&
    prev.dataset.user === item.dataset.user &&
    prev.classList.contains("pending") === item.classList.contains("pending") &&
    Number(item.dataset.time) - Number(prev.dataset.time) < GROUP_GAP_MS;
  item.classList.toggle("continued", continued);
}

// me: this page's user. list: the <ol> of messages; historyEdge: its first
// item (the backlog's controls). newMessagesButton: the "new messages" marker;
// onJumped(): the reader followed it to the bottom.
export function createTimeline({ me, list, historyEdge, newMessagesButton, onJumped }) {
  const seen = new Set(); // seqs received (rendered, or deleted since)
  let lastSeq = 0; // the highest seq received
  let newBelow = 0; // messages that arrived below while scrolled up
  let unread = 0; // messages from others while the tab was hidden
  const baseTitle = document.title;

  function atBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < NEAR_BOTTOM_PX;
  }

  function scrollToBottom() {
    list.scrollTop = list.scrollHeight;
    newBelow = 0;
    renderNewBelow();
  }

  function firstVisible() {
    const top = list.getBoundingClientRect().top;
    for (const item of list.children) {
      if (item !== historyEdge && item.getBoundingClientRect().bottom > top) return item;
    }
    return null;
  }

  // Runs `mutate`, then keeps the view where it was: at the bottom if it was
  // there, else on the same item, so reading older messages is never
  // disturbed by what is added above or below.
  function keepScroll(mutate) {
    const stick = atBottom();
    const anchor = stick ? null : firstVisible();
    const before = anchor ? anchor.getBoundingClientRect().top : 0;
    const result = mutate();
    if (stick) list.scrollTop = list.scrollHeight;
    else if (anchor && anchor.isConnected) {
      list.scrollTop += anchor.getBoundingClientRect().top - before;
    }
    return result;
  }

  function messageItem(message) {
    const date = message.ts ? new Date(message.ts) : new Date();
    const item = document.createElement("li");
    item.className = "message" + (message.user === me ? " own" : "");
    if (message.seq) item.dataset.seq = String(message.seq);
    if (message.id) item.dataset.id = String(message.id);
    item.dataset.user = message.user;
    item.dataset.day = dayKey(date);
    item.dataset.time = String(date.getTime());
    const meta = document.createElement("div");
    meta.className = "meta";
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.user;
    if (message.user === me) {
      const you = document.createElement("span");
      you.className = "you";
      you.textContent = "you";
      author.append(" ", you);
    }
    const time = document.createElement("time");
    time.dateTime = date.toISOString();
    time.textContent = date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    time.title = date.toLocaleString();
    meta.append(author, " ", time);
    const body = document.createElement("div");
    body.className = "body";
    body.dir = "auto"; // right-to-left text reads right to left
    body.textContent = message.message;
    item.append(meta, body);
    return item;
  }

  function firstPending() {
    return list.querySelector("li.message.pending");
  }

  function insert(item) {
    // In seq order, above the messages still being sent.
    const seq = Number(item.dataset.seq);
    let later = null;
    if (seq) {
      for (const el of list.querySelectorAll("li.message[data-seq]")) {
        if (Number(el.dataset.seq) > seq) {
          later = el;
          break;
        }
      }
    }
    list.insertBefore(item, later || firstPending());
    regroup(item);
    regroup(nextMessage(item));
  }

  function removeItem(item) {
    const next = nextMessage(item);
    item.remove();
    regroup(next);
  }

  function pendingItem(clientId) {
    return list.querySelector('li.pending[data-client-id="' + CSS.escape(clientId) + '"]');
  }

  function renderNewBelow() {
    newMessagesButton.hidden = newBelow === 0;
    newMessagesButton.textContent =
      newBelow === 1 ? "1 new message ↓" : newBelow + " new messages ↓";
  }

  function renderTitle() {
    document.title = unread ? "(" + unread + ") " + baseTitle : baseTitle;
  }

  list.addEventListener("scroll", () => {
    if (atBottom() && newBelow) {
      newBelow = 0;
      renderNewBelow();
    }
  });
  newMessagesButton.addEventListener("click", () => {
    scrollToBottom();
    onJumped();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) {
      unread = 0;
      renderTitle();
    }
  });

  return {
    keepScroll,
    scrollToBottom,
    // Returns true when message `seq` was received (shown, or deleted since).
    has: (seq) => seen.has(seq),
    // Records `seq` as received without showing it (it was deleted).
    markSeen(seq) {
      seen.add(seq);
    },
    lastSeq: () => lastSeq,
    // Returns the seq of the oldest message shown, or 0.
    oldestSeq() {
      const first = list.querySelector("li.message[data-seq]");
      return first ? Number(first.dataset.seq) : 0;
    },
    // Shows `message` in its place; returns false for a seq already received.
    // Call inside keepScroll.
    render(message) {
      if (seen.has(message.seq)) return false;
      seen.add(message.seq);
      lastSeq = Math.max(lastSeq, message.seq);
      insert(messageItem(message));
      return true;
    },
    // Called after live messages were rendered: follow them down, or count
    // them on the marker and in the title.
    arrived(added, ownEcho) {
      if (ownEcho) scrollToBottom();
      else if (added.length && !atBottom()) {
        newBelow += added.length;
        renderNewBelow();
      }
      if (document.hidden) {
        unread += added.filter((m) => m.user !== me).length;
        renderTitle();
      }
    },
    // Removes the message a `deleted` event names.
    deleted(frame) {
      if (frame.seq) seen.add(frame.seq); // never ask for it to fill a gap
      const item = list.querySelector('li.message[data-id="' + Number(frame.id) + '"]');
      if (item) keepScroll(() => removeItem(item));
    },
    // Shows a post still being sent, at the bottom, with `status` for its time.
    addPending(clientId, text, status) {
      const item = messageItem({ user: me, message: text, ts: null });
      item.classList.add("pending");
      item.dataset.clientId = clientId;
      item.querySelector("time").textContent = status;
      list.appendChild(item);
      regroup(item);
      scrollToBottom();
    },
    setPendingStatus(clientId, status) {
      const item = pendingItem(clientId);
      if (item) item.querySelector("time").textContent = status;
    },
    // Removes a post being sent (stored, or given back).
    removePending(clientId) {
      const item = pendingItem(clientId);
      if (item) removeItem(item);
    },
    // Shows a line such as "bob joined", above the posts being sent.
    notice(text) {
      keepScroll(() => {
        const item = document.createElement("li");
        item.className = "notice";
        item.textContent = text;
        list.insertBefore(item, firstPending());
        regroup(nextMessage(item));
      });
    },
  };
}
