// latentd playground: plain JavaScript against the public API (no framework, no build step).
// POST /v1/jobs, then follow GET /v1/jobs/{id}/events (Server-Sent Events read with fetch, since
// EventSource cannot send an Authorization header), resuming with Last-Event-ID if the
// connection drops. The API key stays in this browser (localStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const FIELDS = ["prompt", "negative_prompt", "size", "n", "steps", "guidance_scale", "sampler", "seed"];
const INTS = new Set(["n", "steps", "seed"]);
const KEY_STORE = "latentd.key";
const RECENT_MAX = 12;     // recent jobs shown (GET /v1/jobs: this key's, newest first)
let model = null;          // ModelInfo of the served model (GET /v1/models)
let current = null;        // {id, abort: AbortController}

// --- API ---------------------------------------------------------------------------------------
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(method, path, body) {
  const init = {method, headers: headers(body ? {"Content-Type": "application/json"} : {})};
  if (body) init.body = JSON.stringify(body);
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { /* not JSON */ }
  return {ok: r.ok, status: r.status, data};
}

// --- errors beside the field they name ---------------------------------------------------------
function clearErrors() {
  document.querySelectorAll(".err").forEach((e) => { e.textContent = ""; });
  document.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

function showError(err, status) {
  const field = err && (err.field || err.param);
  const msg = (err && err.message) || ("HTTP " + status);
  const slot = field && document.querySelector(`.err[data-for="${CSS.escape(field)}"]`);
  if (slot) {
    slot.textContent = msg;
    const input = field === "Authorization" ? $("key") : $(field);
    if (input) { input.setAttribute("aria-invalid", "true"); }
    if (field === "Authorization") $("key-box").open = true;
    if (input && input.focus) input.focus();
  } else {
    $("form-error").textContent = msg;
  }
}

// --- the form ----------------------------------------------------------------------------------
function body() {
  const b = {};
  for (const name of FIELDS) {
    const raw = $(name).value.trim();
    if (raw === "" && name !== "prompt") continue;
    if (INTS.has(name)) b[name] = /^-?\d+$/.test(raw) ? Number(raw) : raw;   // the API names a bad one
    else if (name === "guidance_scale") b[name] = /^-?\d+(\.\d+)?$/.test(raw) ? Number(raw) : raw;
    else b[name] = raw;
  }
  return b;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Generating…" : "Generate";
  $("cancel").hidden = !busy;
}

async function loadModel() {
  const r = await api("GET", "/v1/models");
  if (!r.ok) {
    if (r.status === 401) { showError(r.data && r.data.error, r.status); }
    $("model-name").textContent = "";
    return;
  }
  const m = r.data.data[0];
  if (!m) { $("model-name").textContent = "no model ready"; return; }
  model = m.info;
  $("model-name").textContent = `model: ${m.id} · ${model.native_width}×${model.native_height}`;
  $("steps").placeholder = `default ${model.default_steps}`;
  $("guidance_scale").placeholder = `default ${model.default_guidance}`;
  $("size").placeholder = `${model.native_width}x${model.native_height}`;
  const sel = $("sampler");
  sel.length = 1;
  sel.options[0].textContent = `default (${model.default_sampler})`;
  // the ones the model takes without an adapter (the playground sends none)
  for (const s of model.standalone_samplers) sel.add(new Option(s, s));
  const list = $("sizes");
  list.textContent = "";
  const sizes = (model.sizes && model.sizes.length) ? model.sizes
    : [[model.native_width, model.native_height]];
  for (const [w, h] of sizes) list.append(new Option(`${w}x${h}`));
}

// --- the same request through AUTOMATIC1111's API (/sdapi/v1) ----------------------------------
// A1111's names of latentd's samplers: app/a1111/names.py (tests/test_sdapi.py checks this copy).
// Not fetched from /sdapi: its 401 asks for HTTP Basic, which a browser answers with a login dialog.
const A1111_SAMPLERS = {"euler_a": "Euler a", "euler": "Euler", "dpmpp_2m": "DPM++ 2M", "ddim": "DDIM", "lcm": "LCM", "tcd": "TCD"};

function showA1111() {
  const b = body(), a = {prompt: b.prompt};
  if (b.negative_prompt) a.negative_prompt = b.negative_prompt;
  const m = /^(\d+)x(\d+)$/.exec(b.size || "");
  if (m) { a.width = Number(m[1]); a.height = Number(m[2]); }
  if (b.n !== undefined) a.batch_size = b.n;
  if (b.steps !== undefined) a.steps = b.steps;
  if (b.guidance_scale !== undefined) a.cfg_scale = b.guidance_scale;
  if (b.sampler) a.sampler_name = A1111_SAMPLERS[b.sampler] || b.sampler;
  a.seed = b.seed !== undefined ? b.seed : -1;
  const json = JSON.stringify(a).replace(/'/g, "'\\''");
  $("sdapi-snippet").textContent = `curl ${location.origin}/sdapi/v1/txt2img -u "any:$LATENTD_KEY" \\\n` +
    `  -H 'Content-Type: application/json' -d '${json}'`;
}

// --- the live view -----------------------------------------------------------------------------
function stage(kind, src, label) {
  const img = $("live");
  img.src = src;
  img.hidden = false;
  $("placeholder").hidden = true;
  $("stage").dataset.state = kind;
  $("badge").hidden = !label;
  $("badge").textContent = label || "";
}

function progress(step, total, eta) {
  $("bar").style.width = total ? `${Math.min(100, (100 * step) / total).toFixed(1)}%` : "0";
  let t = `Step ${step} of ${total}`;
  if (eta !== null && eta !== undefined) t += ` · about ${eta < 1 ? "<1" : Math.round(eta)} s left`;
  $("status").textContent = t;
}

function addResult(img, prompt) {
  const node = $("result-tpl").content.firstElementChild.cloneNode(true);
  node.querySelector("a.img").href = img.url;
  node.querySelector("img").src = img.url;
  node.querySelector("img").alt = prompt || "";
  node.querySelector(".seed").textContent = `seed ${img.seed}`;
  node.querySelector(".download").href = img.url;
  node.querySelector(".download").setAttribute("download", `latentd-${img.seed}.png`);
  node.querySelector(".reuse").addEventListener("click", () => { $("seed").value = String(img.seed); $("n").value = "1"; });
  if (img.nsfw) { node.classList.add("flagged"); node.querySelector(".seed").textContent += " · flagged"; }
  $("results").append(node);
}

// --- the event stream --------------------------------------------------------------------------
async function follow(id, every, prompt, abort) {
  let last = null, tries = 0;
  for (;;) {
    const h = headers({Accept: "text/event-stream"});
    if (last) h["Last-Event-ID"] = last;
    let r;
    try {
      r = await fetch(`/v1/jobs/${id}/events?preview_every=${every}`, {headers: h, signal: abort.signal});
    } catch (e) {
      if (abort.signal.aborted) return;
      if (++tries > 5) { $("form-error").textContent = "lost the event stream: " + e; return; }
      await new Promise((ok) => setTimeout(ok, 1000));
      continue;
    }
    if (!r.ok) {
      let d = null; try { d = await r.json(); } catch (_) { /* empty */ }
      showError(d && d.error, r.status);
      return;
    }
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    try {
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const frame = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const ev = {id: null, event: "message", data: ""};
          for (const line of frame.split("\n")) {
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const k = i < 0 ? line : line.slice(0, i);
            const v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (k === "id") ev.id = v; else if (k === "event") ev.event = v; else if (k === "data") ev.data += v;
          }
          if (!ev.data) continue;
          if (ev.id) last = ev.id;
          if (handle(ev.event, JSON.parse(ev.data), prompt)) return;
        }
      }
    } catch (e) {
      if (abort.signal.aborted) return;
    }
    if (++tries > 5) { $("form-error").textContent = "the event stream keeps closing"; return; }
    await new Promise((ok) => setTimeout(ok, 500));   // resume after `last`, nothing lost
  }
}

