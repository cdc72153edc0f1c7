// The room page: one WebSocket to /ws/chat/<room>/, reconnecting with backoff and
// resuming with ?since=<last seq>. User text is only ever set with textContent.
(function () {
  "use strict";

  const roomEl = document.querySelector(".room");
  if (!roomEl) return;

  const ROOM = roomEl.dataset.room;
  const ME = roomEl.dataset.user;
  const NO_RETRY_CODES = new Set([4401, 4403, 4404, 4429]);
  const CLOSE_REASONS = {
    4401: "You are signed out. Log in again to chat.",
    4403: "You are not allowed in this room.",
    4404: "This room does not exist.",
    4429: "Too many open chat tabs. Close one and reload.",
  };
  const BACKOFF_BASE_MS = 500;
  const BACKOFF_CAP_MS = 60000;
  const STABLE_AFTER_MS = 10000;
  const TYPING_SEND_MS = 2000;
  const TYPING_SHOW_MS = 4000;

  const list = document.getElementById("messages");
  const membersEl = document.getElementById("members");
  const memberCount = document.getElementById("member-count");
  const statusEl = document.getElementById("status");
  const typingEl = document.getElementById("typing");
  const form = document.getElementById("composer");
  const input = document.getElementById("message-input");
  const errorEl = document.getElementById("composer-error");

  let socket = null;
  let attempt = 0;
  let openedAt = 0;
  let lastSeq = 0; // highest seq shown
  const shown = new Set(); // seqs already rendered
  const outbox = new Map(); // client_id -> text, until the server echoes it
  const members = new Set();
  const typers = new Map(); // user -> timer
  let lastTypingSent = 0;
  let reconnectTimer = null;
  let reconnectTicker = null;

  // ------------------------------------------------------------------
  // Connection
  // ------------------------------------------------------------------

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = lastSeq > 0 ? "?since=" + lastSeq : "";
    return scheme + "//" + location.host + "/ws/chat/" + encodeURIComponent(ROOM) + "/" + query;
  }

  function setState(state, text) {
    document.body.dataset.connection = state;
    statusEl.textContent = text;
  }

  function connect() {
    clearTimeout(reconnectTimer);
    clearInterval(reconnectTicker);
    reconnectTimer = null;
    setState(attempt === 0 ? "connecting" : "reconnecting", "Connecting…");
    socket = new WebSocket(socketUrl());
    socket.addEventListener("open", () => {
      openedAt = Date.now();
    });
    socket.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch (err) {
        console.error("unreadable frame", event.data);
        return;
      }
      handle(frame);
    });
    socket.addEventListener("close", (event) => {
      socket = null;
      if (NO_RETRY_CODES.has(event.code)) {
        setState("offline", CLOSE_REASONS[event.code]);
        return;
      }
      if (openedAt && Date.now() - openedAt >= STABLE_AFTER_MS) attempt = 0;
      openedAt = 0;
      scheduleReconnect();
    });
  }

  function scheduleReconnect() {
    // Full jitter: a random delay up to an exponentially growing cap, so a
    // restarted server is not hit by every client at the same instant.
    const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
    const delay = Math.random() * ceiling;
    attempt += 1;
    const until = Date.now() + delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      setState("reconnecting", "Reconnecting in " + left + " s…");
    };
    tick();
    reconnectTicker = setInterval(tick, 1000);
    reconnectTimer = setTimeout(connect, delay);
  }

  function send(frame) {
    if (socket && socket.readyState === WebSocket.OPEN && document.body.dataset.connection === "open") {
      socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  // ------------------------------------------------------------------
  // Server frames
  // ------------------------------------------------------------------

  function handle(frame) {
    switch (frame.type) {
      case "welcome":
        return onWelcome(frame);
      case "message":
        return onMessage(frame);
      case "history":
        return frame.messages.forEach(renderMessage);
      case "join":
        members.add(frame.user);
        renderMembers();
        return renderNotice(frame.user + " joined");
      case "leave":
        members.delete(frame.user);
        renderMembers();
        stopTyping(frame.user);
        return renderNotice(frame.user + " left");
      case "typing":
        return showTyping(frame.user);
      case "error":
        return onError(frame);
      default:
        console.warn("unknown frame", frame.type);
    }
  }

  function onWelcome(frame) {
    setState("open", "Connected");
    members.clear();
    frame.members.forEach((name) => members.add(name));
    renderMembers();
    const first = frame.messages.length ? frame.messages[0].seq : null;
    if (lastSeq > 0 && first !== null && first > lastSeq + 1) {
      // Too much was missed to resume: the server sent the latest page; ask
      // for the hole, page by page from the newest end.
      requestHistory(first, first - lastSeq - 1);
    }
    frame.messages.forEach((message) => {
      acknowledge(message);
      renderMessage(message);
    });
    // Whatever was typed while offline goes out now, with its original
    // client_id, so the server stores it once even if an earlier try arrived.
    outbox.forEach((text, clientId) => {
      send({ type: "message", message: text, client_id: clientId });
    });
  }

  function removePending(clientId) {
    outbox.delete(clientId);
    const pending = list.querySelector('[data-client-id="' + CSS.escape(clientId) + '"]');
    if (pending) pending.remove();
  }

  function acknowledge(message) {
    if (message.client_id && message.user === ME && outbox.has(message.client_id)) {
      removePending(message.client_id);
    }
  }

  function onMessage(message) {
    acknowledge(message);
    if (lastSeq > 0 && message.seq > lastSeq + 1 && !shown.has(message.seq - 1)) {
      // A broadcast was lost or overtaken: fetch what lies between.
      requestHistory(message.seq, message.seq - lastSeq - 1);
    }
    renderMessage(message);
  }

  function requestHistory(before, count) {
    send({ type: "history", before: before, limit: Math.min(count, 200) });
  }

  function onError(frame) {
    if (frame.ref && outbox.has(frame.ref)) {
      // The server refused this message: give the text back to the author.
      const text = outbox.get(frame.ref);
      removePending(frame.ref);
      if (!input.value) input.value = text;
    }
    errorEl.textContent = frame.detail;
  }

  // ------------------------------------------------------------------
  // Rendering (textContent only)
  // ------------------------------------------------------------------

  function atBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  function messageItem(message) {
    const item = document.createElement("li");
    item.className = "message" + (message.user === ME ? " own" : "");
    if (message.seq) item.dataset.seq = String(message.seq);
    const meta = document.createElement("div");
    meta.className = "meta";
    const author = document.createElement("span");
    author.className = "author";
    author.textContent = message.user;
    const time = document.createElement("time");
    if (message.ts) {
      time.dateTime = message.ts;
      time.textContent = formatTime(message.ts);
      time.title = new Date(message.ts).toLocaleString();
    }
    meta.append(author, " ", time);
    const body = document.createElement("div");
    body.className = "body";
    body.textContent = message.message;
    item.append(meta, body);
    return item;
  }

  function renderMessage(message) {
    if (shown.has(message.seq)) return;
    shown.add(message.seq);
    lastSeq = Math.max(lastSeq, message.seq);
    const stick = atBottom();
    const item = messageItem(message);
    // Keep seq order even when history fills a hole or a broadcast overtakes.
    const later = Array.from(list.querySelectorAll("li[data-seq]")).find(
      (el) => Number(el.dataset.seq) > message.seq
    );
    if (later) list.insertBefore(item, later);
    else list.appendChild(item);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function renderPending(clientId, text) {
    const item = messageItem({ user: ME, message: text, ts: null });
    item.classList.add("pending");
    item.dataset.clientId = clientId;
    item.querySelector("time").textContent = "sending…";
    list.appendChild(item);
    list.scrollTop = list.scrollHeight;
  }

  function renderNotice(text) {
    const stick = atBottom();
    const item = document.createElement("li");
    item.className = "notice";
    item.textContent = text;
    list.appendChild(item);
    if (stick) list.scrollTop = list.scrollHeight;
  }

  function renderMembers() {
    const items = Array.from(members)
      .sort()
      .map((name) => {
        const item = document.createElement("li");
        item.textContent = name;
        if (name === ME) item.className = "own";
        return item;
      });
    membersEl.replaceChildren(...items);
    memberCount.textContent = String(members.size);
  }

  function showTyping(user) {
    if (user === ME) return;
    stopTyping(user);
    typers.set(user, setTimeout(() => stopTyping(user), TYPING_SHOW_MS));
    renderTyping();
  }

  function stopTyping(user) {
    if (typers.has(user)) {
      clearTimeout(typers.get(user));
      typers.delete(user);
      renderTyping();
    }
  }

  function renderTyping() {
    const names = Array.from(typers.keys());
    typingEl.textContent = names.length
      ? names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…")
      : "";
  }

  // ------------------------------------------------------------------
  // Composer
  // ------------------------------------------------------------------

  function newClientId() {
    // crypto.randomUUID needs a secure context; getRandomValues does not.
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    const clientId = newClientId();
    outbox.set(clientId, text);
    renderPending(clientId, text);
    send({ type: "message", message: text, client_id: clientId });
    input.value = "";
    errorEl.textContent = "";
  });

  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  input.addEventListener("input", () => {
    const now = Date.now();
    if (input.value && now - lastTypingSent > TYPING_SEND_MS) {
      lastTypingSent = now;
      send({ type: "typing" });
    }
  });

  window.addEventListener("online", () => {
    if (!socket && reconnectTimer) connect();
  });

  connect();
})();
