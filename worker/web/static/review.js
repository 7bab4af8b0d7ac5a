// Review page, keyboard first: 1..9 (0 for the tenth) pick a category, Enter accepts the model's top-1, x marks
// "not a product / unknown", u undoes the last decision, a accepts the top-1 of every undecided row of the page,
// j/k or the arrows move. Decisions are sent in order, one at a time; the focus moves on at once.
"use strict";
(() => {
  const {postJson, say} = invsort;
  const config = JSON.parse(document.getElementById("review-config").textContent);
  const reviewer = document.getElementById("reviewer");
  const msg = document.getElementById("review-msg");
  const rows = Array.from(document.querySelectorAll("#queue .row"));
  const STORE = "invsort.reviewer";
  const history = [];  // decisions of this page, newest last: arrays of item ids
  let chain = Promise.resolve();
  let current = 0;

  reviewer.value = localStorage.getItem(STORE) || "";
  reviewer.addEventListener("input", () => localStorage.setItem(STORE, reviewer.value.trim()));

  function focusRow(i) {
    if (!rows.length) return;
    current = Math.max(0, Math.min(rows.length - 1, i));
    rows[current].focus();
    rows[current].scrollIntoView({block: "nearest"});
  }

  function nextUndecided(from) {
    for (let i = from + 1; i < rows.length; i++) if (rows[i].dataset.state === "needs_review") return i;
    return Math.min(from + 1, rows.length - 1);
  }

  function byId(id) { return rows.find((r) => r.dataset.itemId === id); }

  function render(state) {
    const row = byId(state.item_id);
    if (!row) return;
    row.dataset.state = state.status;
    row.dataset.category = state.category || "";
    const decision = row.querySelector(".decision");
    if (state.status === "reviewed") {
      decision.textContent = "→ " + (state.category || "not a product / unknown") + " (" + state.reviewed_by + ")";
    } else {
      decision.textContent = "";
    }
  }

  function name() {
    const value = reviewer.value.trim();
    if (!value) {
      say(msg, "Type your name in the Reviewer field first: every decision is stored with it.", true);
      reviewer.focus();
    }
    return value;
  }

  function mark(ids, from, to) {
    ids.forEach((id) => { const r = byId(id); if (r && r.dataset.state === from) r.dataset.state = to; });
  }

  // one request (its rows show "pending" from when it was typed until it answers)
  async function run(path, ids, body, who, record) {
    try {
      const answer = await postJson(path, Object.assign({reviewer: who}, body));
      const states = answer.rows || [answer.item];  // POST /v1/reviews answers with the item
      states.forEach(render);
      const decided = states.filter((r) => r.status === "reviewed").map((r) => r.item_id);
      if (record && decided.length) history.push(decided);
      say(msg, describe(path, answer.rows ? answer.changed : 1, ids.length));
    } catch (err) {
      mark(ids, "pending", "needs_review");
      say(msg, err.message, true);
    }
  }

  // decisions go one at a time, in the order they were typed
  function send(path, ids, body) {
    const who = name();
    if (who) {
      mark(ids, "needs_review", "pending");
      chain = chain.then(() => run(path, ids, body, who, true));
    }
    return Boolean(who);
  }

  function describe(path, changed, asked) {
    if (path.endsWith("/undo")) return changed ? "Undone." : "Nothing to undo.";
    if (path.endsWith("/accept")) return "Accepted " + changed + " of " + asked + ".";
    return "Saved.";
  }

  function decide(category) {
    const row = rows[current];
    if (row && send("/v1/reviews", [row.dataset.itemId], {item_id: row.dataset.itemId, category: category})) {
      focusRow(nextUndecided(current));
    }
  }

  function accept(targets) {
    const ids = targets.map((r) => r.dataset.itemId);
    if (!ids.length) { say(msg, "Nothing left to accept on this page."); return; }
    return send("/ui/review/accept", ids, {item_ids: ids});
  }

  function undo() {
    const who = name();
    if (!who) return;
    chain = chain.then(() => {
      const ids = history.pop();
      if (!ids) { say(msg, "Nothing to undo on this page."); return null; }
      const first = rows.indexOf(byId(ids[0]));
      if (first >= 0) focusRow(first);
      return run("/ui/review/undo", ids, {item_ids: ids}, who, false);
    });
  }

  const actions = {
    accept: () => { if (rows[current] && accept([rows[current]])) focusRow(nextUndecided(current)); },
    none: () => decide(null),
    undo: undo,
    "accept-page": () => accept(rows.filter((r) => r.dataset.state === "needs_review")),
  };

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const typing = e.target instanceof HTMLInputElement || e.target instanceof HTMLTextAreaElement ||
      e.target instanceof HTMLSelectElement;
    if (typing) {
      if (e.key === "Escape" || (e.key === "Enter" && e.target === reviewer)) { e.preventDefault(); focusRow(current); }
      return;
    }
    const clickable = e.target instanceof HTMLButtonElement || e.target instanceof HTMLAnchorElement;
    if (clickable && (e.key === "Enter" || e.key === " ")) return;  // a focused button or link does its own thing
    const key = e.key;
    let handled = true;
    if (Object.prototype.hasOwnProperty.call(config.keys, key)) decide(config.keys[key]);
    else if (key === "Enter") actions.accept();
    else if (key === "x" || key === "X") actions.none();
    else if (key === "u" || key === "U") actions.undo();
    else if (key === "a" || key === "A") actions["accept-page"]();
    else if (key === "j" || key === "ArrowDown") focusRow(current + 1);
    else if (key === "k" || key === "ArrowUp") focusRow(current - 1);
    else handled = false;
    if (handled) e.preventDefault();
  });

  rows.forEach((row, i) => row.addEventListener("click", () => focusRow(i)));
  document.querySelectorAll("[data-action]").forEach((b) => b.addEventListener("click", () => {
    actions[b.dataset.action]();
    if (document.activeElement === b) focusRow(current);
  }));
  document.querySelectorAll(".legend [data-category]").forEach((b) => b.addEventListener("click", () => {
    decide(b.dataset.category);
  }));
  if (rows.length) focusRow(0);
  if (!reviewer.value) reviewer.focus();
})();
