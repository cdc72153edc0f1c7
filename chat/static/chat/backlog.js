// History: older pages when the reader scrolls to the top (or clicks "Load
// older messages"), and the holes between seqs filled, with `history`
// requests of at most the server's CHAT_HISTORY_MAX messages. At most one
// request of each kind is in flight; the list is aria-busy while a page is.

const NEAR_TOP_PX = 80;
// Broadcasts posted through two workers can arrive a few milliseconds out of
// order. A hole is asked for only if it is still there after this long: else
// each overtaken broadcast would cost the server one query per page of the
// room.
const HOLE_GRACE_MS = 500;

// timeline: where messages go and which seqs were received. send(frame) ->
// bool and isReady(): the connection's. historyMax: the server's limit on a
// request (data-history-max).
export function createBacklog({
  timeline,
  send,
  isReady,
  historyMax,
  list,
  loadOlderButton,
  historyStart,
}) {
  let hasMore = false; // older messages exist before the first one shown
  let olderBefore = null; // the `before` of the page of older history in flight
  let holeBefore = null; // the `before` of the gap-filling request in flight
  let holeTimer = null; // a hole seen, to be asked for after HOLE_GRACE_MS

  function setHasMore(more) {
    hasMore = Boolean(more);
    loadOlderButton.hidden = !hasMore;
    historyStart.hidden = hasMore;
  }

  function loadOlder() {
    if (!hasMore || olderBefore !== null || !isReady()) return;
    const before = timeline.oldestSeq();
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

  function fillHole(before) {
    // One request for what lies between the oldest message shown and the
    // highest missing seq below `before`, or for its newest `historyMax`
    // when it is longer (the answer then asks for the rest). Deleted seqs
    // never come, so the answer then reaches further down.
    let missing = before - 1;
    while (missing > 0 && timeline.has(missing)) missing -= 1;
    const floor = timeline.oldestSeq();
    if (missing <= floor || holeBefore !== null) return;
    holeBefore = missing + 1;
    const limit = Math.min(missing - floor, historyMax);
    if (!send({ type: "history", before: holeBefore, limit: limit })) holeBefore = null;
  }

  list.addEventListener("scroll", maybeLoadOlder);
  loadOlderButton.addEventListener("click", loadOlder);

  return {
    setHasMore,
    // Returns true when older messages exist before the first one shown.
    hasMore: () => hasMore,
    maybeLoadOlder,
    // Called with the messages just shown: a seq whose predecessor never
    // came means a broadcast was lost or overtaken, or a resume fell short.
    // Asks for what still lies between after HOLE_GRACE_MS.
    checkGaps(added) {
      const floor = timeline.oldestSeq();
      const gaps = added.filter((m) => m.seq - 1 > floor && !timeline.has(m.seq - 1));
      if (!gaps.length || holeTimer !== null) return;
      holeTimer = setTimeout(() => {
        holeTimer = null;
        fillHole(timeline.lastSeq() + 1);
      }, HOLE_GRACE_MS);
    },
    // Called on a resumed socket: a hole whose request went with the last
    // socket is asked for again.
    refill() {
      fillHole(timeline.lastSeq() + 1);
    },
    // Called with a `history` answer: an older page, or a hole's contents.
    history(frame) {
      if (frame.before === olderBefore) {
        olderBefore = null;
        setHasMore(frame.has_more);
        list.removeAttribute("aria-busy");
        timeline.keepScroll(() => frame.messages.forEach(timeline.render));
        maybeLoadOlder();
        return;
      }
      timeline.keepScroll(() => frame.messages.forEach(timeline.render));
      if (frame.before === holeBefore) {
        holeBefore = null;
        // The answer holds every message from its first seq up to `before`:
        // a seq in between that did not come was deleted, and must not be
        // asked for again. Below the oldest shown, scrolling up asks.
        const floor = timeline.oldestSeq();
        const first = frame.messages.length ? frame.messages[0].seq : floor + 1;
        for (let seq = Math.max(first, floor + 1); seq < frame.before; seq++) {
          timeline.markSeen(seq);
        }
        fillHole(timeline.lastSeq() + 1);
      }
    },
    // Called when whatever is in flight will never be answered (the socket
    // is gone, or the server refused a request): it may be asked again.
    forget() {
      olderBefore = null;
      holeBefore = null;
      list.removeAttribute("aria-busy");
    },
  };
}
