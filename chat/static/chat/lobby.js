// The lobby page: the room list with each room's unread and mention counts,
// refreshed every few seconds while the tab is visible (rooms.js polls the
// rooms URL), and the room-name form, checked with the server's rule before
// it is sent.
import { fullMatch, positiveNumber } from "./limits.js";
import { createRoomsFeed, renderCounts, reorder } from "./rooms.js";

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

// Called with the page's `.lobby` section; its data-* attributes carry the
// rooms URL, the refresh interval and the server's room-name rule.
export function initLobby(section) {
  initRoomList(section);
  initRoomForm(section);
}

function initRoomList(section) {
  const table = document.getElementById("rooms");
  const tbody = table.tBodies[0];
  const empty = document.getElementById("rooms-empty");
  const stateEl = document.getElementById("rooms-state");

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
    const label = document.createElement("span");
    label.className = "name";
    label.textContent = room.title;
    const counts = document.createElement("span");
    counts.className = "counts";
    link.append(label, " ", counts);
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
    const ordered = rooms.map((room) => {
      const row = rows.get(room.room) || newRow(room);
      const online = row.querySelector(".online");
      if (online.textContent !== String(room.online)) online.textContent = String(room.online);
      setActivity(row.querySelector(".activity") || row.cells[2], room.last_activity);
      renderCounts(row.querySelector(".counts"), room.unread, room.mentions);
      return row;
    });
    reorder(tbody, ordered);
    table.hidden = rooms.length === 0;
    empty.hidden = rooms.length !== 0;
  }

  const feed = createRoomsFeed({
    url: section.dataset.roomsUrl,
    // Read each time: a test may shorten it.
    intervalMs: () => positiveNumber(section, "refreshMs"),
    onRooms(rooms) {
      render(rooms);
      section.dataset.refreshed = String(Number(section.dataset.refreshed || 0) + 1);
    },
    onState(ok) {
      stateEl.textContent = ok ? "Updated live" : "Live updates paused: retrying…";
      stateEl.classList.toggle("stale", !ok);
    },
  });

  Array.from(tbody.rows).forEach((row) => {
    const time = row.querySelector("time");
    if (time) setActivity(time.parentElement, time.dateTime);
  });
  feed.start();
}

function initRoomForm(section) {
  // The server checks the name too (and explains it the same way); this only
  // saves a round trip, with the rule the server renders (chat/protocol.py).
  const roomName = fullMatch(section, "roomNamePattern");
  const form = document.getElementById("room-form");
  const nameInput = form.querySelector("input[name=name]");
  const nameError = document.getElementById("room-name-error");
  const rule = document.getElementById("room-name-help").textContent.trim();

  function nameProblem() {
    const name = nameInput.value.trim().toLowerCase();
    if (!name) return "Type a room name.";
    if (!roomName.test(name)) return "“" + nameInput.value.trim() + "” is not a room name. " + rule;
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
}

const section = document.querySelector(".lobby[data-rooms-url]");
if (section) initLobby(section);