function handle(type, d, prompt) {   // true: the job has ended
  if (type === "queued") {
    $("status").textContent = d.position ? `Queued · position ${d.position + 1}` : "Queued · next";
  } else if (type === "running") {
    progress(d.step, d.total, d.eta_s);
  } else if (type === "preview") {
    const s = $("stage");
    s.dataset.previews = String(Number(s.dataset.previews) + 1);
    s.style.aspectRatio = `${d.width} / ${d.height}`;
    stage("preview", "data:image/png;base64," + d.png, `preview · step ${d.step}/${d.total}`);
  } else if (type === "image") {
    stage("final", d.url, d.nsfw ? "flagged by the safety check" : "");
    addResult(d, prompt);
  } else if (type === "succeeded" || type === "failed" || type === "canceled") {
    $("bar").style.width = type === "succeeded" ? "100%" : $("bar").style.width;
    const secs = d.timings && d.timings.run_s ? ` in ${d.timings.run_s.toFixed(1)} s` : "";
    $("status").textContent = type === "succeeded" ? `Done${secs}.` : type === "canceled" ? "Canceled." : "Failed.";
    if (type === "failed" && d.error) $("form-error").textContent = d.error.message;
    return true;
  } else if (type === "error") {
    $("form-error").textContent = d.message || "error";
    return true;
  }
  return false;
}

