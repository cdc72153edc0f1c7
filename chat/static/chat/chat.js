// The chat pages. The lobby polls its room list; the room page holds one
// WebSocket to /ws/chat/<room>/ (subprotocol chat.batch: every server frame is
// an array of events) that reconnects with backoff and resumes with
// ?since=<last seq>. User text is only ever set with textContent.
(function () {
  "use strict";

  // The server's rule (chat/protocol.py), checked here only to answer sooner.
  const ROOM_NAME = /^[a-z0-9][a-z0-9_-]{0,63}$/;
  const relative = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

  function timeAgo(date) {
    const seconds = Math.round((date.getTime() - Date.now()) / 1000);
    const steps = [
      [60, "second"],
      [60, "minute"],
      [24, "hour"],
      [7, "day"],
      [4.35, "week"],
      [12, "month"],
      [Infinity, "year"],
    ];
    let value = seconds;
    for (const [size, unit] of steps) {
      if (Math.abs(value) < size) {
        return unit === "second" && Math.abs(value) < 45
          ? relative.format(0, "second")
          : relative.format(Math.round(value), unit);
      }
      value /= size;
    }
    return date.toLocaleString();
  }

  const lobbyEl = document.querySelector(".lobby[data-rooms-url]");
  if (lobbyEl) initLobby(lobbyEl);
  const roomEl = document.querySelector(".room[data-room]");
  if (roomEl) initRoom(roomEl);

  // ====================================================================
  // Lobby: the room list, refreshed every few seconds while visible
  // ====================================================================

  function initLobby(section) {
    const url = section.dataset.roomsUrl;
    const table = document.getElementById("rooms");
    const tbody = table.tBodies[0];
    const empty = document.getElementById("rooms-empty");
    const stateEl = document.getElementById("rooms-state");
    const form = document.getElementById("room-form");
    const nameInput = form.querySelector("input[name=name]");
    const nameError = document.getElementById("room-name-error");
    let timer = null;

    function setActivity(cell, iso) {
      const date = new Date(iso);
      let time = cell.querySelector("time");
      if (!time) {
        time = document.createElement("time");
        cell.replaceChildren(time);
      }
      time.dateTime = iso;
      time.title = date.toLocaleString();
      time.textContent = timeAgo(date);
    }

    function newRow(room) {
      const row = document.createElement("tr");
      row.dataset.room = room.room;
      const name = document.createElement("td");
      const link = document.createElement("a");
      link.href = room.url;
      link.textContent = "#" + room.room;
      name.append(link);
      const online = document.createElement("td");
      online.className = "online";
      const activity = document.createElement("td");
      activity.className = "activity";
      row.append(name, online, activity);
      return row;
    }

    function render(rooms) {
      const rows = new Map(Array.from(tbody.rows, (row) => [row.dataset.room, row]));
      const focused = tbody.contains(document.activeElement) ? document.activeElement : null;
      const ordered = rooms.map((room) => {
        const row = rows.get(room.room) || newRow(room);
        rows.delete(room.room);
        const online = row.querySelector(".online");
        if (online.textContent !== String(room.online)) online.textContent = String(room.online);
        setActivity(row.querySelector(".activity") || row.cells[2], room.last_activity);
        return row;
      });
      rows.forEach((row) => row.remove());
      // Move rows only when the order changed, and give focus back to a link
      // that moved, so keyboard users do not lose their place.
      const current = Array.from(tbody.rows);
      if (ordered.length !== current.length || ordered.some((row, i) => row !== current[i])) {
        tbody.replaceChildren(...ordered);
        if (focused && focused.isConnected) focused.focus();
      }
      table.hidden = rooms.length === 0;
      empty.hidden = rooms.length !== 0;
    }

    async function refresh() {
      clearTimeout(timer);
      timer = null;
      if (document.hidden) return; // visibilitychange brings us back
      try {
        const response = await fetch(url, {
          headers: { Accept: "application/json" },
          credentials: "same-origin",
          cache: "no-store",
        });
        if (!response.ok) throw new Error("HTTP " + response.status);
        render((await response.json()).rooms);
        section.dataset.refreshed = String(Number(section.dataset.refreshed || 0) + 1);
        stateEl.textContent = "Updated live";
        stateEl.classList.remove("stale");
      } catch (err) {
        console.warn("room list refresh failed", err);
        stateEl.textContent = "Live updates paused: retrying…";
        stateEl.classList.add("stale");
      }
      // Read each time: a test may shorten it.
      const every = Number(section.dataset.refreshMs) || 5000;
      if (!timer && !document.hidden) timer = setTimeout(refresh, every);
    }

    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });

    // The server checks the name too (and explains it the same way); this
    // only saves a round trip.
    const rule = document.getElementById("room-name-help").textContent.trim();
    function nameProblem() {
      const name = nameInput.value.trim().toLowerCase();
      if (!name) return "Type a room name.";
      if (!ROOM_NAME.test(name)) return "“" + nameInput.value.trim() + "” is not a room name. " + rule;
      return "";
    }
    form.addEventListener("submit", (event) => {
      const problem = nameProblem();
      if (problem) {
        event.preventDefault();
        nameError.textContent = problem;
        nameInput.setAttribute("aria-invalid", "true");
        nameInput.focus();
      }
    });
    nameInput.addEventListener("input", () => {
      if (nameInput.getAttribute("aria-invalid") === "true" && !nameProblem()) {
        nameError.textContent = "";
        nameInput.removeAttribute("aria-invalid");
      }
    });

    Array.from(tbody.rows).forEach((row) => {
      const time = row.querySelector("time");
      if (time) setActivity(time.parentElement, time.dateTime);
    });
    refresh();
  }

  // ====================================================================
  // Room
  // ====================================================================

  function initRoom(roomEl) {
    const ROOM = roomEl.dataset.room;
    const ME = roomEl.dataset.user;
    const MAX_LENGTH = Number(roomEl.dataset.maxLength) || 2000;
    // Policy closes: retrying cannot help, so the page says why and stops.
    const CLOSE_REASONS = {
      1008: "The server closed the connection after repeated bad frames. Reload to try again.",
      4401: "You are signed out. Log in again to chat.",
      4403: "You were removed from this room, or are not allowed in it.",
      4404: "This room does not exist.",
      4429: "Too many open chat tabs. Close one and reload.",
    };
    // Everything else reconnects with backoff and resumes with ?since: 1001
    // (worker going away), 1006 (dropped), 1009, 1012 (Redis restarted), 1013
    // (try again later) and 4008, "too slow": the server dropped what it had
    // queued for this socket, and the resume gets all of it back.
    const CLOSE_TOO_SLOW = 4008;
    // Asked for in the handshake: the server then sends arrays of events.
    const SUBPROTOCOL_BATCH = "chat.batch";
    const BACKOFF_BASE_MS = 500;
    const BACKOFF_CAP_MS = 60000;
    const STABLE_AFTER_MS = 10000;
    // A little over the server's CHAT_TYPING_INTERVAL_SECONDS (2 s).
    const TYPING_SEND_MS = 2500;
    const TYPING_SHOW_MS = 4000;
    const GROUP_GAP_MS = 5 * 60 * 1000;
    const HISTORY_MAX = 200;
    const NEAR_TOP_PX = 80;
    const NEAR_BOTTOM_PX = 40;

    const list = document.getElementById("messages");
    const historyEdge = document.getElementById("history-edge");
    const loadOlderButton = document.getElementById("load-older");
    const historyStart = document.getElementById("history-start");
    const newMessagesButton = document.getElementById("new-messages");
    const membersEl = document.getElementById("members");
    const memberCount = document.getElementById("member-count");
    const membersMoreButton = document.getElementById("members-more");
    const statusText = document.getElementById("status-text");
    const reconnectNow = document.getElementById("reconnect-now");
    const closedBanner = document.getElementById("room-closed");
    const typingEl = document.getElementById("typing");
    const form = document.getElementById("composer");
    const input = document.getElementById("message-input");
    const sendButton = document.getElementById("send");
    const errorEl = document.getElementById("composer-error");
    const baseTitle = document.title;

    let socket = null;
    let attempt = 0;
    let openedAt = 0;
    let reconnectTimer = null;
    let reconnectTicker = null;
    let stopped = false; // a policy close: no more reconnects
    let lastSeq = 0; // highest seq received
    const shown = new Set(); // seqs received (rendered, or deleted since)
    const outbox = new Map(); // client_id -> text, until the server echoes it
    const members = new Set(); // the names listed (the server's pages, and joins since)
    let memberTotal = 0; // the server's count of users in the room
    let membersMore = false; // names after `membersCursor` are not loaded yet
    let membersCursor = null; // the last name of the pages the server sent
    let membersAfter = null; // the `after` of the `members` request in flight
    const typers = new Map(); // user -> timer
    let lastTypingSent = 0;
    let typingTimer = null;
    let hasMore = false; // older messages exist before the first one shown
    let olderBefore = null; // the `before` of the page of older history in flight
    let holeBefore = null; // the `before` of the gap-filling request in flight
    let readOnly = false;
    let unread = 0; // messages from others while the tab was hidden
    let newBelow = 0; // messages that arrived below while scrolled up

    // ------------------------------------------------------------------
    // Connection
    // ------------------------------------------------------------------

    function socketUrl() {
      const scheme = location.protocol === "https:" ? "wss:" : "ws:";
      const query = lastSeq > 0 ? "?since=" + lastSeq : "";
      return scheme + "//" + location.host + "/ws/chat/" + encodeURIComponent(ROOM) + "/" + query;
    }

    function setState(state, text, canRetryNow) {
      document.body.dataset.connection = state;
      statusText.textContent = text;
      reconnectNow.hidden = !canRetryNow;
      updateComposer();
    }

    function connect() {
      clearTimeout(reconnectTimer);
      clearInterval(reconnectTicker);
      reconnectTimer = null;
      if (stopped) return;
      if (navigator.onLine === false) {
        setState("offline", "Offline: waiting for the network…", false);
        return; // the "online" event calls us again
      }
      setState(attempt === 0 ? "connecting" : "reconnecting", "Connecting…", false);
      const ws = new WebSocket(socketUrl(), [SUBPROTOCOL_BATCH]);
      socket = ws;
      ws.addEventListener("open", () => {
        openedAt = Date.now();
      });
      ws.addEventListener("message", (event) => {
        if (ws !== socket) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch (err) {
          console.error("unreadable frame", event.data);
          return;
        }
        // With chat.batch (ws.protocol) a frame is an array of events, else
        // one event; an array is taken as a batch either way.
        handleAll(ws, Array.isArray(data) ? data : [data]);
      });
      ws.addEventListener("close", (event) => {
        if (ws !== socket) return;
        const stable = openedAt && Date.now() - openedAt >= STABLE_AFTER_MS;
        forgetSocket();
        if (event.code in CLOSE_REASONS || (event.code >= 4400 && event.code < 4500)) {
          stop(CLOSE_REASONS[event.code] || "Disconnected (" + event.code + ").");
          return;
        }
        // A server going away on purpose (1001, 1012) is no sign of trouble:
        // start the backoff afresh, the jitter still spreads the herd. A slow
        // socket (4008) backs off like a dropped one, so that a client that
        // keeps falling behind does not hammer the server.
        if (event.code === 1001 || event.code === 1012) attempt = 0;
        else if (stable) attempt = 0;
        if (event.code === CLOSE_TOO_SLOW) console.info("closed by the server: too slow; resuming");
        scheduleReconnect();
      });
    }

    // The socket is gone (closed, or given up on while offline): whatever was
    // asked on it will never be answered, so it can be asked again on the next.
    function forgetSocket() {
      socket = null;
      openedAt = 0;
      olderBefore = null;
      holeBefore = null;
      membersAfter = null;
      list.removeAttribute("aria-busy");
      renderMembersMore();
      outbox.forEach((text, clientId) => markPending(clientId, "waiting for the connection…"));
    }

    function stop(reason) {
      stopped = true;
      setState("offline", reason, false);
      // Nothing queued will ever be sent: give the text back to its author.
      Array.from(outbox.keys()).forEach(giveBack);
      stopTypingAll();
    }

    function scheduleReconnect() {
      if (navigator.onLine === false) {
        setState("offline", "Offline: waiting for the network…", false);
        return;
      }
      // Full jitter: a random delay up to an exponentially growing ceiling,
      // so a restarted server is not hit by every client at the same instant.
      const ceiling = Math.min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2 ** attempt);
      const delay = Math.random() * ceiling;
      attempt += 1;
      const until = Date.now() + delay;
      const tick = () => {
        const left = Math.max(1, Math.ceil((until - Date.now()) / 1000));
        setState("reconnecting", "Reconnecting in " + left + " s…", true);
      };
      tick();
      reconnectTicker = setInterval(tick, 1000);
      reconnectTimer = setTimeout(connect, delay);
    }

    function reconnectSoon() {
      if (!stopped && !socket) connect();
    }

    function isReady() {
      return socket !== null && socket.readyState === WebSocket.OPEN &&
        document.body.dataset.connection === "open";
    }

    function send(frame) {
      if (!isReady()) return false;
      socket.send(JSON.stringify(frame));
      return true;
    }

    reconnectNow.addEventListener("click", reconnectSoon);
    window.addEventListener("online", reconnectSoon);
    window.addEventListener("offline", () => {
      // The socket may take minutes to notice; say so now and start over
      // when the network is back.
      // The close event of this socket is then ignored (it is no longer
      // `socket`), so its requests are forgotten here.
      if (socket) {
        const ws = socket;
        forgetSocket();
        ws.close();
      }
      clearTimeout(reconnectTimer);
      clearInterval(reconnectTicker);
      if (!stopped) setState("offline", "Offline: waiting for the network…", false);
    });

    // ------------------------------------------------------------------
    // Server frames
    // ------------------------------------------------------------------

    // The events of one frame, in order. A run of messages is shown in one
    // go (one scroll adjustment, one gap check for the whole run).
    function handleAll(ws, events) {
      let run = [];
      const flush = () => {
        if (run.length) onMessages(run, true);
        run = [];
      };
      for (const event of events) {
        if (ws !== socket) return;
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
      if (ws === socket) flush();
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
          return onHistory(frame);
        case "presence":
          return onPresence(frame);
        case "members":
          return onMembers(frame);
        case "typing":
          return showTyping(frame.user);
        case "deleted":
          return onDeleted(frame);
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
      const resumed = lastSeq > 0;
      setState("open", "Connected", false);
      const names = Array.isArray(frame.members) ? frame.members : [];
      members.clear();
      names.forEach((name) => members.add(name));
      // The first page may not reach this user's own name.
      members.add(ME);
      membersCursor = names.length ? names[names.length - 1] : null;
      membersMore = Boolean(frame.members_more) && membersCursor !== null;
      membersAfter = null;
      memberTotal = Number.isInteger(frame.member_count) ? frame.member_count : members.size;
      renderMembers();
      setReadOnly(Boolean(frame.closed));
      if (!resumed) setHasMore(frame.has_more);
      // After a resume that missed too much, the server sends the latest
      // page instead, and the gap check in onMessages asks for the rest.
      onMessages(frame.messages, resumed);
      // A gap whose request went with the last socket is asked for again.
      if (resumed) fillHole(lastSeq + 1);
      if (!resumed) scrollToBottom();
      // Whatever was typed while offline goes out now, with its original
      // client_id, so the server stores it once even if an earlier try got
      // through; the echoes above have already taken the stored ones out.
      outbox.forEach((text, clientId) => {
        send({ type: "message", message: text, client_id: clientId });
        markPending(clientId, "sending…");
      });
      maybeLoadOlder();
    }

    function onMessages(messages, live) {
      const added = [];
      let ownEcho = false;
      keepScroll(() => {
        messages.forEach((message) => {
          stopTyping(message.user);
          if (acknowledge(message)) ownEcho = true;
          if (renderMessage(message)) added.push(message);
        });
      });
      // A seq whose predecessor never came: a broadcast was lost or
      // overtaken, or a resume fell short. Ask for what lies between.
      const floor = oldestSeq();
      const gaps = added.filter((m) => m.seq - 1 > floor && !shown.has(m.seq - 1));
      if (gaps.length) fillHole(Math.max(...gaps.map((m) => m.seq)));
      if (!live) return;
      if (ownEcho) scrollToBottom();
      else if (added.length && !atBottom()) {
        newBelow += added.length;
        renderNewBelow();
      }
      if (document.hidden) {
        unread += added.filter((m) => m.user !== ME).length;
        renderTitle();
      }
    }

    function onHistory(frame) {
      if (frame.before === olderBefore) {
        olderBefore = null;
        setHasMore(frame.has_more);
        list.removeAttribute("aria-busy");
        keepScroll(() => frame.messages.forEach(renderMessage));
        maybeLoadOlder();
        return;
      }
      keepScroll(() => frame.messages.forEach(renderMessage));
      if (frame.before === holeBefore) {
        holeBefore = null;
        // The answer holds every message from its first seq up to `before`:
        // a seq in between that did not come was deleted, and must not be
        // asked for again. Below the oldest shown, scrolling up asks.
        const floor = oldestSeq();
        const first = frame.messages.length ? frame.messages[0].seq : floor + 1;
        for (let seq = Math.max(first, floor + 1); seq < frame.before; seq++) shown.add(seq);
        fillHole(lastSeq + 1);
      }
    }

    // A presence diff is idempotent: a join of someone listed, or a leave of
    // someone who is not, changes nothing and says nothing. While the list
    // is not fully loaded, a name not listed may be further down it, so the
    // server's word is taken for the notice.
    function onPresence(frame) {
      const joined = [];
      const left = [];
      (Array.isArray(frame.joins) ? frame.joins : []).forEach((name) => {
        if (typeof name !== "string" || members.has(name)) return;
        members.add(name);
        if (name !== ME) joined.push(name);
      });
      (Array.isArray(frame.leaves) ? frame.leaves : []).forEach((name) => {
        if (typeof name !== "string" || name === ME) return; // this socket is open
        stopTyping(name);
        if (members.delete(name) || membersMore) left.push(name);
      });
      if (Number.isInteger(frame.members)) memberTotal = frame.members;
      renderMembers();
      if (joined.length) renderNotice(namesSummary(joined) + " joined");
      if (left.length) renderNotice(namesSummary(left) + " left");
    }

    function loadMoreMembers() {
      if (!membersMore || membersAfter !== null || !isReady()) return;
      // After the last name of the server's pages, not the last one listed:
      // a name that joined since may sort after names not loaded yet.
      membersAfter = membersCursor;
      if (!send({ type: "members", after: membersAfter })) membersAfter = null;
      renderMembersMore();
    }

    function onMembers(frame) {
      if (membersAfter === null || frame.after !== membersAfter) return;
      membersAfter = null;
      const names = Array.isArray(frame.members) ? frame.members : [];
      const known = members.size;
      names.forEach((name) => members.add(name));
      if (names.length) membersCursor = names[names.length - 1];
      membersMore = Boolean(frame.has_more) && names.length > 0;
      const hadFocus = document.activeElement === membersMoreButton;
      renderMembers();
      // Pages that bring only names listed already (they joined since the
      // welcome) are not worth a click: ask for the next one at once.
      if (membersMore && (members.size === known || members.size >= memberTotal)) {
        loadMoreMembers();
        return;
      }
      // The control goes away with the last page: keep keyboard users in the list.
      if (hadFocus && membersMoreButton.hidden) membersEl.focus();
    }

    // "bob", "bob and carol", "bob, carol and dave", "bob, carol and 3 others".
    function namesSummary(names) {
      const sorted = names.slice().sort();
      if (sorted.length === 1) return sorted[0];
      if (sorted.length <= 3) return sorted.slice(0, -1).join(", ") + " and " + sorted[sorted.length - 1];
      const others = sorted.length - 2;
      return sorted.slice(0, 2).join(", ") + " and " + others + " others";
    }

    function oldestSeq() {
      const first = list.querySelector("li.message[data-seq]");
      return first ? Number(first.dataset.seq) : 0;
    }

    function fillHole(before) {
      // One request for everything between the oldest message shown and the
      // highest missing seq below `before`. Deleted seqs never come, so the
      // answer (the newest messages below `before`) then reaches further down.
      let missing = before - 1;
      while (missing > 0 && shown.has(missing)) missing -= 1;
      const floor = oldestSeq();
      if (missing <= floor || holeBefore !== null) return;
      holeBefore = missing + 1;
      const limit = Math.min(missing - floor, HISTORY_MAX);
      if (!send({ type: "history", before: holeBefore, limit: limit })) holeBefore = null;
    }

    function setHasMore(more) {
      hasMore = Boolean(more);
      loadOlderButton.hidden = !hasMore;
      historyStart.hidden = hasMore;
    }

    function loadOlder() {
      if (!hasMore || olderBefore !== null || !isReady()) return;
      const before = oldestSeq();
      if (!before) return;
      olderBefore = before;
      list.setAttribute("aria-busy", "true");
      // No limit: the server's page size (CHAT_HISTORY_PAGE), as in `welcome`.
      send({ type: "history", before: before });
    }

    function maybeLoadOlder() {
      // Also when the list is too short to scroll, or the top is in view.
      if (hasMore && list.scrollTop < NEAR_TOP_PX) loadOlder();
    }

    function onDeleted(frame) {
      if (frame.seq) shown.add(frame.seq); // never ask for it to fill a gap
      const item = list.querySelector('li.message[data-id="' + Number(frame.id) + '"]');
      if (!item) return;
      const next = nextMessage(item);
      keepScroll(() => {
        item.remove();
        regroup(next);
      });
    }

    function acknowledge(message) {
      // Returns true when this is the echo of a message sent from this page.
      if (message.client_id && message.user === ME && outbox.has(message.client_id)) {
        outbox.delete(message.client_id);
        const pending = pendingItem(message.client_id);
        if (pending) {
          const next = nextMessage(pending);
          pending.remove();
          regroup(next);
        }
        return true;
      }
      return false;
    }

    function onError(frame) {
      if (frame.ref && outbox.has(frame.ref)) giveBack(frame.ref);
      if (frame.code === "room_closed") setReadOnly(true);
      else if (!frame.ref) {
        // A refused history request: let scrolling ask again later.
        olderBefore = null;
        holeBefore = null;
        membersAfter = null;
        list.removeAttribute("aria-busy");
        renderMembersMore();
      }
      errorEl.textContent =
        frame.code === "room_closed" ? "This room is closed: your message was not sent." : frame.detail;
    }

    function giveBack(clientId) {
      // The server refused (or will never get) this message: the text goes
      // back into the input, before anything typed since.
      const text = outbox.get(clientId);
      outbox.delete(clientId);
      const pending = pendingItem(clientId);
      if (pending) pending.remove();
      input.value = input.value ? text + "\n" + input.value : text;
      autosize();
    }

    function setReadOnly(closed) {
      readOnly = closed;
      closedBanner.hidden = !closed;
      roomEl.classList.toggle("closed", closed);
      if (!closed && errorEl.textContent.startsWith("This room is closed")) errorEl.textContent = "";
      updateComposer();
    }

    function updateComposer() {
      // The text stays in the input whatever happens: only sending stops.
      input.readOnly = readOnly || stopped;
      input.setAttribute("aria-disabled", String(readOnly || stopped));
      sendButton.disabled = readOnly || stopped;
    }

    // ------------------------------------------------------------------
    // Rendering (textContent only)
    // ------------------------------------------------------------------

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

    // Runs `mutate`, then keeps the view where it was: at the bottom if it
    // was there, else on the same item, so reading older messages is never
    // disturbed by what is added above or below.
    function keepScroll(mutate) {
      const stick = atBottom();
      const anchor = stick ? null : firstVisible();
      const before = anchor ? anchor.getBoundingClientRect().top : 0;
      mutate();
      if (stick) list.scrollTop = list.scrollHeight;
      else if (anchor && anchor.isConnected) {
        list.scrollTop += anchor.getBoundingClientRect().top - before;
      }
    }

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

    function messageItem(message) {
      const date = message.ts ? new Date(message.ts) : new Date();
      const item = document.createElement("li");
      item.className = "message" + (message.user === ME ? " own" : "");
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
      if (message.user === ME) {
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

    // A message starts a group (shows its author) unless it directly follows
    // one by the same author on the same day within a few minutes; the first
    // message of a day carries the day's heading.
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

    function renderMessage(message) {
      // Returns the new item, or null for a seq already received.
      if (shown.has(message.seq)) return null;
      shown.add(message.seq);
      lastSeq = Math.max(lastSeq, message.seq);
      const item = messageItem(message);
      insert(item);
      return item;
    }

    function pendingItem(clientId) {
      return list.querySelector('li.pending[data-client-id="' + CSS.escape(clientId) + '"]');
    }

    function markPending(clientId, text) {
      const item = pendingItem(clientId);
      if (item) item.querySelector("time").textContent = text;
    }

    function renderPending(clientId, text) {
      const item = messageItem({ user: ME, message: text, ts: null });
      item.classList.add("pending");
      item.dataset.clientId = clientId;
      item.querySelector("time").textContent = isReady() ? "sending…" : "waiting for the connection…";
      list.appendChild(item);
      regroup(item);
      scrollToBottom();
    }

    function renderNotice(text) {
      keepScroll(() => {
        const item = document.createElement("li");
        item.className = "notice";
        item.textContent = text;
        list.insertBefore(item, firstPending());
        regroup(nextMessage(item));
      });
    }

    function renderNewBelow() {
      newMessagesButton.hidden = newBelow === 0;
      newMessagesButton.textContent =
        newBelow === 1 ? "1 new message ↓" : newBelow + " new messages ↓";
    }

    function renderTitle() {
      document.title = unread ? "(" + unread + ") " + baseTitle : baseTitle;
    }

    function renderMembers() {
      const items = Array.from(members)
        .sort()
        .map((name) => {
          const item = document.createElement("li");
          item.textContent = name;
          if (name === ME) {
            item.className = "own";
            const you = document.createElement("span");
            you.className = "you";
            you.textContent = "you";
            item.append(" ", you);
          }
          return item;
        });
      membersEl.replaceChildren(...items);
      memberCount.textContent = String(memberTotal);
      renderMembersMore();
    }

    function renderMembersMore() {
      membersMoreButton.hidden = !membersMore;
      // Not `disabled`: a disabled button loses the keyboard focus. A click
      // while a page is on its way, or while offline, does nothing.
      membersMoreButton.setAttribute("aria-disabled", String(membersAfter !== null || !isReady()));
      membersEl.setAttribute("aria-busy", String(membersAfter !== null));
      const left = memberTotal - members.size;
      membersMoreButton.textContent = left > 0 ? "Show " + left + " more" : "Show more";
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

    function stopTypingAll() {
      Array.from(typers.keys()).forEach(stopTyping);
    }

    function renderTyping() {
      const names = Array.from(typers.keys()).sort();
      typingEl.textContent = names.length
        ? names.join(", ") + (names.length === 1 ? " is typing…" : " are typing…")
        : "";
    }

    // ------------------------------------------------------------------
    // Scrolling, visibility
    // ------------------------------------------------------------------

    list.addEventListener("scroll", () => {
      if (atBottom() && newBelow) {
        newBelow = 0;
        renderNewBelow();
      }
      maybeLoadOlder();
    });
    loadOlderButton.addEventListener("click", loadOlder);
    membersMoreButton.addEventListener("click", loadMoreMembers);
    newMessagesButton.addEventListener("click", () => {
      scrollToBottom();
      input.focus();
    });
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) {
        unread = 0;
        renderTitle();
        reconnectSoon();
      }
    });

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

    function autosize() {
      input.style.height = "auto";
      input.style.height = Math.min(input.scrollHeight + 2, 200) + "px";
    }

    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (readOnly || stopped) return;
      const text = input.value.trim();
      if (!text) return;
      // Code points, as the server counts them; the text stays to be cut.
      const length = Array.from(text).length;
      if (length > MAX_LENGTH) {
        errorEl.textContent =
          "Your message is " + length + " characters long; the limit is " + MAX_LENGTH + ".";
        return;
      }
      const clientId = newClientId();
      outbox.set(clientId, text);
      renderPending(clientId, text);
      send({ type: "message", message: text, client_id: clientId });
      clearTimeout(typingTimer);
      typingTimer = null;
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

    // At most one `typing` per TYPING_SEND_MS (the server drops more), and
    // a throttled keystroke is sent when the interval ends, so that typing
    // right after sending a message still shows.
    function sendTyping() {
      typingTimer = null;
      if (input.value.trim() && send({ type: "typing" })) lastTypingSent = Date.now();
    }

    input.addEventListener("input", () => {
      autosize();
      if (!input.value.trim() || typingTimer) return;
      const wait = lastTypingSent + TYPING_SEND_MS - Date.now();
      if (wait <= 0) sendTyping();
      else typingTimer = setTimeout(sendTyping, wait);
    });

    connect();
  }
})();
