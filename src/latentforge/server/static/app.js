// latentforge's page: txt2img, img2img and inpainting through the jobs extension (/latentforge/v1/jobs),
// live progress over Server-Sent Events, a gallery with infotext, PNG info, reuse parameters; A1111's SD VAE
// choice, saved styles and Tiling. No libraries.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "txt2img", job: null, source: null, initData: null, maskDirty: false, styles: [] };

async function api(path, options = {}) {
  const init = { ...options, headers: { "Content-Type": "application/json" } };
  if (options.body !== undefined) init.body = JSON.stringify(options.body);
  const r = await fetch(path, init);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const error = new Error(data.detail || `${r.status} ${r.statusText}`);
    error.field = data.field;  // the request field at fault, when one is
    throw error;
  }
  return data;
}

function status(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fillSelect(select, items, current) {
  select.replaceChildren(...items.map(([value, label]) => new Option(label, value, false, value === current)));
}

async function loadLists() {
  // the VAEs and styles on their own: a damaged styles.csv must not take the other lists down
  const optional = (path) => api(path).catch((e) => { status(`${path}: ${e.message}`, true); return []; });
  try {
    const [models, samplers, schedulers, options, latent, upscalers, vaes, styles] = await Promise.all([
      api("/sdapi/v1/sd-models"), api("/sdapi/v1/samplers"), api("/sdapi/v1/schedulers"), api("/sdapi/v1/options"),
      api("/sdapi/v1/latent-upscale-modes"), api("/sdapi/v1/upscalers"),
      optional("/sdapi/v1/sd-vae"), optional("/sdapi/v1/prompt-styles"),
    ]);
    fillSelect($("model"), models.map((m) => [m.title, m.title]), options.sd_model_checkpoint);
    const vaeNames = ["Automatic", "None", ...vaes.map((v) => v.model_name)];
    const vae = options.sd_vae || "Automatic";
    if (!vaeNames.includes(vae)) vaeNames.push(vae);  // the server's setting, even if its file is gone
    fillSelect($("sd_vae"), vaeNames.map((n) => [n, n]), vae);
    fillStyles(styles);
    fillSelect($("sampler_name"), samplers.map((s) => [s.name, s.name]), "Euler a");
    fillSelect($("scheduler"), schedulers.map((s) => [s.name, s.label]), "automatic");
    const hires = [...latent, ...upscalers].map((u) => [u.name, u.name]);
    fillSelect($("hr_upscaler"), hires.filter(([n], i) => hires.findIndex(([m]) => m === n) === i), "Latent");
  } catch (e) {
    status(`cannot reach the server: ${e.message}`, true);
  }
}

// ---- saved styles (A1111's styles.csv): checkboxes, applied in the order they were picked
function fillStyles(styles) {
  state.styles = state.styles.filter((name) => styles.some((s) => s.name === name));
  $("styles").replaceChildren(...styles.map((s) => {
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = s.name;
    input.checked = state.styles.includes(s.name);
    input.addEventListener("change", () => pickStyle(s.name, input.checked));
    const order = document.createElement("span");
    order.className = "order";
    order.setAttribute("aria-hidden", "true");  // the live line below says the order in words
    const label = document.createElement("label");
    label.className = "check";
    const text = [s.prompt && `prompt: ${s.prompt}`, s.negative_prompt && `negative prompt: ${s.negative_prompt}`];
    label.title = text.filter(Boolean).join("\n") || "(no text)";
    label.append(input, ` ${s.name} `, order);
    return label;
  }));
  $("styles-panel").hidden = styles.length === 0;
  showStyleOrder();
}

function pickStyle(name, on) {
  state.styles = state.styles.filter((n) => n !== name);
  if (on) state.styles.push(name);
  showStyleOrder();
}

function showStyleOrder() {
  for (const input of $("styles").querySelectorAll("input")) {
    const i = state.styles.indexOf(input.value);
    input.parentElement.querySelector(".order").textContent = i < 0 ? "" : String(i + 1);
  }
  const line = $("styles-order");
  line.textContent = state.styles.length ? `applied in this order: ${state.styles.join(", ")}` : "";
  line.hidden = !state.styles.length;
}

function setMode(mode) {
  state.mode = mode;
  for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-selected", String(b.dataset.mode === mode));
  $("img2img-panel").hidden = mode !== "img2img";
  $("hires-panel").hidden = mode !== "txt2img";  // A1111's Hires. fix is a txt2img pass
}

// ---- init image and mask
function showInit(dataUrl) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      state.initData = dataUrl;
      for (const c of [$("init-canvas"), $("mask-canvas")]) { c.width = img.naturalWidth; c.height = img.naturalHeight; }
      $("init-canvas").getContext("2d").drawImage(img, 0, 0);
      clearMask();
      $("width").value = Math.max(64, Math.round(img.naturalWidth / 8) * 8);
      $("height").value = Math.max(64, Math.round(img.naturalHeight / 8) * 8);
      resolve();
    };
    img.onerror = () => reject(new Error("not an image"));
    img.src = dataUrl;
  });
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function clearMask() {
  const c = $("mask-canvas");
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
  state.maskDirty = false;
}

