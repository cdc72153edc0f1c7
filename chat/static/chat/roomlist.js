// The room page's list of the user's rooms, beside the conversation: the
// rooms they have read in (rooms.json's `member`) and this one, by name, each
// with its unread and mention badges, this one marked. rooms.json fills it
// (rooms.js polls it, less often while the tab is hidden); between polls a
// `mention` event counts up at once and a `read` event asks for the list
// again. This room's counts come from the page, which knows them first. On a
// phone the list folds away behind a button in the room's header.
import { createRoomsFeed, renderCounts, reorder } from "./rooms.js";

// A hidden tab still shows the total in its title, but need not be as quick.
const HIDDEN_SLOWER = 6;

// current: this room's slug. listEl: the <ul>; its items (this room's, from
// the template) are kept. panel, toggle: the list's container and the phone's
// button that opens it; totalEl: the button's badges. url: rooms.json.
// intervalMs(): the time between polls. onTotals({unread, mentions}): the
// totals of the rooms listed changed.
export function createRoomList({ current, listEl, panel, toggle, totalEl, url, intervalMs, onTotals }) {
  const rooms = new Map(); // slug -> the room as rooms.json gave it, counts kept live
  const readUpTo = new Map(); // slug -> the highest seq of a `read` event for it
  let here = { unread: 0, mentions: 0 }; // this room's counts, from the page
  let totals = null;

  function newItem(room) {
    const item = document.createElement("li");
    item.dataset.room = room.room;
    const link = document.createElement("a");
    link.href = room.url;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = room.title;
    name.title = room.title; // a long name is cut short
    const counts = document.createElement("span");
    counts.className = "counts";
    link.append(name, " ", counts);
    item.append(link);
    return item;
  }

  function render() {
    const items = new Map(Array.from(listEl.children, (item) => [item.dataset.room, item]));
    const listed = Array.from(rooms.values())
      .filter((room) => room.member || room.room === current)
      .sort((a, b) => (a.room < b.room ? -1 : a.room > b.room ? 1 : 0));
    let unread = 0;
    let mentions = 0;
    const ordered = listed.map((room) => {
      const item = items.get(room.room) || newItem(room);
      const counts = room.room === current ? here : room;
      renderCounts(item.querySelector(".counts"), counts.unread, counts.mentions);
      const link = item.querySelector("a");
      if (room.room === current) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
      item.classList.toggle("current", room.room === current);
      unread += counts.unread;
      mentions += counts.mentions;
      return item;
    });
    reorder(listEl, ordered);
    renderCounts(totalEl, unread, mentions);
    if (!totals || totals.unread !== unread || totals.mentions !== mentions) {
      totals = { unread, mentions };
      onTotals(totals);
    }
  }

  // This room's name as the template wrote it (#slug, or @name for a
  // direct message).
  const currentName = listEl.querySelector(".current .name");
  const currentTitle = currentName ? currentName.textContent : "#" + current;

  function thisRoom() {
    return {
      room: current,
      title: currentTitle,
      url: location.pathname,
      unread: 0,
      mentions: 0,
      member: true,
    };
  }

  function number(value) {
    return Number.isInteger(value) && value > 0 ? value : 0;
  }

  const feed = createRoomsFeed({
    url,
    intervalMs,
    hiddenIntervalMs: () => intervalMs() * HIDDEN_SLOWER,
    onRooms(list) {
      rooms.clear();
      for (const room of list) {
        rooms.set(room.room, {
          room: room.room,
          title: room.title,
          url: room.url,
          unread: number(room.unread),
          mentions: number(room.mentions),
          member: room.member === true,
        });
      }
      if (!rooms.has(current)) rooms.set(current, thisRoom());
      render();
    },
    onState(ok) {
      panel.classList.toggle("stale", !ok);
    },
  });

  function setOpen(open) {
    panel.classList.toggle("open", open);
    toggle.setAttribute("aria-expanded", String(open));
  }

  toggle.addEventListener("click", () => setOpen(!panel.classList.contains("open")));
  panel.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && panel.classList.contains("open")) {
      setOpen(false);
      toggle.focus();
    }
  });

  rooms.set(current, thisRoom());
  render();

  return {
    start: feed.start,
    // Called with this room's counts, whenever they change.
    setHere(counts) {
      here = counts;
      render();
    },
    // Called with a `read` event for another room: its counts are the
    // server's to tell.
    read(room, seq) {
      if (Number.isInteger(seq) && seq > (readUpTo.get(room) || 0)) readUpTo.set(room, seq);
      feed.soon();
    },
    // Called with a `mention` event for another room: one more unread
    // message, a mention, until the next poll says how many there are.
    mention(frame) {
      const room = rooms.get(frame.room);
      if (room && room.member) {
        room.unread += 1;
        room.mentions += 1;
        render();
      }
      feed.soon();
    },
    // Returns the highest seq that a `read` event said `room` was read up to.
    readUpTo: (room) => readUpTo.get(room) || 0,
    // Returns the page of `room`.
    urlOf(room) {
      const known = rooms.get(room);
      return known && known.url ? known.url : null;
    },
    // What a room is called (@name for a direct message), as rooms.json says.
    titleOf(room) {
      const known = rooms.get(room);
      return known && known.title ? known.title : "#" + room;
    },
  };
}
