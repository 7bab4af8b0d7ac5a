// Classify page: photos dropped, pasted or picked are sent one per request to POST /v1/classify (two at a time),
// and each card shows its result as soon as it comes back.
"use strict";
(() => {
  const {request, el, topkTable, say} = invsort;
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  const results = document.getElementById("results");
  const msg = document.getElementById("classify-msg");
  const CONCURRENT = 2;
  const waiting = [];
  let running = 0;

  function show(card, result) {
    card.dataset.status = result.status;
    card.dataset.category = result.category || "";
    card.dataset.confidence = result.confidence === null ? "" : String(result.confidence);
    card.querySelector(".info").replaceWith(el("div", {class: "info"},
      el("div", {class: "name", title: result.filename}, result.filename),
      el("div", {class: "category"}, result.category || "—"),
      el("div", {}, el("span", {class: "badge " + result.status}, result.status), " ",
        result.confidence === null ? "" : "confidence " + result.confidence.toFixed(3)),
      result.error ? el("div", {class: "error-text"}, result.error) : null));
    if (result.topk.length) card.append(topkTable(result.topk));
  }

  async function classify(file, card) {
    const form = new FormData();
    form.append("file", file, file.name || "pasted.png");
    try {
      const body = await request("/v1/classify", {method: "POST", body: form});
      show(card, body.results[0]);
    } catch (err) {
      card.dataset.status = "error";
      card.querySelector(".info").append(el("div", {class: "error-text"}, err.message));
    }
  }

  function pump() {
    while (running < CONCURRENT && waiting.length) {
      const [file, card] = waiting.shift();
      running += 1;
      classify(file, card).finally(() => { running -= 1; pump(); });
    }
  }

  function add(files) {
    const photos = Array.from(files).filter((f) => f.size > 0 || f.type.startsWith("image/"));
    if (!photos.length) { say(msg, "No photo in what was given.", true); return; }
    say(msg, photos.length + (photos.length === 1 ? " photo" : " photos") + " added.");
    for (const file of photos) {
      const img = el("img", {class: "thumb", alt: ""});
      img.src = URL.createObjectURL(file);
      img.addEventListener("load", () => URL.revokeObjectURL(img.src), {once: true});
      const card = el("li", {class: "card", dataset: {status: "pending", name: file.name}}, img,
        el("div", {class: "info"}, el("div", {class: "name", title: file.name}, file.name || "pasted photo"),
          el("div", {class: "muted"}, "sorting…")));
      results.append(card);
      waiting.push([file, card]);
    }
    pump();
  }

  input.addEventListener("change", () => { add(input.files); input.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); add(e.dataTransfer.files); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  document.addEventListener("paste", (e) => {
    const files = e.clipboardData ? e.clipboardData.files : [];
    if (files.length) { e.preventDefault(); add(files); }
  });
})();
