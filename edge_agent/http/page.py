"""The technician's station page at `/`: snap a photo, see the answer, confirm or correct it.

Self-contained (no external scripts, styles or fonts: the line may have no internet), small, and
usable on a phone or a desktop with keyboard and screen reader. The photo is scaled down in the
browser to about 2 megapixels before upload. The answer shows the class, confidence, alternatives,
root causes and corrective actions, and streams the explanation when the model has an explainer.
An anomaly answer (an anomaly bundle's, or a classifier's gate's) is drawn over the photo: the
score map colour-mapped on a canvas and the regions outlined.
One tap confirms; correcting picks one of the model's labels, with an optional note. Recent
feedback at this station is listed below. When the agent has an admin token, the page asks for it
once and keeps it in the browser's local storage.

The page is served with a Content-Security-Policy that allows its own inline script and style by
hash and nothing else from anywhere (`PAGE_HEADERS`), must not be framed, and is never sniffed.
"""

import base64
import hashlib
import re

INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lineside station</title>
<style>
:root{color-scheme:light dark}
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:44rem;padding:.8rem;line-height:1.4}
h1{font-size:1.25rem;margin:.2rem 0 .6rem} h2{font-size:1.05rem;margin:1rem 0 .3rem}
label{display:block;margin:.4rem 0 .1rem;font-weight:600}
select,input,button,textarea{font-size:1rem;padding:.45rem;max-width:100%}
button{cursor:pointer;border:2px solid #245;border-radius:.4rem;background:#245;color:#fff;margin:.2rem .2rem .2rem 0}
button.secondary{background:transparent;color:inherit}
button:focus,select:focus,input:focus,textarea:focus{outline:3px solid #f90;outline-offset:2px}
#preview{max-width:100%;max-height:16rem;display:none;border-radius:.3rem;margin-top:.5rem}
.label{font-size:1.6rem;font-weight:700} .sev{padding:.1rem .5rem;border-radius:.3rem;border:1px solid}
.err{color:#b00020;font-weight:600} small,.muted{opacity:.8}
ol,ul{padding-left:1.3rem} #history li{margin:.2rem 0}
</style></head><body>
<main>
<h1>Lineside station</h1>
<form id="photo-form">
  <label for="model">Model</label><select id="model" required></select>
  <label for="file">Photo of the part</label>
  <input id="file" type="file" accept="image/*" capture="environment" required>
  <img id="preview" alt="The photo being inspected">
  <label for="note">Note for the explanation (optional)</label>
  <input id="note" type="text" maxlength="500" autocomplete="off">
  <div><button id="classify">Classify</button></div>
</form>
<section id="result" aria-live="polite"></section>
<section id="feedback" hidden>
  <h2>Is this right?</h2>
  <button id="confirm" type="button">Yes, confirm</button>
  <button id="reject" type="button" class="secondary">Not a valid photo</button>
  <form id="correct-form">
    <label for="correct-label">No, it is</label><select id="correct-label"></select>
    <label for="correct-note">Note (optional)</label>
    <input id="correct-note" type="text" maxlength="500" autocomplete="off">
    <label for="station">Station</label><input id="station" type="text" maxlength="100">
    <div><button>Send correction</button></div>
  </form>
</section>
<p id="feedback-status" aria-live="polite"></p>
<section><h2>Recent inspections at this box</h2><ul id="history"></ul></section>
<p><small><a href="/readyz">readiness</a> · <a href="/metrics">metrics</a> ·
<a href="/openapi.json">API</a></small></p>
</main>
<script>
"use strict";
const $ = id => document.getElementById(id);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";");
let models = {}, current = null;
$("station").value = localStorage.getItem("lineside-station") || "";

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const token = localStorage.getItem("lineside-token");
  if (token) h["Authorization"] = "Bearer " + token;
  return h;
}

fetch("/v1/models").then(r => r.json()).then(d => {
  for (const m of d.models) {
    if (!m.labels) continue;
    models[m.name] = m;
    const o = document.createElement("option");
    o.value = m.name; o.textContent = m.name + (m.version ? " v" + m.version : "") + " (" + m.status + ")";
    $("model").appendChild(o);
  }
});

async function shrink(file) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, Math.sqrt(2e6 / (bitmap.width * bitmap.height)));
  if (scale === 1) return file;
  const c = document.createElement("canvas");
  c.width = Math.round(bitmap.width * scale); c.height = Math.round(bitmap.height * scale);
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  return await new Promise(ok => c.toBlob(ok, "image/jpeg", 0.9));
}

