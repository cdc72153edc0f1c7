// The message list: messages in seq order above the posts still being sent,
// grouped by author and day, mentions of this page's user highlighted, the
// reader's place kept while things come in above or below, the "new
// messages" button and the "New" line above the first unread message. It
// also remembers which seqs were received, and says which are in view. User
// text is only ever set with textContent.

// A message continues its author's group within this long of the previous one.
const GROUP_GAP_MS = 5 * 60 * 1000;
const NEAR_BOTTOM_PX = 40;
// The "New" line is scrolled to this far below the top of the list.
const NEW_LINE_MARGIN_PX = 24;

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

// "@name", not inside a word or an e-mail address, with Django's username
// characters but "@": the server's rule (MENTION_PATTERN in chat/protocol.py,
// where \w is any letter or digit), so that what is highlighted is what the
// server found.
const MENTION = /(?<![\p{L}\p{N}_@.+-])@([\p{L}\p{N}_.+-]{1,150})/gu;

// Returns `text` as strings and {mention} parts: the "@name" tokens that
// name one of `names` (the message's `mentions`). As on the server, "@bob."
// names "bob." if there is such a user, else "bob".
export function mentionParts(text, names) {
  if (!Array.isArray(names) || !names.length) return [text];
  const wanted = new Set(names);
  const parts = [];
  let from = 0;
  for (const found of text.matchAll(MENTION)) {
    const token = found[1];
    const name = wanted.has(token) ? token : token.replace(/[.+-]+$/, "");
    if (!name || !wanted.has(name)) continue;
    if (found.index > from) parts.push(text.slice(from, found.index));
    parts.push({ mention: name });
    from = found.index + 1 + name.length;
  }
  if (from < text.length) parts.push(text.slice(from));
  return parts;
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
  const newLine = document.createElement("li"); // "New", above the first unread
  newLine.className = "new-line";
  newLine.setAttribute("role", "separator");
  newLine.setAttribute("aria-label", "New messages");
  newLine.textContent = "New";

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
    const mentions = Array.isArray(message.mentions) ? message.mentions : [];
    item.className = "message" + (message.user === me ? " own" : "");
    // Only someone else's mention of me is news; the server never notifies
    // a user of their own.
    if (message.user !== me && mentions.includes(me)) item.classList.add("mention-me");
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
    for (const part of mentionParts(message.message, mentions)) {
      if (typeof part === "string") {
        body.append(document.createTextNode(part));
        continue;
      }
      const mention = document.createElement("span");
      mention.className = "mention" + (part.mention === me ? " me" : "");
      mention.textContent = "@" + part.mention;
      body.append(mention);
    }
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

  // The stored messages shown, newest first.
  function* newestFirst() {
    const items = list.querySelectorAll("li.message[data-seq]");
    for (let i = items.length - 1; i >= 0; i--) yield items[i];
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
    // them on the "new messages" button.
    arrived(added, ownEcho) {
      if (ownEcho) scrollToBottom();
      else if (added.length && !atBottom()) {
        newBelow += added.length;
        renderNewBelow();
      }
    },
    // Returns the highest seq whose message has its end in view (a message
    // taller than the list counts once its last line was on screen), or 0.
    highestInView() {
      const view = list.getBoundingClientRect();
      for (const item of newestFirst()) {
        const box = item.getBoundingClientRect();
        if (box.top >= view.bottom) continue; // below the view
        if (box.bottom <= view.top) return 0; // everything further up is too
        if (box.bottom <= view.bottom + 1) return Number(item.dataset.seq);
      }
      return 0;
    },
    // Returns the messages from others after seq `floor` that are shown:
    // {unread, mentions, first} (first: the oldest one's seq, or 0).
    othersAfter(floor) {
      let unread = 0;
      let mentions = 0;
      let first = 0;
      for (const item of newestFirst()) {
        const seq = Number(item.dataset.seq);
        if (seq <= floor) break;
        if (item.dataset.user === me) continue;
        unread += 1;
        if (item.classList.contains("mention-me")) mentions += 1;
        first = seq;
      }
      return { unread, mentions, first };
    },
    // Puts the "New" line just above message `seq`, or takes it away (0).
    setNewLine(seq) {
      const item = seq ? list.querySelector('li.message[data-seq="' + Number(seq) + '"]') : null;
      if (item ? item.previousElementSibling === newLine : !newLine.isConnected) return;
      keepScroll(() => {
        const after = nextMessage(newLine.isConnected ? newLine : null);
        newLine.remove();
        if (item) list.insertBefore(newLine, item);
        // The message after the line heads its group, with its author.
        regroup(after);
        regroup(item);
      });
    },
    hasNewLine: () => newLine.isConnected,
    // Scrolls the "New" line into view when it is above the view: the place
    // to start reading on entry. A line that is already in view (or below
    // the view) stays where it is, so a short unread run still shows the
    // end of the conversation.
    revealNewLine() {
      if (!newLine.isConnected) return;
      const top = newLine.getBoundingClientRect().top - list.getBoundingClientRect().top;
      if (top < 0) list.scrollTop += top - NEW_LINE_MARGIN_PX;
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
