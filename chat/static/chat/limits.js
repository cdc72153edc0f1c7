// The server's limits, as the page's template renders them from settings into
// data-* attributes. A missing or malformed one is a bug in the page, so it
// fails loudly here rather than falling back to a copy that drifts.

// Returns the positive number in `element.dataset[name]`.
export function positiveNumber(element, name) {
  const value = Number(element.dataset[name]);
  if (!(value > 0)) {
    throw new Error("data-" + kebab(name) + " must be a positive number, not " +
      JSON.stringify(element.dataset[name]));
  }
  return value;
}

// Returns `element.dataset[name]` as a regular expression that must match a
// whole string, as Python's re.fullmatch does on the server.
export function fullMatch(element, name) {
  const source = element.dataset[name];
  if (!source) throw new Error("data-" + kebab(name) + " is missing");
  return new RegExp("^(?:" + source + ")$");
}

function kebab(name) {
  return name.replace(/[A-Z]/g, (letter) => "-" + letter.toLowerCase());
}