function maskAll() {
  const c = $("mask-canvas");
  const ctx = c.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, c.width, c.height);
  state.maskDirty = true;
}

function setupMaskDrawing() {
  const c = $("mask-canvas");
  let drawing = false;
  let last = null;
  const point = (e) => {
    const r = c.getBoundingClientRect();
    return [(e.clientX - r.left) * (c.width / r.width), (e.clientY - r.top) * (c.height / r.height)];
  };
  const stroke = (p) => {
    const ctx = c.getContext("2d");
    const scale = c.width / c.getBoundingClientRect().width;
    ctx.strokeStyle = ctx.fillStyle = "#fff";
    ctx.lineWidth = Number($("brush").value) * scale;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...(last || p));
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    state.maskDirty = true;
  };
  c.addEventListener("pointerdown", (e) => { drawing = true; last = null; c.setPointerCapture(e.pointerId); stroke(point(e)); });
  c.addEventListener("pointermove", (e) => { if (drawing) stroke(point(e)); });
  for (const ev of ["pointerup", "pointercancel"]) c.addEventListener(ev, () => { drawing = false; last = null; });
}

function maskDataUrl() {
  const src = $("mask-canvas");
  const out = document.createElement("canvas");
  out.width = src.width;
  out.height = src.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(src, 0, 0);
  return out.toDataURL("image/png");
}

// ---- generation
function payload() {
  const num = (id) => Number($(id).value);
  const body = {
    mode: state.mode,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value,
    scheduler: $("scheduler").value,
    steps: num("steps"), cfg_scale: num("cfg_scale"), width: num("width"), height: num("height"),
    seed: num("seed"), batch_size: num("batch_size"), n_iter: num("n_iter"),
    override_settings: { sd_model_checkpoint: $("model").value },
  };
  if ($("sd_vae").value) body.override_settings.sd_vae = $("sd_vae").value;
  if (state.styles.length) body.styles = [...state.styles];
  if ($("tiling").checked) body.tiling = true;
  if (state.mode === "txt2img" && $("enable_hr").checked) {
    Object.assign(body, { enable_hr: true, hr_scale: num("hr_scale"), hr_upscaler: $("hr_upscaler").value,
      hr_second_pass_steps: num("hr_second_pass_steps"), denoising_strength: num("hr_denoising_strength"),
      hr_prompt: $("hr_prompt").value });
  }
  if (state.mode === "img2img") {
    if (!state.initData) throw new Error("img2img needs an init image: choose one or use 'Send to img2img'");
    body.init_images = [state.initData];
    body.denoising_strength = num("denoising_strength");
    if (state.maskDirty) {
      Object.assign(body, { mask: maskDataUrl(), mask_blur: num("mask_blur"), inpainting_fill: num("inpainting_fill"),
        inpaint_full_res: false });
    }
  }
  return body;
}

async function generate(event) {
  if (event) event.preventDefault();
  if (state.job) return;
  let job;
  markInvalid(null);
  try {
    job = await api("/latentforge/v1/jobs", { method: "POST", body: payload() });
  } catch (e) {
    status(e.message, true);
    markInvalid(e.field);
    return;
  }
  state.job = job.id;
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  $("progress").hidden = false;
  $("progress").value = 0;
  status("queued");
  const source = new EventSource(`/latentforge/v1/jobs/${job.id}/events`);
  state.source = source;
  source.addEventListener("progress", (e) => {
    const j = JSON.parse(e.data);
    $("progress").value = j.progress;
    status(j.state === "running" ? `step ${j.step} of ${j.steps}, pass ${j.iteration + 1} of ${j.iterations}` : j.state);
    if (j.current_image) { $("preview").src = `data:image/png;base64,${j.current_image}`; $("preview").hidden = false; }
  });
  source.addEventListener("done", (e) => { finish(JSON.parse(e.data)); });
  source.onerror = () => { if (state.job === job.id) { status("lost the connection to the server", true); finish(null); } };
}

// the control of a request field the server refused (its 400's "field"), marked until the next try
const FIELD_CONTROLS = {
  "override_settings.sd_model_checkpoint": "model", sd_model_checkpoint: "model",
  "override_settings.sd_vae": "sd_vae", styles: "styles-panel",
};

