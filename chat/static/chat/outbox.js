// Posts on their way: each keeps its client_id until the server echoes it, is
// sent again with the same client_id on every new socket (so the server
// stores it once), and goes back to its author if it can never be sent.

// Returns a random (version 4) UUID. crypto.randomUUID needs a secure context;
// getRandomValues does not.
function newClientId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = (bytes[6] & 0x0f) | 0x40;
  bytes[8] = (bytes[8] & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return [hex.slice(0, 8), hex.slice(8, 12), hex.slice(12, 16), hex.slice(16, 20), hex.slice(20)].join("-");
}

// me: this page's user. send(frame) -> bool: true when it went out.
// onQueued(clientId, text): a new post, about to be sent (or to wait).
// onStatus(clientId, text): what a queued post is waiting for now.
// onDone(clientId): the server stored it (its echo came).
// onGiveBack(clientId, text): it will not be sent; the text is the author's.
export function createOutbox({ me, send, onQueued, onStatus, onDone, onGiveBack }) {
  const queued = new Map(); // client_id -> text, until the server echoes it

  function giveBack(clientId) {
    const text = queued.get(clientId);
    queued.delete(clientId);
    onGiveBack(clientId, text);
  }

  return {
    // Queues `text` and sends it if the socket is ready.
    post(text) {
      const clientId = newClientId();
      queued.set(clientId, text);
      onQueued(clientId, text);
      send({ type: "message", message: text, client_id: clientId });
    },
    // Returns true when `message` is the echo of a post from this page.
    acknowledge(message) {
      if (!message.client_id || message.user !== me || !queued.has(message.client_id)) {
        return false;
      }
      queued.delete(message.client_id);
      onDone(message.client_id);
      return true;
    },
    // The server refused the post `clientId` (an error frame's ref).
    refused(clientId) {
      if (queued.has(clientId)) giveBack(clientId);
    },
    // Called on a new socket's welcome, after its backlog: the echoes in it
    // have taken the stored posts out, and the rest go out again now.
    resend() {
      queued.forEach((text, clientId) => {
        send({ type: "message", message: text, client_id: clientId });
        onStatus(clientId, "sending…");
      });
    },
    // Called when the socket is gone: everything queued waits for the next.
    waiting() {
      queued.forEach((text, clientId) => onStatus(clientId, "waiting for the connection…"));
    },
    // Called when nothing can be sent any more.
    giveBackAll() {
      Array.from(queued.keys()).forEach(giveBack);
    },
  };
}
