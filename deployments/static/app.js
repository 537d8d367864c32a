// rtedit web page: webcam or uploaded image -> binary frames over /ws/predict -> edited stream.
// Frame: 4-byte big-endian length N, N bytes of UTF-8 JSON metadata, then the JPEG image.
// The socket is redialled with backoff whenever it is lost while a source is active; #status[data-state] says
// where it stands: idle, connecting, open, waiting (backoff), refused (wrong key), closed.
// A reference image is a session setting: a text message {"references": [data URL]} (rtedit.streaming), sent once
// per socket and change before the next frame; #reference-state[data-state] says none, chosen, sent, in-use, refused.
"use strict";
const MAX_IN_FLIGHT = 2;  // more would only queue frames that the server drops anyway
const BACKOFF_MS = [250, 500, 1000, 2000, 4000, 8000];  // waits after failed handshakes; the last one repeats
const DIAGNOSE_TIMEOUT_MS = 3000;  // a restarting server may accept and then not answer
const LONGEST_SIDES = ["256", "384", "512"];  // the size menu of a model that lists no sizes
const REFERENCE_MAX_SIDE = 512;  // a palette or a style needs no more, and the text message stays small
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let apiKey = params.get("api_key") || "";
let nextId = 1, inFlight = new Map(), sent = 0, received = 0, source = null;
let frameTimes = [], lastPrompt = null, lastSteps = null;
// active: a source is chosen and Stop was not pressed; stillPending: the uploaded image (or a setting) changed
// and no frame for it is out; pumping: the send loop runs; infoLoaded: /api/info answered.
let active = false, stillPending = false, pumping = false, infoLoaded = false;
// reference: the chosen reference as a JPEG data: URL (null: none); sentReference: what this socket's session
// was sent (null: none, as every new session starts).
let reference = null, sentReference = null;
const link = { ws: null, attempt: 0, dialing: null, wake: null };
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

const keyHeaders = () => (apiKey ? { "x-api-key": apiKey } : {});

function setState(state, text) {
  const status = $("status");
  status.dataset.state = state;
  status.className = `status ${state}`;
  status.textContent = text;
}

async function loadInfo() {
  const res = await fetch("/api/info", { headers: keyHeaders(), cache: "no-store" });
  if (res.status === 401) {
    $("key-label").hidden = false;
    $("model").textContent = "model: (API key needed)";
    return;
  }
  const info = await res.json();
  if (!res.ok) { $("model").textContent = `model: unavailable (${(info.error || {}).message || res.status})`; return; }
  const m = info.model || {}, limits = info.limits || {}, defaults = info.defaults || {};
  $("model").textContent = `model: ${m.name} on ${m.device} (${m.dtype})`;
  $("random-notice").hidden = !m.random_weights;
  $("model-about").textContent = m.description || "";
  $("model-about").hidden = !m.description;
  showSizes(limits.sizes, m.native_size);
  showExamples(m.examples || []);
  // A server configured for no references (router.limits.max_references: 0) gets no slot for one.
  $("reference-controls").hidden = limits.max_references === 0;
  // The served default instruction (the model's first example) unless the user typed one already.
  if (!$("prompt").value && defaults.prompt) $("prompt").value = defaults.prompt;
  // Steps: the served default (the model's own unless the server overrides it), within what the model allows.
  const steps = $("steps"), allowed = limits.steps || m.steps;
  steps.min = String(allowed ? Math.min(...allowed) : 1);
  steps.max = String(allowed ? Math.max(...allowed) : limits.max_steps || 8);
  steps.title = allowed ? `this model was trained for steps ${allowed.join(", ")}` : "";
  if (defaults.steps && !steps.value) steps.value = String(defaults.steps);
  if (info.auth) { $("key-label").hidden = false; $("api-key").value = apiKey; }
  infoLoaded = true;
}

// A model that serves fixed sizes (height x width) gets only those; any other gets longest sides, its native first.
function showSizes(sizes, nativeSize) {
  const select = $("size"), previous = select.value;
  const values = sizes && sizes.length ? sizes.map(([h, w]) => `${h}x${w}`)
    : [...new Set([...(nativeSize ? [String(nativeSize)] : []), ...LONGEST_SIDES])];
  select.replaceChildren(...values.map((v) => new Option(v, v)));
  const preferred = nativeSize ? String(nativeSize) : "512";
  select.value = values.includes(previous) ? previous : values.includes(preferred) ? preferred : values[0];
  select.title = sizes && sizes.length ? "the sizes this model serves (its rtedit.json)" : "the longest side";
}

function showExamples(examples) {
  const box = $("examples");
  box.replaceChildren(...examples.map((text) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.textContent = text;
    button.onclick = () => { $("prompt").value = text; settingsChanged(); };
    return button;
  }));
  box.hidden = examples.length === 0;
}

