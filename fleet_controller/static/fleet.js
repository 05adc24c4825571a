// The fleet page's script (fleet_controller/page.py): asks for the API token, keeps it in this
// tab's session storage, reads the JSON API with it every few seconds and renders with DOM calls
// (never innerHTML, so nothing a box reports can become markup). No framework, no other origin.
"use strict";

const TOKEN_KEY = "lineside-fleet-token";
const REFRESH_MS = 5000;
const PAGE_SIZE = 50;
const ACTIVE = new Set(["running", "paused", "halted", "rolling_back"]);
const FINAL = new Set(["committed", "refused", "rolled_back", "timed_out", "ignored"]);
const COMMANDS = [
  ["pause", "Pause", ["running"],
    "No further notices go out until it is resumed; boxes already updating carry on."],
  ["resume", "Resume", ["paused"], "The rollout goes on from where it stood."],
  ["halt", "Halt", ["running", "paused"],
    "The rollout stops for good. If its plan rolls back on halt, every box that received the release is rolled back."],
  ["rollback", "Roll back", ["running", "paused", "halted", "completed", "cancelled"],
    "Signed rollback notices go to every box that received the release."],
];

const $ = (id) => document.getElementById(id);
const view = { offset: 0, open: new Set(), closed: new Set(), timer: 0, shown: {}, pending: null };

class AuthError extends Error {}

// ---- the DOM, safely --------------------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === false || value === null || value === undefined) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function replaceChildren(node, children) {
  const key = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.key : null;
  node.replaceChildren(...children);
  if (key) refocus(key);
}

function refocus(key) {
  if (!key) return;
  const target = document.querySelector(`[data-key="${CSS.escape(key)}"]`);
  if (target && document.activeElement !== target) target.focus({ preventScroll: true });
}

const fmt = (value) => (value === null || value === undefined ? "—"
  : typeof value === "number" ? String(Math.round(value * 1000) / 1000) : String(value));

