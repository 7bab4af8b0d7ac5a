// Jobs page: start a job (POST /v1/jobs), the latest jobs polled from GET /v1/jobs (every second while one is
// running, else every 5 s), cancel (POST /v1/jobs/{id}/cancel), a job's failures with their reasons.
"use strict";
(() => {
  const {base, request, postJson, el, say} = invsort;
  const form = document.getElementById("job-form");
  const msg = document.getElementById("job-msg");
  const body = document.querySelector("#jobs tbody");
  const failures = document.getElementById("failures");
  const ACTIVE = ["listing", "running"];
  let timer = null;

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

  function row(job) {
    return el("tr", {dataset: {jobId: job.id, status: job.status}},
      el("td", {title: job.id}, el("code", {}, job.id.slice(0, 8))),
      el("td", {class: "id", title: job.source}, job.source),
      el("td", {}, el("span", {class: "badge " + job.status}, job.status),
        job.error ? el("div", {class: "error-text"}, job.error) : null),
      el("td", {}, progress(job)),
      el("td", {class: "num sorted"}, job.sorted_count),
      el("td", {class: "num needs-review"}, job.needs_review_count),
      el("td", {class: "num failed"}, job.failed_count),
      el("td", {class: "muted"}, when(job.started_at || job.created_at)),
      actions(job));
  }

  async function refresh() {
    clearTimeout(timer);
    let delay = 5000;
    try {
      const answer = await request("/v1/jobs?limit=20");
      body.replaceChildren(...answer.jobs.map(row));
      if (!answer.jobs.length) body.append(el("tr", {}, el("td", {colspan: 9, class: "empty"}, "No jobs yet.")));
      if (answer.jobs.some((j) => ACTIVE.includes(j.status))) delay = 1000;
    } catch (err) {
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
    } catch (err) {
      say(msg, err.message, true);
    }
    refresh();
  });

  refresh();
})();