// Resolves with the open socket, or null when the server refused the key or the source was stopped.
function openSocket() {
  if (link.ws && link.ws.readyState === WebSocket.OPEN) return Promise.resolve(link.ws);
  if (!link.dialing) link.dialing = dial().finally(() => { link.dialing = null; });
  return link.dialing;
}

async function dial() {
  while (active) {
    setState("connecting", link.attempt ? `connecting (attempt ${link.attempt + 1})…` : "connecting…");
    const sock = await handshake();
    if (sock) { link.attempt = 0; return sock; }
    const reason = await diagnose();
    if (reason === null) {
      $("key-label").hidden = false;
      setState("refused", "refused: wrong or missing API key (enter it above)");
      return null;
    }
    const wait = BACKOFF_MS[Math.min(link.attempt, BACKOFF_MS.length - 1)];
    link.attempt += 1;
    setState("waiting", `${reason}: reconnecting in ${(wait / 1000).toFixed(1)} s (attempt ${link.attempt})`);
    await new Promise((resolve) => { link.wake = resolve; setTimeout(resolve, wait); });
    link.wake = null;
  }
  setState("idle", "disconnected");
  return null;
}

function handshake() {
  return new Promise((resolve) => {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
    const sock = new WebSocket(`${proto}//${location.host}/ws/predict${query}`);
    sock.binaryType = "arraybuffer";
    let opened = false;
    sock.onopen = () => { opened = true; adopt(sock); resolve(sock); };
    // onerror carries no reason; onclose always follows it.
    sock.onclose = () => { if (opened) lost(sock); else resolve(null); };
    sock.onmessage = (event) => { if (sock === link.ws) onMessage(event); };
  });
}

// A browser hides a refused handshake's HTTP status: /api/info with the same key tells a wrong key (null) from a
// server that is down or restarting (words for the status line).
async function diagnose() {
  try {
    const res = await fetch("/api/info", { headers: keyHeaders(), cache: "no-store",
                                           signal: AbortSignal.timeout(DIAGNOSE_TIMEOUT_MS) });
    if (res.status === 401) return null;
    return res.ok ? "websocket handshake failed" : `server answered ${res.status}`;
  } catch (err) {
    return err.name === "TimeoutError" ? "server not answering" : "server unreachable";
  }
}

// A new socket is a new server session: it knows no prompt or steps yet, and frames of the old one never return.
function adopt(sock) {
  if (link.ws && link.ws !== sock) link.ws.close();
  link.ws = sock;
  forgetInFlight();
  lastPrompt = null;
  lastSteps = null;
  sentReference = null;
  if (reference) setReferenceState("chosen", "not sent yet");
  setState("open", "connected");
  if (!infoLoaded) loadInfo().catch(showError);
}

function lost(sock) {
  if (sock !== link.ws) return;
  link.ws = null;
  forgetInFlight();
  setState("closed", "disconnected");
  if (!active) return;
  openSocket();  // redial now, not at the next change, so the status shows the server's state
  pump();
}

function forgetInFlight() {
  if (source === "file" && inFlight.size) stillPending = true;  // its answer will never come: send it again
  inFlight.clear();
  $("inflight").textContent = 0;
}

