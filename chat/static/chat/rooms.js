// The room list that the lobby (as a table) and the room page (as a sidebar)
// both show: GET rooms.json, polled every few seconds, and each room's unread
// and mention badges with their words for screen readers. Each page renders
// the rooms its own way; what they share is here.

// Returns "3 unread, 1 mention": the badges in words.
export function countsText(unread, mentions) {
  const parts = [unread + " unread"];
  if (mentions) parts.push(mentions + (mentions === 1 ? " mention" : " mentions"));
  return parts.join(", ");
}

function count(value) {
  const number = Number(value);
  return Number.isInteger(number) && number > 0 ? number : 0;
}

// Shows `unread` and `mentions` in `el` (a span.counts): an "@n" badge for
// mentions, a number for unread messages, both hidden from screen readers,
// which read the words beside them instead. The lobby's template renders the
// same markup. data-unread / data-mentions carry the numbers, for styles and
// tests.
export function renderCounts(el, unread, mentions) {
  unread = count(unread);
  mentions = count(mentions);
  if (el.dataset.unread === String(unread) && el.dataset.mentions === String(mentions)) return;
  el.dataset.unread = String(unread);
  el.dataset.mentions = String(mentions);
  const parts = [];
  if (mentions) parts.push(badge("badge mention", "@" + mentions));
  if (unread) parts.push(badge("badge unread", String(unread)));
  if (parts.length) {
    const words = document.createElement("span");
    words.className = "visually-hidden";
    words.textContent = countsText(unread, mentions);
    parts.push(words);
  }
  el.replaceChildren(...parts);
  el.title = parts.length ? countsText(unread, mentions) : "";
}

function badge(className, text) {
  const el = document.createElement("span");
  el.className = className;
  el.setAttribute("aria-hidden", "true");
  el.textContent = text;
  return el;
}

// Puts `ordered` as the children of `parent`, moving nodes only when the
// order changed, and gives focus back to a link that moved, so keyboard
// users do not lose their place.
export function reorder(parent, ordered) {
  const focused = parent.contains(document.activeElement) ? document.activeElement : null;
  const current = Array.from(parent.children);
  if (ordered.length === current.length && ordered.every((el, i) => el === current[i])) return;
  parent.replaceChildren(...ordered);
  if (focused && focused.isConnected) focused.focus();
}

// How long `soon()` waits, so that a burst of events costs one request.
const SOON_MS = 250;

// Returns the poller of rooms.json; nothing is fetched until start().
//
// url: rooms.json. intervalMs(): the time between polls, read each time (a
// test may shorten it). hiddenIntervalMs(): the same while the tab is hidden,
// or null to stop then (visibilitychange starts it again).
// onRooms(rooms): each answer's list. onState(ok): whether the last try worked.
export function createRoomsFeed({ url, intervalMs, hiddenIntervalMs = () => null, onRooms, onState }) {
  let timer = null;
  let inFlight = false;
  let again = false; // asked for while a request was in flight

  function schedule(ms) {
    clearTimeout(timer);
    timer = setTimeout(refresh, ms);
  }

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (inFlight) {
      // One request at a time: an answer that overtook a newer one would
      // show older counts.
      again = true;
      return;
    }
    if (document.hidden && hiddenIntervalMs() === null) return;
    inFlight = true;
    try {
      const response = await fetch(url, {
        headers: { Accept: "application/json" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok) throw new Error("HTTP " + response.status);
      onRooms((await response.json()).rooms);
      onState(true);
    } catch (err) {
      console.warn("room list refresh failed", err);
      onState(false);
    } finally {
      inFlight = false;
    }
    if (again) {
      again = false;
      refresh();
      return;
    }
    const every = document.hidden ? hiddenIntervalMs() : intervalMs();
    if (!timer && every !== null) schedule(every);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });

  return {
    start: refresh,
    // Asks for the list again shortly: something changed that the page
    // cannot work out by itself (a room read up to a seq in another tab).
    soon() {
      if (inFlight) again = true;
      else schedule(SOON_MS);
    },
  };
}
