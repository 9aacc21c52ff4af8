// Operator page. Every value from the gateway is inserted with textContent, never as HTML:
// agent-supplied strings (paths, params) reach this page.
"use strict";
let session = null;
let oldestShown = null;
// The pending list is paged by the API; the page asks for as many as it shows (100 more per
// "Show more", at most 1000), so the 3-second refresh stays one bounded request.
let approvalsShown = 100;

const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
async function api(path, opts = {}) {
  const headers = Object.assign({ "content-type": "application/json" }, opts.headers || {});
  if (session && opts.method && opts.method !== "GET") headers["x-uapk-csrf"] = session.csrf;
  const r = await fetch(path, Object.assign({ credentials: "same-origin" }, opts, { headers }));
  let body = null;
  const text = await r.text();
  try { body = JSON.parse(text); } catch (_) { body = text; }
  return { status: r.status, body };
}
function age(secs) {
  const s = Math.max(0, Math.floor(Date.now() / 1000) - secs);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  return Math.floor(s / 3600) + "h" + Math.floor((s % 3600) / 60) + "m";
}
function show(signedIn) {
  $("signin").hidden = signedIn;
  $("app").hidden = !signedIn;
  $("logout").hidden = !signedIn;
  $("who").textContent = signedIn ? session.key_id + " (" + session.role + ")" : "";
}
async function start() {
  const r = await api("/v1/session");
  if (r.status === 200) { session = r.body; show(true); refreshAll(); } else { show(false); }
}
async function refreshAll() { await Promise.all([loadStatus(), loadApprovals(), loadRecords(null)]); }

async function loadStatus() {
  const r = await api("/v1/status");
  if (r.status !== 200) return;
  $("tree-size").textContent = r.body.tree_size;
  $("checkpoint").textContent = r.body.checkpoint || "–";
  $("verified").textContent = r.body.verified_at ? r.body.verified_at + " (" + r.body.verified_entries + " entries)" : "–";
  $("key-id").textContent = r.body.key_id || "–";
}

async function loadApprovals() {
  const r = await api("/v1/approvals?status=pending&limit=" + approvalsShown);
  const tbody = $("approvals-table").querySelector("tbody");
  tbody.replaceChildren();
  const list = r.status === 200 ? r.body.approvals : [];
  $("approvals-empty").hidden = list.length > 0;
  $("approvals-more").hidden = !(r.status === 200 && r.body.next_cursor && approvalsShown < 1000);
  $("approvals-table").hidden = list.length === 0;
  for (const a of list) {
    const tr = el("tr");
    tr.dataset.id = a.id;
    tr.append(el("td", a.id), el("td", a.agent), el("td", a.action + " via " + a.connector));
    tr.append(requestCell(a));
    tr.append(el("td", Object.entries(a.params).map(([k, v]) => k + "=" + v).join(", ")));
    tr.append(el("td", a.reasons.map((x) => x.code + ": " + x.message).join("; ")));
    tr.append(el("td", age(a.created_at)));
    const actions = el("td");
    if (session.role === "approver" || session.role === "admin") {
      const ok = el("button", "Approve", "approve");
      ok.type = "button";
      ok.addEventListener("click", () => decide(a.id, "approve"));
      const no = el("button", "Deny", "deny");
      no.type = "button";
      no.addEventListener("click", () => decide(a.id, "deny"));
      actions.append(ok, " ", no);
    }
    tr.append(actions);
    tbody.append(tr);
  }
}

// Everything an approval's override is bound to: method, URL with query, the forwarded
// headers, and the body's hash and length. An approver sees exactly what will be sent.
function requestCell(a) {
  const td = el("td", null, "request");
  const port = a.port && !((a.scheme === "https" && a.port === 443) || (a.scheme === "http" && a.port === 80)) ? ":" + a.port : "";
  const url = (a.scheme || "https") + "://" + a.host + port + a.path + (a.query ? "?" + a.query : "");
  td.append(el("div", a.method + " " + url, "url"));
  const names = Object.keys(a.headers || {});
  if (names.length > 0) {
    const ul = el("ul", null, "headers");
    for (const n of names) for (const v of a.headers[n]) ul.append(el("li", n + ": " + v));
    td.append(ul);
  }
  td.append(el("div", a.body_sha256 ? "body: " + a.body_len + " bytes, sha256 " + a.body_sha256 : "body: none", "body"));
  return td;
}

async function decide(id, what) {
  const r = await api("/v1/approvals/" + encodeURIComponent(id) + "/" + what, { method: "POST", body: "{}" });
  $("action-result").textContent = r.status === 200 ? id + " " + (what === "approve" ? "approved" : "denied") : "failed: " + (r.body && r.body.error ? r.body.error : r.status);
  await refreshAll();
}

async function loadRecords(before) {
  const q = new URLSearchParams({ limit: "50" });
  if (before !== null) q.set("before", String(before));
  for (const [k, id] of [["agent", "f-agent"], ["decision", "f-decision"], ["connector", "f-connector"]]) {
    if ($(id).value) q.set(k, $(id).value);
  }
  const r = await api("/v1/records?" + q.toString());
  const tbody = $("records-table").querySelector("tbody");
  if (before === null) tbody.replaceChildren();
  if (r.status !== 200) return;
  for (const e of r.body.records) {
    const tr = el("tr", null, "clickable");
    tr.append(el("td", e.idx), el("td", e.ts), el("td", e.kind), el("td", e.agent), el("td", e.connector), el("td", e.action));
    tr.append(el("td", e.decision, e.decision), el("td", e.path));
    tr.addEventListener("click", () => openRecord(e.idx));
    tbody.append(tr);
    oldestShown = Number(e.idx);
  }
}

async function openRecord(idx) {
  const entry = await fetch("/v1/records/" + idx, { credentials: "same-origin" }).then((r) => r.text());
  $("detail-idx").textContent = idx;
  $("detail-entry").textContent = entry;
  const proof = await api("/v1/proof/inclusion?index=" + encodeURIComponent(idx));
  $("detail-proof").textContent = typeof proof.body === "string" ? proof.body : JSON.stringify(proof.body, null, 2);
  $("record-detail").hidden = false;
}

document.addEventListener("DOMContentLoaded", () => {
  $("signin-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await api("/v1/session", { method: "POST", body: JSON.stringify({ key: $("key").value }) });
    $("key").value = "";
    if (r.status === 200) { session = r.body; $("signin-error").textContent = ""; show(true); refreshAll(); }
    else { $("signin-error").textContent = "Sign-in failed: " + (r.body && r.body.error ? r.body.error : r.status); }
  });
  $("logout").addEventListener("click", async () => { await api("/v1/session/logout", { method: "POST", body: "{}" }); session = null; show(false); });
  $("refresh").addEventListener("click", refreshAll);
  $("more-approvals").addEventListener("click", () => { approvalsShown = Math.min(1000, approvalsShown + 100); loadApprovals(); });
  $("filter").addEventListener("submit", (ev) => { ev.preventDefault(); loadRecords(null); });
  $("older").addEventListener("click", () => { if (oldestShown !== null && oldestShown > 0) loadRecords(oldestShown); });
  start();
  setInterval(() => { if (session) { loadApprovals(); loadStatus(); } }, 3000);
});
