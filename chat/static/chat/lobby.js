// The lobby page: the room list, refreshed every few seconds while the tab is
// visible (it polls the rooms URL), and the room-name form, checked with the
// server's rule before it is sent.
import { fullMatch, positiveNumber } from "./limits.js";

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
  const url = section.dataset.roomsUrl;
  const table = document.getElementById("rooms");
  const tbody = table.tBodies[0];
  const empty = document.getElementById("rooms-empty");
  const stateEl = document.getElementById("rooms-state");
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
    const every = positiveNumber(section, "refreshMs");
    if (!timer && !document.hidden) timer = setTimeout(refresh, every);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });

  Array.from(tbody.rows).forEach((row) => {
    const time = row.querySelector("time");
    if (time) setActivity(time.parentElement, time.dateTime);
  });
  refresh();
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
