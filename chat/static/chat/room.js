// The room page's entry. It reads the page's data-* attributes (the room, the
// user and the server's limits, rendered from settings) and wires the parts
// together: the connection hands it each frame's events, and it passes each
// event to the part that owns what it changes.
import { createBacklog } from "./backlog.js";
import { createComposer } from "./composer.js";
import { createConnection } from "./connection.js";
import { positiveNumber } from "./limits.js";
import { createMembers, namesSummary } from "./members.js";
import { createNotifications } from "./notifications.js";
import { createOutbox } from "./outbox.js";
import { createReadState } from "./readstate.js";
import { createRoomList } from "./roomlist.js";
import { createTimeline } from "./timeline.js";
import { createTyping } from "./typing.js";

const ROOM_CLOSED = "This room is closed";

// "(3) #general · Chat", "(3, @1) #general · Chat": unread messages in all
// the user's rooms, and how many of them mention the user.
function titled(base, { unread, mentions }) {
  if (!unread && !mentions) return base;
  return "(" + unread + (mentions ? ", @" + mentions : "") + ") " + base;
}

// Called with the page's `.room` section.
export function initRoom(roomEl) {
  const me = roomEl.dataset.user;
  const room = roomEl.dataset.room;
  const baseTitle = document.title;
  const byId = (id) => document.getElementById(id);
  const send = (frame) => connection.send(frame);
  const isReady = () => connection.isReady();
  let readOnly = false; // a moderator closed the room

  const timeline = createTimeline({
    me,
    list: byId("messages"),
    historyEdge: byId("history-edge"),
    newMessagesButton: byId("new-messages"),
    onJumped: () => composer.focus(),
  });
  const backlog = createBacklog({
    timeline,
    send,
    isReady,
    historyMax: positiveNumber(roomEl, "historyMax"),
    list: byId("messages"),
    loadOlderButton: byId("load-older"),
    historyStart: byId("history-start"),
  });
  const members = createMembers({
    me,
    send,
    isReady,
    listEl: byId("members"),
    countEl: byId("member-count"),
    moreButton: byId("members-more"),
  });
  const composer = createComposer({
    form: byId("composer"),
    input: byId("message-input"),
    sendButton: byId("send"),
    errorEl: byId("composer-error"),
    maxLength: positiveNumber(roomEl, "maxLength"),
    onPost(text) {
      outbox.post(text);
      typing.posted();
    },
    onKeystroke: () => typing.keystroke(),
  });
  const readState = createReadState({
    timeline,
    list: byId("messages"),
    send,
    hasMore: () => backlog.hasMore(),
    roomEl,
    onChange: () => roomList.setHere(readState.counts()),
  });
  const roomList = createRoomList({
    current: room,
    listEl: byId("room-list"),
    panel: byId("room-list-panel"),
    toggle: byId("room-list-toggle"),
    totalEl: byId("room-list-total"),
    url: roomEl.dataset.roomsUrl,
    // Read each time: a test may shorten it.
    intervalMs: () => positiveNumber(roomEl, "roomsRefreshMs"),
    onTotals: (totals) => {
      document.title = titled(baseTitle, totals);
    },
  });
  let mentionsHandled = 0;
  const notifications = createNotifications({
    button: byId("notify-enable"),
    current: room,
    roomUrl: (slug) =>
      roomList.urlOf(slug) || roomEl.dataset.lobbyUrl + encodeURIComponent(slug) + "/",
    roomTitle: (slug) => roomList.titleOf(slug),
    isRead: (slug, seq) =>
      (slug === room ? readState.position() : roomList.readUpTo(slug)) >= seq,
    onDecided() {
      mentionsHandled += 1;
      roomEl.dataset.mentionsHandled = String(mentionsHandled);
    },
  });
  const typing = createTyping({
    me,
    el: byId("typing"),
    intervalMs: positiveNumber(roomEl, "typingIntervalMs"),
    send,
    hasText: composer.hasText,
  });
  const outbox = createOutbox({
    me,
    send,
    onQueued(clientId, text) {
      timeline.addPending(clientId, text, isReady() ? "sending…" : "waiting for the connection…");
    },
    onStatus: (clientId, status) => timeline.setPendingStatus(clientId, status),
    onDone: (clientId) => timeline.removePending(clientId),
    onGiveBack(clientId, text) {
      // The server refused (or will never get) this post: its text goes back
      // into the box.
      timeline.removePending(clientId);
      composer.giveBack(text);
    },
  });
  // The room's deletions seen, by number: a resume sends the last of the
  // unbroken run, and its welcome lists the deletions missed since, so one
  // lost `deleted` event (Redis away, the page offline) is not lost for good.
  let deletionsSeen = null;
  const deletionsAhead = new Set();
  function onDeleted(frame) {
    timeline.deleted(frame);
    if (deletionsSeen === null || frame.deletion <= deletionsSeen) return;
    deletionsAhead.add(frame.deletion);
    while (deletionsAhead.delete(deletionsSeen + 1)) deletionsSeen += 1;
  }

  const connection = createConnection({
    room,
    since: timeline.lastSeq,
    deletions: () => deletionsSeen,
    statusText: byId("status-text"),
    reconnectNow: byId("reconnect-now"),
    onEvents: handleAll,
    onLost() {
      backlog.forget();
      members.forget();
      outbox.waiting();
    },
    onStopped() {
      outbox.giveBackAll();
      typing.stopAll();
    },
    onStateChange: updateComposer,
  });

  function updateComposer() {
    composer.setDisabled(readOnly || connection.isStopped());
  }

  function setReadOnly(closed) {
    readOnly = closed;
    byId("room-closed").hidden = !closed;
    roomEl.classList.toggle("closed", closed);
    if (!closed) composer.clearError(ROOM_CLOSED);
    updateComposer();
  }

  // The events of one frame, in order. A run of messages is shown in one go
  // (one scroll adjustment, one gap check for the whole run).
  function handleAll(events, isCurrent) {
    let run = [];
    const flush = () => {
      if (run.length) onMessages(run, true);
      run = [];
    };
    for (const event of events) {
      if (!isCurrent()) return;
      if (event && event.type === "message") {
        run.push(event);
        continue;
      }
      flush();
      try {
        handle(event);
      } catch (err) {
        console.error("could not handle", event, err);
      }
    }
    if (isCurrent()) flush();
  }

  function handle(frame) {
    if (!frame || typeof frame !== "object") {
      console.error("unexpected frame", frame);
      return;
    }
    switch (frame.type) {
      case "welcome":
        return onWelcome(frame);
      case "message":
        return onMessages([frame], true);
      case "history":
        backlog.history(frame);
        return readState.shown();
      case "presence":
        return onPresence(frame);
      case "members":
        return members.page(frame);
      case "typing":
        return typing.show(frame.user);
      case "deleted":
        onDeleted(frame);
        return readState.shown();
      case "read":
        if (frame.room === room) return readState.remote(frame.seq);
        return roomList.read(frame.room, frame.seq);
      case "mention":
        if (frame.room !== room) roomList.mention(frame);
        return notifications.mention(frame);
      case "room":
        return setReadOnly(Boolean(frame.closed));
      case "push":
        // From the push API: the page only passes it on to whoever listens.
        return document.dispatchEvent(new CustomEvent("chat:push", { detail: frame }));
      case "error":
        return onError(frame);
      default:
        console.warn("unknown frame", frame.type);
    }
  }

  function onWelcome(frame) {
    const resumed = timeline.lastSeq() > 0;
    connection.welcomed();
    for (const gone of frame.deleted || []) timeline.deleted(gone);
    deletionsSeen = frame.deletions;
    deletionsAhead.clear();
    members.welcome(frame);
    setReadOnly(Boolean(frame.closed));
    if (!resumed) backlog.setHasMore(frame.has_more);
    readState.welcome(frame);
    // After a resume that missed too much, the server sends the latest page
    // instead, and the gap check in onMessages asks for the rest.
    onMessages(frame.messages, resumed);
    if (resumed) backlog.refill();
    else {
      // At the end of the conversation, or up at the "New" line when what
      // came since the last visit does not fit.
      timeline.scrollToBottom();
      timeline.revealNewLine();
    }
    readState.settle();
    // Whatever was typed while offline goes out now, with its original
    // client_id, so the server stores it once even if an earlier try got
    // through; the echoes above have already taken the stored ones out.
    outbox.resend();
    backlog.maybeLoadOlder();
  }

  function onMessages(messages, live) {
    let ownEcho = false;
    const added = timeline.keepScroll(() =>
      messages.filter((message) => {
        typing.stop(message.user);
        if (outbox.acknowledge(message)) ownEcho = true;
        return timeline.render(message);
      }),
    );
    backlog.checkGaps(added);
    if (live) timeline.arrived(added, ownEcho);
    readState.shown();
  }

  function onPresence(frame) {
    (Array.isArray(frame.leaves) ? frame.leaves : []).forEach((name) => typing.stop(name));
    const { joined, left } = members.presence(frame);
    if (joined.length) timeline.notice(namesSummary(joined) + " joined");
    if (left.length) timeline.notice(namesSummary(left) + " left");
  }

  function onError(frame) {
    if (frame.ref) outbox.refused(frame.ref);
    if (frame.code === "room_closed") setReadOnly(true);
    else if (!frame.ref) {
      // A refused request (history, members): let it be asked again later.
      backlog.forget();
      members.forget();
    }
    composer.showError(
      frame.code === "room_closed" ? ROOM_CLOSED + ": your message was not sent." : frame.detail,
    );
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) connection.reconnectSoon();
  });

  connection.start();
  roomList.start();
}

const roomEl = document.querySelector(".room[data-room]");
if (roomEl) initRoom(roomEl);
