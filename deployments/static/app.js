// rtedit web page: webcam or uploaded image -> binary frames over /ws/predict -> edited stream.
// Frame: 4-byte big-endian length N, N bytes of UTF-8 JSON metadata, then the JPEG image.
"use strict";
const MAX_IN_FLIGHT = 2;  // more would only queue frames that the server drops anyway
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let apiKey = params.get("api_key") || "";
let ws = null, nextId = 1, inFlight = new Map(), sent = 0, received = 0, running = false, source = null;
let frameTimes = [], lastPrompt = null, lastSteps = null;
const canvas = document.createElement("canvas");

function encodeFrame(meta, imageBytes) {
  const json = new TextEncoder().encode(JSON.stringify(meta));
  const out = new Uint8Array(4 + json.length + imageBytes.length);
  new DataView(out.buffer).setUint32(0, json.length, false);
  out.set(json, 4);
  out.set(imageBytes, 4 + json.length);
  return out;
}

function decodeFrame(buffer) {
  const view = new DataView(buffer);
  const n = view.getUint32(0, false);
  const meta = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, n)));
  return { meta, image: new Uint8Array(buffer, 4 + n) };
}

async function loadInfo() {
  const res = await fetch("/api/info", { headers: apiKey ? { "x-api-key": apiKey } : {} });
  if (res.status === 401) {
    $("key-label").hidden = false;
    $("model").textContent = "model: (API key needed)";
    return;
  }
  const info = await res.json();
  if (!res.ok) { $("model").textContent = `model: unavailable (${(info.error || {}).message || res.status})`; return; }
  const m = info.model || {};
  $("model").textContent = `model: ${m.name} on ${m.device} (${m.dtype})`;
  $("random-notice").hidden = !m.random_weights;
  $("model-about").textContent = m.description || "";
  $("model-about").hidden = !m.description;
  if (m.native_size) {  // a model trained at one size (the toy editor: 128) edits best at it
    const size = $("size");
    if (![...size.options].some((o) => o.value === String(m.native_size))) size.add(new Option(m.native_size, m.native_size), 0);
    size.value = String(m.native_size);
  }
  // Steps: the served default (the model's own unless the server overrides it), within what the model allows.
  const steps = $("steps"), limits = info.limits || {}, allowed = limits.steps || m.steps;
  steps.min = String(allowed ? Math.min(...allowed) : 1);
  steps.max = String(allowed ? Math.max(...allowed) : limits.max_steps || 8);
  steps.title = allowed ? `this model was trained for steps ${allowed.join(", ")}` : "";
  const defaultSteps = (info.defaults || {}).steps;
  if (defaultSteps && !steps.value) steps.value = String(defaultSteps);
  if (info.auth) { $("key-label").hidden = false; $("api-key").value = apiKey; }
}

function connect() {
  return new Promise((resolve, reject) => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
    ws = new WebSocket(`${proto}//${location.host}/ws/predict${query}`);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => { $("status").textContent = "connected"; $("status").className = "status open"; resolve(); };
    ws.onerror = () => reject(new Error("websocket refused (wrong API key?)"));
    ws.onclose = () => { $("status").textContent = "disconnected"; $("status").className = "status"; ws = null;
                         inFlight.clear(); };
    ws.onmessage = onMessage;
  });
}

function onMessage(event) {
  if (typeof event.data === "string") {
    const msg = JSON.parse(event.data);
    if (msg.error) $("error").textContent = `settings: ${msg.error.message}`;
    return;
  }
  const { meta, image } = decodeFrame(event.data);
  // Frames the server dropped never come back: forget every frame up to this id.
  for (const id of [...inFlight.keys()]) if (meta.id === null || id <= meta.id) {
    if (id === meta.id) $("latency").textContent = (performance.now() - inFlight.get(id)).toFixed(0);
    inFlight.delete(id);
  }
  received += 1;
  $("received").textContent = received;
  $("inflight").textContent = inFlight.size;
  if (meta.dropped !== undefined) $("dropped").textContent = meta.dropped;
  if (meta.error) { $("error").textContent = `frame ${meta.id}: ${meta.error.message}`; return; }
  $("error").textContent = "";
  const url = URL.createObjectURL(new Blob([image], { type: `image/${meta.format || "jpeg"}` }));
  const out = $("output");
  const old = out.src;
  out.src = url;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  const now = performance.now();
  frameTimes.push(now);
  frameTimes = frameTimes.filter((t) => now - t < 2000);
  $("fps").textContent = (frameTimes.length / 2).toFixed(1);
  const t = meta.timings || {};
  $("server").textContent = ["prepare", "denoise", "decode", "server"].filter((k) => t[k] != null)
    .map((k) => `${k} ${t[k].toFixed(0)} ms`).join(" · ");
  $("replica").textContent = meta.replica || "–";
}

async function grab() {
  const size = parseInt($("size").value, 10);
  const el = source === "camera" ? $("video") : $("source");
  const w = source === "camera" ? el.videoWidth : el.naturalWidth;
  const h = source === "camera" ? el.videoHeight : el.naturalHeight;
  if (!w || !h) return null;
  // Longest side to the chosen size, both sides multiples of 16 (the model's patch size).
  const scale = size / Math.max(w, h);
  canvas.width = Math.max(64, Math.round((w * scale) / 16) * 16);
  canvas.height = Math.max(64, Math.round((h * scale) / 16) * 16);
  canvas.getContext("2d").drawImage(el, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((r) => canvas.toBlob(r, "image/jpeg", 0.85));
  return new Uint8Array(await blob.arrayBuffer());
}

async function pump() {
  while (running) {
    if (!ws || ws.readyState !== WebSocket.OPEN) { await connect().catch(showError); if (!ws) break; }
    if (inFlight.size >= MAX_IN_FLIGHT) { await sleep(5); continue; }
    const image = await grab();
    if (!image) { await sleep(20); continue; }
    const meta = { id: nextId++ };
    const prompt = $("prompt").value.trim(), steps = parseInt($("steps").value, 10);
    if (prompt !== lastPrompt) { meta.prompt = prompt; lastPrompt = prompt; }
    // An empty box keeps the session's default steps (the model's), so none is sent until one is chosen.
    if (Number.isInteger(steps) && steps !== lastSteps) { meta.steps = steps; lastSteps = steps; }
    inFlight.set(meta.id, performance.now());
    ws.send(encodeFrame(meta, image));
    sent += 1;
    $("sent").textContent = sent;
    $("inflight").textContent = inFlight.size;
    // An uploaded still image needs one frame per change, not a stream.
    if (source === "file") { running = false; break; }
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function showError(err) { $("error").textContent = String(err.message || err); }

function start(kind) {
  source = kind;
  $("video").hidden = kind !== "camera";
  $("source").hidden = kind !== "file";
  if (!running) { running = true; pump(); }
}

$("camera").onclick = async () => {
  try {
    $("video").srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
    start("camera");
  } catch (err) { showError(err); }
};
$("file").onchange = () => {
  const file = $("file").files[0];
  if (!file) return;
  const img = $("source");
  img.onload = () => start("file");
  img.src = URL.createObjectURL(file);
};
$("prompt").onchange = () => { if (source === "file" && $("source").src) start("file"); };
$("steps").onchange = $("prompt").onchange;
$("api-key").onchange = () => { apiKey = $("api-key").value; if (ws) ws.close(); loadInfo().catch(showError); };
$("stop").onclick = () => { running = false; if (source === "camera" && $("video").srcObject)
  $("video").srcObject.getTracks().forEach((t) => t.stop()); };
loadInfo().catch(showError);