function markInvalid(field) {
  for (const el of $("form").querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  if (!field) return;
  let id = FIELD_CONTROLS[field] || field;
  if (id === "denoising_strength" && state.mode === "txt2img") id = "hr_denoising_strength";
  const el = document.getElementById(id);
  if (el && $("form").contains(el) && el.matches("input, select, textarea, fieldset")) {
    el.setAttribute("aria-invalid", "true");
  }
}

function finish(j) {
  if (state.source) state.source.close();
  state.source = null;
  state.job = null;
  $("generate").disabled = false;
  $("interrupt").disabled = true;
  $("progress").hidden = true;
  if (!j) return;
  if (j.state === "failed") { status(j.error || "failed", true); return; }
  const images = j.images || [];
  status(`${j.state}: ${images.length} image(s)`);
  images.forEach((b64, i) => addCard(b64, (j.infotexts || [])[i] || ""));
}

function addCard(b64, infotext) {
  const card = document.createElement("figure");
  card.className = "card";
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${b64}`;
  img.alt = infotext.split("\n")[0] || "generated image";
  const text = document.createElement("pre");
  text.className = "infotext";
  text.textContent = infotext;
  const reuse = button("Reuse parameters", () => reuseFromImage(b64));
  const send = button("Send to img2img", async () => { setMode("img2img"); await showInit(img.src); $("init-canvas").scrollIntoView(); });
  const save = document.createElement("a");
  save.href = img.src;
  save.download = "latentforge.png";
  save.textContent = "Download";
  card.append(img, text, reuse, send, save);
  $("gallery").prepend(card);
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

// ---- PNG info and reuse
let lastInfo = null;

async function pngInfo(b64) {
  const info = await api("/sdapi/v1/png-info", { method: "POST", body: { image: b64 } });
  return info;
}

async function reuseFromImage(b64) {
  try { applyParameters((await pngInfo(b64)).parameters); } catch (e) { status(e.message, true); }
}

function applyParameters(p) {
  if (!p || !Object.keys(p).length) { status("the image carries no parameters", true); return; }
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = v; };
  set("prompt", p.Prompt);
  set("negative_prompt", p["Negative prompt"] || "");
  set("steps", p.Steps);
  set("cfg_scale", p["CFG scale"]);
  set("seed", p.Seed);
  set("width", p["Size-1"]); set("height", p["Size-2"]);  // png-info splits sizes as A1111 does
  if (p.Sampler) set("sampler_name", p.Sampler);
  if (p["Schedule type"]) {
    const opt = [...$("scheduler").options].find((o) => o.textContent === p["Schedule type"]);
    if (opt) $("scheduler").value = opt.value;
  }
  const hires = ["Hires upscale", "Hires resize", "Hires upscaler"].some((k) => p[k] !== undefined);  // hires was on
  $("enable_hr").checked = hires;
  if (hires) {
    set("hr_scale", p["Hires upscale"]);
    set("hr_second_pass_steps", p["Hires steps"] || 0);
    set("hr_denoising_strength", p["Denoising strength"]);
    set("hr_prompt", p["Hires prompt"] || "");
    const upscaler = p["Hires upscaler"] ?? "Latent"; // absent: A1111's default
    const opt = [...$("hr_upscaler").options].find((o) => o.value === upscaler);
    if (opt) $("hr_upscaler").value = opt.value;
  } else if (p["Denoising strength"]) set("denoising_strength", p["Denoising strength"]);
  $("tiling").checked = String(p.Tiling).toLowerCase() === "true";
  let note = "";
  if (p.VAE) {  // A1111 writes the VAE's file name; a name without its suffix is taken too
    const stem = (n) => n.replace(/\.[^.]*$/, "");
    const options = [...$("sd_vae").options];
    const opt = options.find((o) => o.value === p.VAE) || options.find((o) => stem(o.value) === p.VAE);
    if (opt) $("sd_vae").value = opt.value;
    else note = ` (VAE ${p.VAE} is not on this server: kept ${$("sd_vae").value})`;
  }
  status(`parameters reused${note}`);
  $("prompt").focus();
}

async function showPngFile(file) {
  try {
    const dataUrl = await readFile(file);
    const info = await pngInfo(dataUrl);
    lastInfo = info.parameters;
    $("pnginfo").textContent = info.info || "(no parameters in this image)";
    $("pnginfo-reuse").disabled = !info.info;
  } catch (e) {
    $("pnginfo").textContent = e.message;
  }
}

function setup() {
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("form").addEventListener("submit", generate);
  $("form").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) generate(e); });
  $("interrupt").addEventListener("click", () => { if (state.job) api(`/latentforge/v1/jobs/${state.job}`, { method: "DELETE" }); });
  $("init-file").addEventListener("change", async (e) => { if (e.target.files[0]) await showInit(await readFile(e.target.files[0])); });
  $("mask-all").addEventListener("click", maskAll);
  $("mask-clear").addEventListener("click", clearMask);
  setupMaskDrawing();
  const zone = $("dropzone");
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); if (e.dataTransfer.files[0]) showPngFile(e.dataTransfer.files[0]); });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("png-file").click(); } });
  $("png-file").addEventListener("change", (e) => { if (e.target.files[0]) showPngFile(e.target.files[0]); });
  $("pnginfo-reuse").addEventListener("click", () => applyParameters(lastInfo));
  loadLists();
}

setup();