$("file").onchange = () => {
  const f = $("file").files[0];
  if (f) { $("preview").src = URL.createObjectURL(f); $("preview").style.display = "block"; }
};

const list = xs => (xs || []).map(x => "<li>" + esc(x) + "</li>").join("");

$("photo-form").onsubmit = async e => {
  e.preventDefault();
  const file = $("file").files[0], model = $("model").value;
  $("result").textContent = "Classifying…"; $("feedback").hidden = true;
  let body = file;
  try { body = await shrink(file); } catch (_) {}
  const note = $("note").value.trim();
  const url = "/v1/models/" + encodeURIComponent(model) + "/predict" + (note ? "?note=" + encodeURIComponent(note) : "");
  const r = await fetch(url, {method: "POST", headers: {"Content-Type": body.type || "image/jpeg"}, body});
  const d = await r.json();
  if (!r.ok) { $("result").innerHTML = '<p class="err">' + esc(d.error.message) + "</p>"; return; }
  current = d;
  const k = d.knowledge || {};
  const found = d.score_map ? d : (d.anomaly && d.anomaly.score_map ? d.anomaly : null);
  const headline = d.verdict ? esc(d.verdict) + " — score " + d.score.toFixed(2) + " (threshold " + d.threshold.toFixed(2) + ")"
    : esc(k.title || d.label) + " — " + (d.score * 100).toFixed(1) + "%";
  $("result").innerHTML = '<p class="label" id="answer-label">' + headline +
    (found ? '</p><p id="anomaly-line">Anomaly check: <strong>' + esc(found.verdict) + "</strong>, " +
      found.regions.length + (found.regions.length === 1 ? " region" : " regions") +
      '</p><canvas id="heatmap" role="img" aria-label="The photo with where it differs from good parts"></canvas><p>' : "") +
    '</p><p><span class="sev">severity: ' + esc(k.severity || "n/a") +
    '</span> <span class="muted">class ' + esc(d.label) + "</span></p>" +
    "<h2>Likely causes</h2><ol>" + list(k.root_causes) + "</ol>" +
    "<h2>What to do</h2><ol>" + list(k.corrective_actions) + "</ol>" +
    '<p class="muted">Alternatives: ' + d.top_k.slice(1).map(t => esc(t.label) + " " + (t.score * 100).toFixed(1) + "%").join(", ") + "</p>" +
    '<div id="explanation"></div><p><small>request ' + esc(d.request_id) + " · " +
    Object.entries(d.timings_ms).map(([s, v]) => s + " " + v.toFixed(0) + " ms").join(" · ") + "</small></p>";
  const sel = $("correct-label"); sel.innerHTML = "";
  for (const l of (models[model] || {}).labels || []) {
    if (l === d.label) continue;
    const o = document.createElement("option"); o.value = l; o.textContent = l; sel.appendChild(o);
  }
  if (found) drawHeatmap(body, found, d.image).catch(() => {});
  $("feedback").hidden = false; $("feedback-status").textContent = "";
  if (d.explanation && d.explanation.status === "pending") streamExplanation(d.explanation.url);
  else if (d.explanation) $("explanation").innerHTML = '<p class="muted">Explanation unavailable: ' + esc(d.explanation.reason) + "</p>";
};

