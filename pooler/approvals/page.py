"""The reviewers' page (served by gateway/approvals_http.py): one self-contained HTML file, no
build step, no outside resources. It signs in with a token (or an admin user's password), lists
pending requests with every fact the API gives, updates live from /api/events, and approves
(optionally as a grant) or denies with a reason."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>pooler: statements waiting for approval</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
 header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:16px;align-items:center}
 header h1{font-size:16px;margin:0;flex:1} main{padding:16px 18px;max-width:1100px}
 .card{background:#fff;border:1px solid #d8dce3;border-radius:6px;padding:12px 14px;margin:0 0 12px}
 .card h2{font-size:15px;margin:0 0 6px} .meta{color:#566; font-size:12px}
 pre{background:#f1f3f6;padding:8px;border-radius:4px;overflow:auto;white-space:pre-wrap}
 table{border-collapse:collapse} td{padding:1px 10px 1px 0;vertical-align:top} td:first-child{color:#566}
 button{padding:5px 12px;border-radius:4px;border:1px solid #888;background:#fff;cursor:pointer}
 button.approve{background:#1f7a3d;color:#fff;border-color:#1f7a3d} button.deny{background:#a32020;color:#fff;border-color:#a32020}
 input,select{padding:4px 6px} .err{color:#a32020} .state{font-weight:600} #signin .card{max-width:520px}
</style></head>
<body>
<header><h1>Statements waiting for approval</h1><span id="who"></span><span id="live" class="meta"></span></header>
<main>
<section id="signin" hidden><div class="card"><h2>Sign in</h2>
 <p><label>Token (OIDC/JWT with an approver group)<br><input id="token" size="60" autocomplete="off"></label></p>
 <p>or an admin console user: <input id="user" placeholder="user" size="12"> <input id="password" type="password" placeholder="password" size="16"></p>
 <button id="signin-btn">Sign in</button> <span id="signin-err" class="err"></span></div></section>
<section id="app" hidden>
 <p id="error" class="err"></p>
 <h2>Pending</h2><div id="pending"><p class="meta">none</p></div>
 <h2>Decided</h2><div id="decided"></div>
</section>
</main>
<script>
"use strict";
let auth = sessionStorage.getItem("pooler-auth") || "";
const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
async function api(path, opts = {}) {
  const r = await fetch(path, {...opts, headers: {"Authorization": auth, "Content-Type": "application/json"}});
  const body = await r.json().catch(() => ({error: r.statusText}));
  if (!r.ok) { if (r.status === 401) { showSignin(body.error); } throw new Error(body.error || r.statusText); }
  return body;
}
function showSignin(msg) { $("signin").hidden = false; $("app").hidden = true; $("signin-err").textContent = msg || ""; }
function params(r) {
  return r.params.length ? r.params.map((v, i) => "$" + (i + 1) + " = " + (v === null ? "NULL" : "'" + v + "'")).join("\n") : "";
}
function waited(r) { const s = Math.max(0, Math.round(r.waited)); return s < 120 ? s + " s" : Math.round(s / 60) + " min"; }
function preview(p) {
  if (!p) return "";
  if (p.state === "running") return '<p class="preview meta">dry run in progress\u2026</p>';
  if (p.state === "skipped") return '<p class="preview meta">not dry-run: ' + esc(p.why) + '</p>';
  if (p.state === "failed") return '<p class="preview err">dry run failed: ' + esc(p.error) + '</p>';
  return '<div class="preview"><p><b>dry run: ' + esc(p.rows) + ' row(s) would change</b> <span class="meta">(' + esc(p.note) + ')</span></p>' +
    '<table><tr>' + p.columns.map(c => '<td><b>' + esc(c) + '</b></td>').join("") + '</tr>' +
    p.sample.map(row => '<tr>' + row.map(v => '<td>' + (v === null ? '<i>NULL</i>' : esc(v)) + '</td>').join("") + '</tr>').join("") + '</table></div>';
}
function card(r) {
  const rows = [["who", r.user + (r.groups.length ? " (" + r.groups.join(", ") + ")" : "")],
    ["from", r.client_addr + (r.application_name ? " \u00b7 " + r.application_name : "")], ["database", r.database],
    ["rule", r.rule + ": " + r.reason], ["reads", r.tables_read.join(", ")], ["writes", r.tables_written.join(", ")],
    ["justification", r.justification], ["route", r.route + (r.in_transaction ? ", inside a transaction" : "")],
    ["approvals", r.approvals.length + " of " + r.required + (r.approvals.length ? " (" + r.approvals.map(a => a.by).join(", ") + ")" : "")],
    ["waited", waited(r)]];
  if (r.state !== "pending") rows.push(["outcome", r.state + (r.decided_by ? " by " + r.decided_by : "") + (r.outcome ? ": " + r.outcome : "") + (r.grant ? " (grant " + r.grant + ")" : "")]);
  let html = '<div class="card" id="req-' + esc(r.id) + '"><h2>request ' + esc(r.id) + ' <span class="state">' + esc(r.state) + '</span></h2>' +
    '<table>' + rows.filter(x => x[1]).map(x => '<tr><td>' + esc(x[0]) + '</td><td>' + esc(x[1]) + '</td></tr>').join("") + '</table>' +
    '<pre class="sql">' + esc(r.pretty_sql) + '</pre>' + (r.params.length ? '<pre class="params">' + esc(params(r)) + '</pre>' : "") +
    preview(r.preview);
  if (r.state === "pending") {
    html += '<p><button class="approve" data-id="' + esc(r.id) + '">Approve</button> <select class="grant" data-id="' + esc(r.id) + '">' +
      '<option value="">once</option><option>10 minutes</option><option>1 hour</option></select> ' +
      '<input class="reason" data-id="' + esc(r.id) + '" placeholder="reason for a denial" size="30"> ' +
      '<button class="deny" data-id="' + esc(r.id) + '">Deny</button> <span class="err" data-err="' + esc(r.id) + '"></span></p>';
  }
  return html + '</div>';
}
async function refresh() {
  const data = await api("/api/approvals");
  $("pending").innerHTML = data.pending.length ? data.pending.map(card).join("") : '<p class="meta">none</p>';
  $("decided").innerHTML = data.decided.slice(0, 30).map(card).join("");
}
document.addEventListener("click", async ev => {
  const b = ev.target.closest("button"); if (!b || !b.dataset.id) return;
  const id = b.dataset.id, err = document.querySelector('[data-err="' + id + '"]');
  try {
    if (b.classList.contains("approve")) {
      const g = document.querySelector('select.grant[data-id="' + id + '"]').value;
      await api("/api/approvals/" + id + "/approve", {method: "POST", body: JSON.stringify(g ? {for: g} : {})});
    } else {
      const reason = document.querySelector('input.reason[data-id="' + id + '"]').value;
      await api("/api/approvals/" + id + "/deny", {method: "POST", body: JSON.stringify({reason})});
    }
    await refresh();
  } catch (e) { if (err) err.textContent = e.message; }
});
async function live() {
  for (;;) {
    try {
      const r = await fetch("/api/events", {headers: {"Authorization": auth}});
      if (!r.ok) throw new Error("events: " + r.status);
      $("live").textContent = "live";
      const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = "";
      for (;;) {
        const {value, done} = await reader.read(); if (done) break;
        buf += dec.decode(value, {stream: true});
        let i; while ((i = buf.indexOf("\n\n")) >= 0) { const chunk = buf.slice(0, i); buf = buf.slice(i + 2); if (chunk.startsWith("event:")) await refresh().catch(() => {}); }
      }
    } catch (e) { $("live").textContent = "reconnecting"; }
    await new Promise(res => setTimeout(res, 1000));
  }
}
async function start() {
  try {
    const me = await api("/api/whoami");
    $("who").textContent = "signed in as " + me.name;
    $("signin").hidden = true; $("app").hidden = false;
    await refresh(); live();
  } catch (e) { showSignin(auth ? e.message : ""); }
}
$("signin-btn").addEventListener("click", () => {
  const t = $("token").value.trim();
  auth = t ? "Bearer " + t : "Basic " + btoa($("user").value + ":" + $("password").value);
  sessionStorage.setItem("pooler-auth", auth); start();
});
start();
</script>
</body></html>
"""