async function generate(ev) {
  ev.preventDefault();
  clearErrors();
  saveKey();
  const b = body();
  setBusy(true);
  $("results").textContent = "";
  $("stage").dataset.previews = "0";
  $("stage").dataset.state = "waiting";
  $("status").textContent = "Submitting…";
  $("bar").style.width = "0";
  try {
    const r = await api("POST", "/v1/jobs", b);
    if (!r.ok) { showError(r.data && r.data.error, r.status); $("status").textContent = "Ready."; return; }
    const id = r.data.id;
    renderRecent();
    const steps = typeof b.steps === "number" ? b.steps : (model ? model.default_steps : 20);
    const every = Math.max(1, Math.round(steps / 8));
    current = {id, abort: new AbortController()};
    await follow(id, every, b.prompt, current.abort);
  } finally {
    current = null;
    setBusy(false);
    renderRecent();
  }
}

async function cancel() {
  if (!current) return;
  const r = await api("DELETE", `/v1/jobs/${current.id}`);
  if (!r.ok) showError(r.data && r.data.error, r.status);
}

// --- key and recent jobs -----------------------------------------------------------------------
function saveKey() {
  const k = $("key").value.trim();
  if (k) localStorage.setItem(KEY_STORE, k); else localStorage.removeItem(KEY_STORE);
  $("key-state").textContent = k ? "set" : "not set";
}

async function renderRecent() {
  const r = await api("GET", `/v1/jobs?limit=${RECENT_MAX}`);
  const list = $("recent");
  list.textContent = "";
  if (!r.ok) return;
  for (const j of r.data.data) {
    const li = document.createElement("li");
    const thumb = document.createElement("img");
    thumb.className = "thumb"; thumb.alt = "";
    if (j.images.length) thumb.src = j.images[0].url;
    const txt = document.createElement("div");
    txt.className = "txt";
    const p = document.createElement("div"); p.className = "p"; p.textContent = j.params.prompt || j.id;
    const s = document.createElement("div"); s.className = "s";
    s.textContent = `${j.status} · seed ${j.params.seed}`;
    txt.append(p, s);
    li.append(thumb, txt);
    li.title = j.params.prompt || "";
    li.addEventListener("click", () => {
      $("results").textContent = "";
      for (const im of j.images) addResult(im, j.params.prompt);
      if (j.images.length) stage("final", j.images[0].url, "");
      for (const f of FIELDS) if (j.params[f] !== undefined && f !== "n") $(f).value = j.params[f];
      if (j.params.width) $("size").value = `${j.params.width}x${j.params.height}`;
    });
    list.append(li);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-state").textContent = $("key").value ? "set" : "not set";
  if (!$("key").value) $("key-box").open = true;
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("seed-clear").addEventListener("click", () => { $("seed").value = ""; });
  $("key").addEventListener("change", () => { saveKey(); clearErrors(); loadModel(); renderRecent(); });
  $("form").addEventListener("input", showA1111);
  loadModel();
  showA1111();
  renderRecent();
});
