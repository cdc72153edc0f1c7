// Who is in the room: the server's pages of the member list (the first in
// `welcome`, the rest on "Show more"), kept live by presence diffs, and the
// server's count of them all.

// "bob", "bob and carol", "bob, carol and dave", "bob, carol and 3 others".
export function namesSummary(names) {
  const sorted = names.slice().sort();
  if (sorted.length === 1) return sorted[0];
  if (sorted.length <= 3) return sorted.slice(0, -1).join(", ") + " and " + sorted[sorted.length - 1];
  const others = sorted.length - 2;
  return sorted.slice(0, 2).join(", ") + " and " + others + " others";
}

// me: this page's user. send(frame) -> bool and isReady(): the connection's.
// listEl, countEl, moreButton: the list, its count, its "Show more" control.
// Each other name links to a direct message with them: listEl's
// data-direct-url, with __name__ for the name.
export function createMembers({ me, send, isReady, listEl, countEl, moreButton }) {
  const directUrl = listEl.dataset.directUrl || "";
  const members = new Set(); // the names listed (the server's pages, and joins since)
  let total = 0; // the server's count of users in the room
  let more = false; // names after `cursor` are not loaded yet
  let cursor = null; // the last name of the pages the server sent
  let after = null; // the `after` of the `members` request in flight

  function render() {
    const items = Array.from(members)
      .sort()
      .map((name) => {
        const item = document.createElement("li");
        if (name !== me && directUrl) {
          const link = document.createElement("a");
          link.href = directUrl.replace("__name__", encodeURIComponent(name));
          link.textContent = name;
          link.title = "Message " + name + " directly";
          item.append(link);
        } else {
          item.textContent = name;
        }
        if (name === me) {
          item.className = "own";
          const you = document.createElement("span");
          you.className = "you";
          you.textContent = "you";
          item.append(" ", you);
        }
        return item;
      });
    listEl.replaceChildren(...items);
    countEl.textContent = String(total);
    renderMore();
  }

  function renderMore() {
    moreButton.hidden = !more;
    // Not `disabled`: a disabled button loses the keyboard focus. A click
    // while a page is on its way, or while offline, does nothing.
    moreButton.setAttribute("aria-disabled", String(after !== null || !isReady()));
    listEl.setAttribute("aria-busy", String(after !== null));
    const left = total - members.size;
    moreButton.textContent = left > 0 ? "Show " + left + " more" : "Show more";
  }

  function loadMore() {
    if (!more || after !== null || !isReady()) return;
    // After the last name of the server's pages, not the last one listed:
    // a name that joined since may sort after names not loaded yet.
    after = cursor;
    if (!send({ type: "members", after: after })) after = null;
    renderMore();
  }

  moreButton.addEventListener("click", loadMore);

  return {
    // Called with a `welcome`: its first page replaces the list.
    welcome(frame) {
      const names = Array.isArray(frame.members) ? frame.members : [];
      members.clear();
      names.forEach((name) => members.add(name));
      // The first page may not reach this user's own name.
      members.add(me);
      cursor = names.length ? names[names.length - 1] : null;
      more = Boolean(frame.members_more) && cursor !== null;
      after = null;
      total = Number.isInteger(frame.member_count) ? frame.member_count : members.size;
      render();
    },
    // Applies a presence diff; returns the names to announce as {joined, left}.
    // A diff is idempotent: a join of someone listed, or a leave of someone
    // who is not, changes nothing and says nothing. While the list is not
    // fully loaded, a name not listed may be further down it, so the
    // server's word is taken for the notice.
    presence(frame) {
      const joined = [];
      const left = [];
      (Array.isArray(frame.joins) ? frame.joins : []).forEach((name) => {
        if (typeof name !== "string" || members.has(name)) return;
        members.add(name);
        if (name !== me) joined.push(name);
      });
      (Array.isArray(frame.leaves) ? frame.leaves : []).forEach((name) => {
        if (typeof name !== "string" || name === me) return; // this socket is open
        if (members.delete(name) || more) left.push(name);
      });
      if (Number.isInteger(frame.members)) total = frame.members;
      render();
      return { joined, left };
    },
    // Called with a `members` answer: the next page.
    page(frame) {
      if (after === null || frame.after !== after) return;
      after = null;
      const names = Array.isArray(frame.members) ? frame.members : [];
      const known = members.size;
      names.forEach((name) => members.add(name));
      if (names.length) cursor = names[names.length - 1];
      more = Boolean(frame.has_more) && names.length > 0;
      const hadFocus = document.activeElement === moreButton;
      render();
      // Pages that bring only names listed already (they joined since the
      // welcome) are not worth a click: ask for the next one at once.
      if (more && (members.size === known || members.size >= total)) {
        loadMore();
        return;
      }
      // The control goes away with the last page: keep keyboard users in the list.
      if (hadFocus && moreButton.hidden) listEl.focus();
    },
    // Called when the request in flight will never be answered.
    forget() {
      after = null;
      renderMore();
    },
  };
}