// The score map over the photo: blue well below the threshold, green at it, red above; the
// regions (in the photo's pixels) outlined in white.
async function drawHeatmap(file, found, image) {
  const bitmap = await createImageBitmap(file);
  const c = $("heatmap"), scale = Math.min(1, 640 / Math.max(bitmap.width, bitmap.height));
  c.width = Math.round(bitmap.width * scale); c.height = Math.round(bitmap.height * scale);
  c.style.maxWidth = "100%";
  const g = c.getContext("2d");
  g.drawImage(bitmap, 0, 0, c.width, c.height);
  const [rows, cols] = found.score_map.size, values = found.score_map.values, t = found.threshold;
  const cw = c.width / cols, ch = c.height / rows;
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) {
    const level = Math.max(0, Math.min(1, (values[i][j] / t - 0.8) / 0.4));
    g.fillStyle = "hsla(" + Math.round((1 - level) * 240) + ",100%,50%," + (0.15 + 0.35 * level).toFixed(2) + ")";
    g.fillRect(j * cw, i * ch, cw + 0.5, ch + 0.5);
  }
  g.strokeStyle = "#fff"; g.lineWidth = 2;
  const sx = c.width / image.width, sy = c.height / image.height;
  for (const r of found.regions) g.strokeRect(r.x * sx, r.y * sy, r.width * sx, r.height * sy);
  c.dataset.regions = String(found.regions.length);
}

function streamExplanation(url) {
  const box = $("explanation");
  box.innerHTML = "<h2>Explanation</h2><p id='explanation-text' class='muted'>…</p>";
  const source = new EventSource(url);
  let text = "";
  source.onmessage = ev => {
    const e = JSON.parse(ev.data);
    if (e.text) { text += e.text; $("explanation-text").textContent = text; }
    if (e.done) { source.close(); if (!text) $("explanation-text").textContent = "Explanation unavailable" + (e.reason ? ": " + e.reason : ""); }
  };
  source.onerror = () => source.close();
}

async function send(verdict, label, note) {
  if (!current) return;
  const station = $("station").value.trim();
  localStorage.setItem("lineside-station", station);
  const payload = {request_id: current.request_id, verdict, corrected_label: label || null, note: note || null, station: station || null};
  let r = await fetch("/v1/feedback", {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(payload)});
  if (r.status === 401) {
    const token = prompt("This box needs its admin token to accept feedback:");
    if (!token) return;
    localStorage.setItem("lineside-token", token);
    r = await fetch("/v1/feedback", {method: "POST", headers: headers({"Content-Type": "application/json"}), body: JSON.stringify(payload)});
  }
  const d = await r.json();
  $("feedback-status").innerHTML = r.ok ? "Thank you — recorded (" + esc(d.verdict) + ")." : '<span class="err">' + esc(d.error.message) + "</span>";
  if (r.ok) { $("feedback").hidden = true; loadHistory(); }
}
$("confirm").onclick = () => send("confirmed");
$("reject").onclick = () => send("rejected");
$("correct-form").onsubmit = e => { e.preventDefault(); send("corrected", $("correct-label").value, $("correct-note").value.trim()); };

async function loadHistory() {
  const r = await fetch("/v1/feedback?limit=10", {headers: headers()});
  if (!r.ok) return;
  const d = await r.json();
  $("history").innerHTML = d.feedback.map(f => "<li>" + new Date(f.created_at * 1000).toLocaleTimeString() + " — " +
    esc(f.prediction.label) + (f.verdict === "corrected" ? " → <strong>" + esc(f.corrected_label) + "</strong>" : " (" + esc(f.verdict) + ")") +
    (f.station ? " · " + esc(f.station) : "") + "</li>").join("") || "<li class='muted'>none yet</li>";
}
loadHistory();
</script></body></html>
"""


def _inline_hashes(tag: str) -> str:
    """CSP sources for each inline `<tag>` of the page, by the SHA-256 of its text."""
    found = re.findall(rf"<{tag}>(.*?)</{tag}>", INDEX_HTML, flags=re.DOTALL)
    return " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
        for text in found
    )


CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        f"script-src {_inline_hashes('script')}",
        f"style-src {_inline_hashes('style')}",
        "img-src 'self' blob: data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
