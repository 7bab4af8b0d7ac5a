// Shared by the pages: JSON requests to this server, small DOM helpers. Plain JavaScript, no build step.
"use strict";
const invsort = (() => {
  const base = document.body.dataset.base || "";
  // the session's CSRF token when the server asks for a token (INVSORT_API_TOKEN): sent with every unsafe request
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  // options with the X-CSRF-Token header added when the method is not GET/HEAD (the session cookie's requests
  // need it; a FormData or JSON body is left as it is)
  function withCsrf(options) {
    const method = ((options && options.method) || "GET").toUpperCase();
    if (!csrf || method === "GET" || method === "HEAD") return options;
    const headers = new Headers((options && options.headers) || {});
    headers.set("X-CSRF-Token", csrf);
    return Object.assign({}, options, {headers});
  }

  // fetch a path of this server; resolves to the parsed JSON, rejects with an Error of the server's detail
  async function request(path, options) {
    const response = await fetch(base + path, withCsrf(options));
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) {
      const detail = body && body.detail ? body.detail : response.status + " " + response.statusText;
      throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return body;
  }

  function postJson(path, data) {
    return request(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(data)});
  }

  // el("td", {class: "num", title: "x"}, "text", otherNode): text is always text, never HTML
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  // the top-5 as bars: topk is [[category, probability], ...]
  function topkTable(topk) {
    return el("table", {class: "topk"}, ...topk.map(([cat, p]) => el("tr", {},
      el("td", {class: "cat"}, cat),
      el("td", {}, el("meter", {min: 0, max: 1, value: p})),
      el("td", {class: "num"}, (p * 100).toFixed(1) + " %"))));
  }

  function say(node, text, isError) {
    node.textContent = text;
    node.classList.toggle("error", Boolean(isError));
  }

  return {base, csrf, withCsrf, request, postJson, el, topkTable, say};
})();
