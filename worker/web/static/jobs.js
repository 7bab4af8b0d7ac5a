// Jobs page: start a job (POST /v1/jobs), the latest jobs read from GET /v1/jobs (every second while one is
// running, else every 5 s), the job being followed (the one just started, else the newest running one) live from
// its event stream (GET /v1/jobs/{id}/events, an EventSource; polling again if the stream keeps failing), cancel
// (POST /v1/jobs/{id}/cancel), a job's failures with their reasons.
"use strict";
(() => {
  const {base, request, postJson, el, say} = invsort;
  const form = document.getElementById("job-form");
  const msg = document.getElementById("job-msg");
  const body = document.querySelector("#jobs tbody");
  const failures = document.getElementById("failures");
  const ACTIVE = ["listing", "running"];
  const MAX_STREAM_ERRORS = 3;  // errors in a row before the followed job is polled instead
  let timer = null;
  let generation = 0;  // of refresh(): an answer older than the latest request is dropped
  // the job followed by its event stream: {id, source (EventSource), errors, job (its latest state)}
  let followed = null;
  const polled = new Set();  // jobs whose stream failed: the list's polling follows them

  function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }

  function progress(job) {
    if (job.total_items === null) return el("span", {class: "muted"}, job.processed + " so far (listing)");
    return el("span", {}, el("progress", {max: Math.max(job.total_items, 1), value: job.processed}), " ",
      job.processed + " / " + job.total_items);
  }

  function link(href, text) { return el("a", {href: base + href}, text); }

  function actions(job) {
    const q = encodeURIComponent(job.id);
    const cell = el("td", {class: "actions"}, link("/catalog?job_id=" + q, "rows"), " ");
    if (job.needs_review_count) cell.append(link("/review?job_id=" + q, "review"), " ");
    if (job.failed_count) {
      const b = el("button", {type: "button", class: "show-failures"}, "failures");
      b.addEventListener("click", () => showFailures(job.id));
      cell.append(b, " ");
    }
    if (ACTIVE.includes(job.status)) {
      const b = el("button", {type: "button", class: "cancel"}, "cancel");
      b.addEventListener("click", () => cancel(job.id, b));
      cell.append(b);
    }
    return cell;
  }

  function isLive(job) { return followed !== null && followed.id === job.id && followed.errors < MAX_STREAM_ERRORS; }

  function row(job) {
    const live = isLive(job) && ACTIVE.includes(job.status);
    const dataset = {jobId: job.id, status: job.status};
    if (live) dataset.live = "events";
    return el("tr", {dataset},
      el("td", {title: job.id}, el("code", {}, job.id.slice(0, 8))),
      el("td", {class: "id", title: job.source}, job.source),
      el("td", {}, el("span", {class: "badge " + job.status}, job.status),
        live ? el("span", {class: "muted live", title: "updated as it changes (server-sent events)"}, " ●\u00a0live")
          : null,
        job.error ? el("div", {class: "error-text"}, job.error) : null),
      el("td", {}, progress(job)),
      el("td", {class: "num sorted"}, job.sorted_count),
      el("td", {class: "num needs-review"}, job.needs_review_count),
      el("td", {class: "num failed"}, job.failed_count),
      el("td", {class: "muted"}, when(job.started_at || job.created_at)),
      actions(job));
  }

  // the followed job's row, redrawn from its latest state (the list is read again when it is not shown yet)
  function showFollowed(job) {
    const old = body.querySelector(`tr[data-job-id="${CSS.escape(job.id)}"]`);
    if (old) old.replaceWith(row(job));
    else refresh();
  }

  function unfollow() {
    if (followed === null) return;
    followed.source.close();
    followed = null;
  }

  function follow(id) {
    if (followed !== null && followed.id === id) return;
    unfollow();
    if (typeof EventSource !== "function" || polled.has(id)) return;
    const source = new EventSource(base + "/v1/jobs/" + encodeURIComponent(id) + "/events");
    const me = {id, source, errors: 0, job: null};
    followed = me;
    source.addEventListener("message", (e) => {
      if (followed !== me) return;
      let job;
      try { job = JSON.parse(e.data); } catch (err) { return; }
      me.errors = 0;
      me.job = job;
      if (!ACTIVE.includes(job.status)) {  // its last event: close before the server does (no reconnect)
        unfollow();
        refresh();
      } else {
        showFollowed(job);
      }
    });
    source.addEventListener("error", () => {
      if (followed !== me) return;
      me.errors += 1;  // EventSource reconnects by itself (retry); after a few failures in a row, poll instead
      if (source.readyState === EventSource.CLOSED || me.errors >= MAX_STREAM_ERRORS) {
        polled.add(id);
        unfollow();
        refresh();
      }
    });
  }

  // the newer of the list's state of a job and its stream's (the list may be read just before an event)
  function latest(job) {
    if (followed === null || followed.id !== job.id || followed.job === null) return job;
    return followed.job.updated_at >= job.updated_at ? followed.job : job;
  }

  async function refresh() {
    clearTimeout(timer);
    const mine = ++generation;
    let delay = 5000;
    try {
      const answer = await request("/v1/jobs?limit=20");
      if (mine !== generation) return;  // a newer refresh is under way: it draws and sets the timer
      const jobs = answer.jobs.map(latest);
      body.replaceChildren(...jobs.map(row));
      if (!jobs.length) body.append(el("tr", {}, el("td", {colspan: 9, class: "empty"}, "No jobs yet.")));
      const active = jobs.filter((j) => ACTIVE.includes(j.status));
      if (followed === null) {
        const next = active.find((j) => !polled.has(j.id));  // newest first
        if (next) follow(next.id);
      }
      if (active.some((j) => !isLive(j))) delay = 1000;  // a job no stream follows is polled every second
    } catch (err) {
      if (mine !== generation) return;
      say(msg, "Jobs not read: " + err.message, true);
    }
    timer = setTimeout(refresh, delay);
  }

  async function cancel(id, button) {
    button.disabled = true;
    try {
      const answer = await postJson("/v1/jobs/" + encodeURIComponent(id) + "/cancel", {});
      say(msg, answer.message);
    } catch (err) {
      say(msg, err.message, true);
    }
    refresh();
  }

  async function showFailures(id) {
    const q = encodeURIComponent(id);
    const tbody = failures.querySelector("tbody");
    document.getElementById("failures-job").textContent = id;
    document.getElementById("failures-all").href = base + "/catalog?status=failed&job_id=" + q;
    try {
      const page = await request("/v1/items?status=failed&limit=50&job_id=" + q);
      tbody.replaceChildren(...page.items.map((it) => el("tr", {},
        el("td", {class: "id", title: it.item_id}, it.item_id), el("td", {class: "error-text"}, it.error || ""))));
      failures.hidden = false;
    } catch (err) {
      say(msg, err.message, true);
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const source = document.getElementById("source").value.trim();
    const limit = document.getElementById("limit").value;
    say(msg, "Starting…");
    try {
      const job = await postJson("/v1/jobs", limit ? {source, limit: Number(limit)} : {source});
      say(msg, "Job " + job.id + " started (" + job.mode + ": " + job.mode_reason + ").");
      follow(job.id);
    } catch (err) {
      say(msg, err.message, true);
    }
    refresh();
  });

  refresh();
})();
