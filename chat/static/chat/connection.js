// The room's WebSocket: one at a time, reconnected with full-jitter backoff and
// resumed with ?since=<last seq>; its state is shown in the status line and on
// <body data-connection> (connecting, reconnecting, open, offline), which the
// browser tests wait on. Close codes: chat/protocol.py and docs/protocol.md.

// Policy closes: retrying cannot help, so the page says why and stops. Any
// other 44xx stops too.
const CLOSE_REASONS = {
  1008: "The server closed the connection after repeated bad frames or refused posts. Reload the page.",
  4401: "You are signed out. Log in again to chat.",
  4403: "You were removed from this room, or are not allowed in it.",
  4404: "This room does not exist.",
  4429: "Too many open chat tabs, or too many from your network. Close one and reload.",
};
// Everything else reconnects with backoff and resumes with ?since: 1001
// (worker going away), 1006 (dropped), 1009, 1012 (Redis restarted), 1013
// (try again later) and 4008, "too slow": the server dropped what it had
// queued for this socket, and the resume gets all of it back.
const CLOSE_GOING_AWAY = 1001;
const CLOSE_SIGNED_OUT = 4401;
// How long after a 4401 the page checks its sign-in once more.
const SIGN_IN_RECHECK_MS = 1500;
const CLOSE_SERVICE_RESTART = 1012;
const CLOSE_TOO_SLOW = 4008;
// Asked for in the handshake: the server then sends arrays of events.
const SUBPROTOCOL_BATCH = "chat.batch";
// The page's own reconnect policy (docs/protocol.md, "Close codes").
const BACKOFF_BASE_MS = 500;
const BACKOFF_CAP_MS = 60000;
const STABLE_AFTER_MS = 10000;

const OFFLINE = "Offline: waiting for the network…";

// Returns the room's connection; nothing is opened until start().
//
// room: the room's slug. since(): the last seq received, for ?since=.
// deletions(): the last deletion number seen, for &deletions= on a resume.
// statusText, reconnectNow: the status line's text and its button.
// onEvents(events, isCurrent): the events of one server frame, in order;
//   isCurrent() turns false once this socket has been given up on.
// onLost(): the socket is gone (closed, or abandoned while offline), so
//   whatever was asked on it will never be answered.
// onStopped(): a policy close; nothing will ever be sent again.
// onStateChange(): after every change of state.
export function createConnection({
  room,
  since,
  deletions,
  statusText,
  reconnectNow,
  onEvents,
  onLost,
  onStopped,
  onStateChange,
}) {
  let socket = null;
  let state = document.body.dataset.connection;
  let attempt = 0;
  let openedAt = 0;
  let reconnectTimer = null;
  let reconnectTicker = null;
  let stopped = false; // a policy close: no more reconnects
  let welcomedSocket = false; // the current socket got its welcome
  let signInRechecked = false; // a 4401 after a welcome was retried once

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const last = since();
    let query = last > 0 ? "?since=" + last : "";
    const seen = deletions ? deletions() : null;
    if (query && seen !== null) query += "&deletions=" + seen;
    return scheme + "//" + location.host + "/ws/chat/" + encodeURIComponent(room) + "/" + query;
  }

  function setState(next, text, canRetryNow) {
    state = next;
    document.body.dataset.connection = next;
    statusText.textContent = text;
    reconnectNow.hidden = !canRetryNow;
    onStateChange();
  }

  function clearTimers() {
    clearTimeout(reconnectTimer);
    clearInterval(reconnectTicker);
    reconnectTimer = null;
  }

  function connect() {
    clearTimers();
    if (stopped) return;
    if (navigator.onLine === false) {
      setState("offline", OFFLINE, false);
      return; // the "online" event calls us again
    }
    setState(attempt === 0 ? "connecting" : "reconnecting", "Connecting…", false);
    const ws = new WebSocket(socketUrl(), [SUBPROTOCOL_BATCH]);
    const isCurrent = () => ws === socket;
    socket = ws;
    ws.addEventListener("open", () => {
      openedAt = Date.now();
    });
    ws.addEventListener("message", (event) => {
      if (!isCurrent()) return;
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (err) {
        console.error("unreadable frame", event.data);
        return;
      }
      // With chat.batch (ws.protocol) a frame is an array of events, else
      // one event; an array is taken as a batch either way.
      onEvents(Array.isArray(data) ? data : [data], isCurrent);
    });
    ws.addEventListener("close", (event) => {
      // Kept in the console: the code says why the page did or did not retry.
      console.info("socket closed", event.code, event.wasClean ? "clean" : "not clean");
      if (!isCurrent()) return;
      const stable = openedAt && Date.now() - openedAt >= STABLE_AFTER_MS;
      const hadWelcome = welcomedSocket;
      forgetSocket();
      if (event.code === CLOSE_SIGNED_OUT && hadWelcome && !signInRechecked) {
        // The sign-in of this socket's session ended, but the browser may
        // be signed in under a new one (a password change in another tab
        // cycles the session): one handshake with the cookie as it is once
        // that tab's answer is in tells.
        signInRechecked = true;
        setState("reconnecting", "Connecting…", false);
        reconnectTimer = setTimeout(connect, SIGN_IN_RECHECK_MS);
        return;
      }
      if (event.code in CLOSE_REASONS || (event.code >= 4400 && event.code < 4500)) {
        stop(CLOSE_REASONS[event.code] || "Disconnected (" + event.code + ").");
        return;
      }
      // A server going away on purpose (1001, 1012) is no sign of trouble:
      // start the backoff afresh, the jitter still spreads the herd. A slow
      // socket (4008) backs off like a dropped one, so that a client that
      // keeps falling behind does not hammer the server.
      if (event.code === CLOSE_GOING_AWAY || event.code === CLOSE_SERVICE_RESTART) attempt = 0;
      else if (stable) attempt = 0;
      if (event.code === CLOSE_TOO_SLOW) console.info("closed by the server: too slow; resuming");
      scheduleReconnect();
    });
  }

  // Drops the socket before anyone closes it, so that its close event (no
  // longer about the current socket) is ignored, and says it is gone.
  function forgetSocket() {
    socket = null;
    openedAt = 0;
    welcomedSocket = false;
    onLost();
  }

  function stop(reason) {
    stopped = true;
    setState("offline", reason, false);
    onStopped();
  }

  function scheduleReconnect() {
    if (navigator.onLine === false) {
      setState("offline", OFFLINE, false);
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
    return socket !== null && socket.readyState === WebSocket.OPEN && state === "open";
  }

  reconnectNow.addEventListener("click", reconnectSoon);
  window.addEventListener("online", reconnectSoon);
  window.addEventListener("offline", () => {
    // The socket may take minutes to notice; say so now and start over when
    // the network is back. Forgotten first, then closed: its requests are
    // given up on here, as its close event will be ignored.
    if (socket) {
      const ws = socket;
      forgetSocket();
      ws.close();
    }
    clearTimers();
    if (!stopped) setState("offline", OFFLINE, false);
  });

  return {
    start: connect,
    reconnectSoon,
    isReady,
    // True after a policy close.
    isStopped: () => stopped,
    // Called when the server's welcome arrived: the socket is usable.
    welcomed() {
      welcomedSocket = true;
      signInRechecked = false;
      setState("open", "Connected", false);
    },
    // Sends `frame` and returns true, or returns false when not connected.
    send(frame) {
      if (!isReady()) return false;
      socket.send(JSON.stringify(frame));
      return true;
    },
  };
}