function ago(iso) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((Date.now() - Date.parse(iso)) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  if (s < 129600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} days ago`;
}

// ---- the API ----------------------------------------------------------------------------------
async function api(path, options) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) throw new AuthError("no token");
  const init = Object.assign({ cache: "no-store" }, options || {});
  init.headers = Object.assign({ Authorization: `Bearer ${token}` }, init.headers || {});
  const response = await fetch(path, init);
  if (response.status === 401) throw new AuthError("the controller refused the token");
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function overviewQuery() {
  const params = new URLSearchParams();
  for (const name of ["site", "line", "group", "profile"]) {
    const value = $(`f-${name}`).value;
    if (value) params.set(name, value);
  }
  params.set("state", $("f-state").value);
  const q = $("f-q").value.trim();
  if (q) params.set("q", q);
  params.set("offset", String(view.offset));
  params.set("limit", String(PAGE_SIZE));
  return params.toString();
}

function isOpen(rollout, index) {
  if (view.open.has(rollout.id)) return true;
  if (view.closed.has(rollout.id)) return false;
  return ACTIVE.has(rollout.status) || index === 0;
}

async function refresh() {
  clearTimeout(view.timer);
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  if (document.hidden) { view.timer = setTimeout(refresh, REFRESH_MS); return; }
  try {
    const [overview, list] = await Promise.all([api(`/v1/overview?${overviewQuery()}`), api("/v1/rollouts")]);
    const opened = list.rollouts.filter(isOpen);
    const details = await Promise.all(opened.map((r) => api(`/v1/rollouts/${encodeURIComponent(r.id)}?boxes=false`)));
    showFleet();
    renderOverview(overview);
    renderRollouts(list.rollouts, new Map(details.map((d) => [d.id, d])));
    $("updated").textContent = `Updated ${new Date().toLocaleTimeString()}; refreshes every ${REFRESH_MS / 1000} s`;
  } catch (error) {
    if (error instanceof AuthError) { signOut("The controller refused that token. Enter a valid one."); return; }
    $("updated").textContent = `Cannot read the controller (${error.message}); trying again shortly.`;
  }
  view.timer = setTimeout(refresh, REFRESH_MS);
}

// ---- token ------------------------------------------------------------------------------------
function showFleet() {
  $("token-form").hidden = true;
  $("fleet").hidden = false;
  $("sign-out").hidden = false;
}

function signOut(message) {
  clearTimeout(view.timer);
  sessionStorage.removeItem(TOKEN_KEY);
  view.shown = {};
  for (const id of ["rollouts", "summary", "status"]) $(id).replaceChildren();
  for (const id of ["versions", "boxes"]) $(id).tBodies[0].replaceChildren();
  $("fleet").hidden = true;
  $("sign-out").hidden = true;
  $("token-form").hidden = false;
  $("updated").textContent = "";
  $("token-error").textContent = message || "";
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("token-error").textContent = "";
  refresh();
});
$("sign-out").addEventListener("click", () => signOut(""));

// ---- boxes × versions, and the boxes ----------------------------------------------------------
function fillFacet(name, values) {
  const select = $(`f-${name}`);
  const current = select.value;
  const wanted = ["", ...values];
  const have = [...select.options].map((o) => o.value);
  if (have.join("\n") === wanted.join("\n")) return;
  const first = select.options[0].textContent;
  select.replaceChildren(...wanted.map((v) => el("option", { value: v, text: v || first })));
  select.value = wanted.includes(current) ? current : "";
}

function unchanged(part, data) {
  const text = JSON.stringify(data);
  if (view.shown[part] === text) return true;
  view.shown[part] = text;
  return false;
}

function renderOverview(data) {
  for (const [name, values] of Object.entries(data.facets)) fillFacet(name, values);
  const filtered = data.total !== data.fleet ? ` (of ${data.fleet} in the fleet)` : "";
  $("summary").textContent = `${data.total} boxes${filtered}: ${data.online} online, ${data.offline} offline.`;
  if (!unchanged("versions", data.versions)) renderVersions(data.versions);
  if (!unchanged("boxes", data.boxes)) renderBoxes(data.boxes);
}

function renderVersions(found) {
  const versions = found.map((v) => el("tr", { "data-model": v.model, "data-version": fmt(v.version) },
    el("td", {}, v.model), el("td", {}, fmt(v.version)), el("td", { class: "num" }, v.boxes),
    el("td", { class: "num" }, v.online), el("td", { class: "num" }, v.offline)));
  if (!versions.length) versions.push(el("tr", {}, el("td", { colspan: "5", class: "muted" }, "No box reports a model.")));
  replaceChildren($("versions").tBodies[0], versions);
}

function renderBoxes(page) {
  const rows = page.items.map((box) => el("tr", { class: box.online ? null : "offline", "data-ref": box.ref },
    el("td", {}, el("button", { type: "button", class: "link", "data-key": `box:${box.ref}`,
      "aria-label": `${box.ref}: update history`, onclick: () => openBox(box.ref) }, box.ref)),
    el("td", {}, el("span", { class: "badge" }, box.online ? "online" : "offline")),
    el("td", {}, box.line || "—"),
    el("td", {}, Object.entries(box.models).map(([m, v]) => `${m} v${fmt(v)}`).join(", ") || "—"),
    el("td", { class: "hide-narrow" }, box.profile || "—"),
    el("td", { class: "hide-narrow" }, ago(box.last_seen))));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No box matches.")));
  replaceChildren($("boxes").tBodies[0], rows);
  const last = Math.min(page.offset + page.items.length, page.count);
  $("page-info").textContent = page.count ? `Boxes ${page.offset + 1}–${last} of ${page.count}` : "";
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.count;
}

function filtersChanged() { view.offset = 0; refresh(); }
for (const id of ["f-site", "f-line", "f-group", "f-profile", "f-state"]) $(id).addEventListener("change", filtersChanged);
let typing = 0;
$("f-q").addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(filtersChanged, 300); });
$("filters").addEventListener("submit", (event) => event.preventDefault());
$("prev").addEventListener("click", () => { view.offset = Math.max(0, view.offset - PAGE_SIZE); refresh(); });
$("next").addEventListener("click", () => { view.offset += PAGE_SIZE; refresh(); });

// ---- rollouts ---------------------------------------------------------------------------------
function renderRollouts(rollouts, details) {
  if (unchanged("rollouts", [rollouts, [...details.entries()]])) return;  // keep the reader's place
  const items = rollouts.map((r, index) => {
    const open = isOpen(r, index);
    const detail = details.get(r.id);
    const node = el("details", { class: "rollout", open, "data-id": r.id },
      el("summary", { "data-key": `summary:${r.id}` },
        el("h3", {}, `${r.name} · ${r.bundle}`), " — ",
        el("span", { class: "badge", "data-field": "status" }, r.status.replace("_", " ")),
        ` wave ${r.wave} of ${r.waves}`),
      el("div", {}, detail ? rolloutBody(detail) : el("p", { class: "muted" }, "Loading…")));
    node.addEventListener("toggle", () => {
      if (node.open === open && !view.open.has(r.id) && !view.closed.has(r.id)) return;
      (node.open ? view.open : view.closed).add(r.id);
      (node.open ? view.closed : view.open).delete(r.id);
      if (node.open && !detail) refresh();
    });
    return node;
  });
  replaceChildren($("rollouts"), items.length ? items : [el("p", { class: "muted" }, "No rollout yet.")]);
}

function rolloutBody(r) {
  const label = r.id === r.name ? r.name : `${r.name} (${r.id})`;
  return [
    el("p", { class: "muted" }, `${r.id === r.name ? "" : `${r.id} · `}${r.total} boxes · phase ${r.phase} · by ${r.created_by} · created ${ago(r.created_at)}`),
    r.halt_reason ? el("p", { class: "halt", "data-field": "halt-reason" }, el("strong", {}, "Halted: "), r.halt_reason) : null,
    el("div", { class: "actions", role: "group", "aria-label": `Commands for ${label}` },
      COMMANDS.map(([command, text, allowed]) => el("button", {
        type: "button", class: command === "halt" || command === "rollback" ? "danger" : null,
        "data-key": `${command}:${r.id}`, "data-command": command, disabled: !allowed.includes(r.status),
        "aria-label": `${text} ${label}`, onclick: (event) => ask(r, command, event.currentTarget),
      }, text))),
    wavesTable(r),
    gatesTable(r),
  ];
}

function wavesTable(r) {
  const rows = r.per_wave.map((w) => {
    const done = Object.entries(w.counts).filter(([state]) => FINAL.has(state)).reduce((n, [, c]) => n + c, 0);
    const counts = Object.entries(w.counts).filter(([, c]) => c > 0).map(([s, c]) => `${s.replace("_", " ")} ${c}`).join(" · ");
    return el("tr", { "data-wave": w.wave },
      el("th", { scope: "row" }, w.wave === r.wave ? `${w.wave} (current)` : w.wave),
      el("td", { class: "num" }, w.total),
      el("td", {}, el("progress", { max: String(w.total || 1), value: String(done), "aria-label": `wave ${w.wave}: ${done} of ${w.total} final` }),
        ` ${done}/${w.total}`),
      el("td", { "data-field": "counts" }, counts || "—"));
  });
  return el("div", { class: "scroll", role: "region", tabindex: "0", "aria-label": `Waves of ${r.name}` },
    el("table", { class: "waves" },
      el("caption", { class: "muted" }, "Waves"),
      el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Wave"), el("th", { scope: "col", class: "num" }, "Boxes"),
        el("th", { scope: "col" }, "Final"), el("th", { scope: "col" }, "Boxes by state"))),
      el("tbody", {}, rows)));
}

function gatesTable(r) {
  // The shadow gate (a plan with a [shadow] phase) is judged before a wave activates: show it first.
  const gates = [...(r.shadow_gates || []), ...r.gates];
  if (!gates.length) return el("p", { class: "muted" }, "No gate evaluated yet (gates are read after each wave's soak).");
  const rows = gates.map((g) => [
    el("tr", { "data-gate": g.name },
      el("th", { scope: "row" }, g.name),
      el("td", {}, el("span", { class: g.status }, g.status)),
      el("td", { class: "num" }, fmt(g.value)),
      el("td", { class: "num" }, fmt(g.threshold)),
      el("td", { class: "num" }, `${g.sample} (needs ${g.needed})`)),
    el("tr", { class: "detail" }, el("td", { colspan: "5" }, g.detail || "")),
  ]);
  return el("div", { class: "scroll", role: "region", tabindex: "0", "aria-label": `Gates of ${r.name}` },
    el("table", { class: "gates" },
      el("caption", { class: "muted" }, "Gates, as last evaluated"),
      el("thead", {}, el("tr", {}, ["Gate", "Status", "Value", "Limit", "Sample"].map((h, i) =>
        el("th", { scope: "col", class: i > 1 ? "num" : null }, h)))),
      el("tbody", {}, rows)));
}

// ---- commands, with a confirmation ------------------------------------------------------------
function ask(rollout, command, opener) {
  const [, text, , explain] = COMMANDS.find(([name]) => name === command);
  view.pending = { id: rollout.id, name: rollout.name, command, text, key: opener.dataset.key };
  $("confirm-title").textContent = `${text} rollout ${rollout.name}?`;
  $("confirm-what").textContent = `${explain} It is ${rollout.status.replace("_", " ")} now (${rollout.id}).`;
  $("confirm-ok").textContent = text;
  $("confirm-ok").className = command === "halt" || command === "rollback" ? "danger" : "";
  $("confirm-why").value = "";
  $("confirm").returnValue = "";
  $("confirm").showModal();
  $("confirm-why").focus();
}

$("confirm").addEventListener("close", async () => {
  const pending = view.pending;
  view.pending = null;
  if (!pending) return;
  if ($("confirm").returnValue === "ok") {
    const why = $("confirm-why").value.trim();
    try {
      const result = await api(`/v1/rollouts/${encodeURIComponent(pending.id)}/${pending.command}`, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ why }),
      });
      $("status").textContent = `${pending.text}: ${pending.name} is ${result.status.replace("_", " ")} now.`;
    } catch (error) {
      if (error instanceof AuthError) { signOut("The controller refused that token. Enter a valid one."); return; }
      $("status").textContent = `${pending.text} refused: ${error.message}`;
    }
    await refresh();
  }
  refocus(pending.key);
});

// ---- a box and its update history -------------------------------------------------------------
async function openBox(ref) {
  const cut = ref.indexOf("/");
  const path = `/v1/devices/${encodeURIComponent(ref.slice(0, cut))}/${encodeURIComponent(ref.slice(cut + 1))}`;
  $("box-title").textContent = ref;
  $("box-body").replaceChildren(el("p", { class: "muted" }, "Loading…"));
  $("box").dataset.opener = `box:${ref}`;
  $("box").showModal();
  try {
    $("box-body").replaceChildren(...boxBody(await api(path)));
  } catch (error) {
    if (error instanceof AuthError) { $("box").close(); signOut("The controller refused that token. Enter a valid one."); return; }
    $("box-body").replaceChildren(el("p", { class: "err" }, `Cannot read ${ref}: ${error.message}`));
  }
}
$("box").addEventListener("close", () => refocus($("box").dataset.opener));

function boxBody(d) {
  const facts = [
    ["State", d.online ? "online" : "offline"], ["Last seen", ago(d.last_seen)], ["Line", d.line || "—"],
    ["Groups", d.groups.join(", ") || "—"], ["Profile", d.profile || "—"], ["Agent", d.agent_version || "—"],
    ["Ready", d.ready === null ? "—" : d.ready ? "yes" : `no: ${d.reasons.join("; ")}`],
    ["Models", Object.entries(d.models).map(([m, s]) => `${m} v${fmt(s.version)} (${s.status})`).join(", ") || "—"],
  ];
  const history = d.history.map((h) => el("tr", {},
    el("td", {}, el("time", { datetime: h.at }, new Date(h.at).toLocaleString([], { dateStyle: "short", timeStyle: "medium" }))),
    el("td", {}, h.phase), el("td", {}, h.outcome || "—"),
    el("td", {}, h.name ? `${h.name} v${fmt(h.version)}` : "—"),
    el("td", {}, h.rollout_id || "—"), el("td", {}, h.reason || "")));
  return [
    el("dl", {}, facts.map(([k, v]) => [el("dt", {}, k), el("dd", {}, v)])),
    el("h3", {}, "Update history (newest first)"),
    history.length
      ? el("div", { class: "scroll", role: "region", tabindex: "0", "aria-label": "Update history" },
        el("table", { id: "history" }, el("thead", {}, el("tr", {}, ["At", "Phase", "Outcome", "Version", "Rollout", "Reason"]
          .map((h) => el("th", { scope: "col" }, h)))), el("tbody", {}, history)))
      : el("p", { class: "muted" }, "No update report from this box yet."),
  ];
}

// ---- start ------------------------------------------------------------------------------------
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
if (sessionStorage.getItem(TOKEN_KEY)) refresh();
else $("token").focus();