function onMessage(event) {
  if (typeof event.data === "string") {
    // The page sends only references as a text message: its ack (or refusal) is about them.
    const msg = JSON.parse(event.data);
    if (msg.error) {
      $("error").textContent = `settings: ${msg.error.message}`;
      setReferenceState("refused", `reference refused: ${msg.error.message}`);
    } else if (msg.type === "settings") {
      setReferenceState(msg.references ? "in-use" : "none",
                        msg.references ? "reference in use" : "no reference");
    }
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
  $("resized").textContent = meta.resized ? `resized from ${meta.resized.from.join("x")}: ${meta.resized.reason}` : "";
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
  const el = source === "camera" ? $("video") : $("source");
  const w = source === "camera" ? el.videoWidth : el.naturalWidth;
  const h = source === "camera" ? el.videoHeight : el.naturalHeight;
  if (!w || !h) return null;
  const choice = $("size").value;
  let sx = 0, sy = 0, sw = w, sh = h;
  if (choice.includes("x")) {
    // A served size exactly: the picture's centre at that aspect, scaled (a stretched one would edit worse).
    const [th, tw] = choice.split("x").map(Number);
    const scale = Math.max(tw / w, th / h);
    sw = Math.min(w, Math.round(tw / scale));
    sh = Math.min(h, Math.round(th / scale));
    sx = Math.floor((w - sw) / 2);
    sy = Math.floor((h - sh) / 2);
    canvas.width = tw;
    canvas.height = th;
  } else {
    // Longest side to the chosen size, both sides multiples of 16 (the model's patch size).
    const scale = parseInt(choice, 10) / Math.max(w, h);
    canvas.width = Math.max(64, Math.round((w * scale) / 16) * 16);
    canvas.height = Math.max(64, Math.round((h * scale) / 16) * 16);
  }
  canvas.getContext("2d").drawImage(el, sx, sy, sw, sh, 0, 0, canvas.width, canvas.height);
  const blob = await new Promise((r) => canvas.toBlob(r, "image/jpeg", 0.85));
  return new Uint8Array(await blob.arrayBuffer());
}

// Sends frames while a source wants them: the webcam always, an uploaded image once per change.
async function pump() {
  if (pumping) return;
  pumping = true;
  try {
    while (active && (source === "camera" || stillPending)) {
      const sock = await openSocket();
      if (!sock) break;  // refused or stopped: a new key, a new image or Start calls pump again
      if (inFlight.size >= MAX_IN_FLIGHT) { await sleep(5); continue; }
      const image = await grab();
      if (!image) { await sleep(20); continue; }
      if (sock !== link.ws || sock.readyState !== WebSocket.OPEN) continue;  // lost while grabbing: redial
      if (reference !== sentReference) {
        // Before the frame, on the same socket: the server applies it from this frame on.
        sock.send(JSON.stringify({ references: reference ? [reference] : [] }));
        sentReference = reference;
        setReferenceState("sent", reference ? "reference sent…" : "clearing the reference…");
      }
      const meta = { id: nextId++ };
      const prompt = $("prompt").value.trim(), steps = parseInt($("steps").value, 10);
      // An empty box keeps the session's prompt (the server's default until one is sent).
      if (prompt && prompt !== lastPrompt) { meta.prompt = prompt; lastPrompt = prompt; }
      // An empty box keeps the session's default steps (the model's), so none is sent until one is chosen.
      if (Number.isInteger(steps) && steps !== lastSteps) { meta.steps = steps; lastSteps = steps; }
      inFlight.set(meta.id, performance.now());
      sock.send(encodeFrame(meta, image));
      sent += 1;
      $("sent").textContent = sent;
      $("inflight").textContent = inFlight.size;
      if (source === "file") stillPending = false;
    }
  } catch (err) {
    showError(err);
  } finally {
    pumping = false;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function setReferenceState(state, text) {
  const el = $("reference-state");
  el.dataset.state = state;
  el.textContent = text;
}

// The reference scaled to at most REFERENCE_MAX_SIDE on its longest side, as a JPEG data: URL.
function referenceDataUrl(img) {
  const scale = Math.min(1, REFERENCE_MAX_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(img.naturalWidth * scale));
  c.height = Math.max(1, Math.round(img.naturalHeight * scale));
  c.getContext("2d").drawImage(img, 0, 0, c.width, c.height);
  return c.toDataURL("image/jpeg", 0.9);
}
function showError(err) { $("error").textContent = String(err.message || err); }

function start(kind) {
  source = kind;
  active = true;
  if (kind === "file") stillPending = true;
  $("video").hidden = kind !== "camera";
  $("source").hidden = kind !== "file";
  pump();
}

function settingsChanged() {
  if (source === "file" && $("source").src) start("file");
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
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("file").value = "";  // else picking the same file again fires no change, and sends nothing
};
$("reference").onchange = () => {
  const file = $("reference").files[0];
  if (!file) return;
  const img = $("reference-preview");
  img.onload = () => {
    reference = referenceDataUrl(img);
    $("reference-figure").hidden = false;
    $("clear-reference").disabled = false;
    setReferenceState("chosen", "not sent yet");
    settingsChanged();  // an uploaded image is edited again with it; a webcam's next frame carries it
  };
  img.onerror = () => showError(new Error(`the reference ${file.name} is not an image this browser can read`));
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("reference").value = "";  // the same file picked again fires a change
};
$("clear-reference").onclick = () => {
  reference = null;
  $("reference-figure").hidden = true;
  $("clear-reference").disabled = true;
  setReferenceState(sentReference ? "chosen" : "none", sentReference ? "clearing on the next frame" : "no reference");
  settingsChanged();
};
$("prompt").onchange = settingsChanged;
$("steps").onchange = settingsChanged;
$("size").onchange = settingsChanged;
$("api-key").onchange = async () => {
  apiKey = $("api-key").value;
  link.attempt = 0;
  if (link.wake) link.wake();  // a dial waiting out its backoff tries the new key now
  if (link.ws) link.ws.close();
  await loadInfo().catch(showError);
  if (active) pump();
};
$("stop").onclick = () => {
  active = false;
  stillPending = false;
  if (source === "camera" && $("video").srcObject) $("video").srcObject.getTracks().forEach((t) => t.stop());
};
loadInfo().catch(showError);
