"""A small self-contained upload page at `/`, so a browser next to the line can try the agent.

No external scripts, styles or fonts: plants are often offline. It scales a photo down in the
browser before sending it (as the station page will), and shows the answer with the knowledge
base entry and the time per stage.
"""

INDEX_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Lineside edge agent</title>
<style>
body{font-family:system-ui,sans-serif;margin:1rem auto;max-width:40rem;padding:0 1rem;color:#222}
h1{font-size:1.3rem} select,input,button{font-size:1rem;margin:.3rem 0}
#out{margin-top:1rem} .label{font-size:1.6rem;font-weight:600} .sev{padding:.1rem .4rem;
border-radius:.3rem;background:#eee} .err{color:#a00} small{color:#666}
</style></head><body>
<h1>Lineside edge agent</h1>
<p>Photograph or choose a part photo; the box classifies it here, nothing leaves the plant.</p>
<form id="f"><label>Model <select id="model"></select></label><br>
<input id="file" type="file" accept="image/*" capture="environment" required><br>
<button>Classify</button></form>
<div id="out"></div>
<p><small><a href="/readyz">readiness</a> · <a href="/metrics">metrics</a> ·
<a href="/openapi.json">OpenAPI</a></small></p>
<script>
const out = document.getElementById("out");
const esc = s => String(s).replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";");
fetch("/v1/models").then(r => r.json()).then(d => {
  for (const m of d.models) {
    const o = document.createElement("option"); o.value = m.name;
    o.textContent = m.name + (m.version ? " v" + m.version : "") + " (" + m.status + ")";
    document.getElementById("model").appendChild(o);
  }
});
async function shrink(file, side) {
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, side / Math.min(bitmap.width, bitmap.height));
  if (scale === 1) return file;
  const c = document.createElement("canvas");
  c.width = Math.round(bitmap.width * scale); c.height = Math.round(bitmap.height * scale);
  c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
  return await new Promise(ok => c.toBlob(ok, "image/jpeg", 0.9));
}
document.getElementById("f").onsubmit = async e => {
  e.preventDefault();
  const file = document.getElementById("file").files[0];
  const model = document.getElementById("model").value;
  out.textContent = "classifying…";
  let body = file;
  try { body = await shrink(file, 1024); } catch (_) {}
  const r = await fetch("/v1/models/" + encodeURIComponent(model) + "/predict",
    {method: "POST", headers: {"Content-Type": body.type || "image/jpeg"}, body});
  const d = await r.json();
  if (!r.ok) { out.innerHTML = '<p class="err">' + esc(d.error.message) + "</p>"; return; }
  const k = d.knowledge || {};
  const list = xs => (xs || []).map(x => "<li>" + esc(x) + "</li>").join("");
  out.innerHTML = '<div class="label">' + esc(k.title || d.label) + " " +
    (d.score * 100).toFixed(1) + '%</div><span class="sev">' + esc(k.severity || "") +
    "</span><h3>Likely causes</h3><ol>" + list(k.root_causes) +
    "</ol><h3>What to do</h3><ol>" + list(k.corrective_actions) + "</ol><p><small>" +
    d.top_k.map(t => esc(t.label) + " " + (t.score * 100).toFixed(1) + "%").join(" · ") +
    "<br>" + Object.entries(d.timings_ms).map(([s, v]) => s + " " + v.toFixed(1) + " ms")
    .join(" · ") + "<br>request " + esc(d.request_id) + "</small></p>";
};
</script></body></html>
"""
