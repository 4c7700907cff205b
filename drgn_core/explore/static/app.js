// drgn explore: the page. Draws a subsample of the particles; every count, threshold and selection is
// computed by the server over all particles. No third-party code; nothing is fetched from elsewhere.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
const state = {
  meta: null, x: null, y: null, c: null, pts: null, sel: null, shapes: [], thresholds: {},
  drawing: null, clicked: null, hover: null, view: null, path: null, anchors: [], maps: [], mapIndex: 0,
  hist: null, busy: 0,
};

// ---- server calls ------------------------------------------------------------------------------------
function url(path, params) {
  const q = new URLSearchParams(Object.assign({ token: TOKEN }, params || {}));
  return `${path}?${q}`;
}
async function call(path, { params, body, binary } = {}) {
  const opts = { headers: { "X-Drgn-Token": TOKEN } };
  if (body !== undefined) {
    opts.method = "POST";
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  state.busy++;
  document.body.dataset.busy = state.busy;
  try {
    const r = await fetch(url(path, params), opts);
    if (!r.ok) {
      let msg = `${r.status}`;
      try { msg = (await r.json()).error; } catch (e) { /* not JSON */ }
      throw new Error(msg);
    }
    return binary ? await r.arrayBuffer() : await r.json();
  } finally {
    state.busy--;
    document.body.dataset.busy = state.busy;
  }
}
function status(msg, isError) {
  $("status").textContent = msg;
  $("status").style.color = isError ? "#f88" : "#fc6";
}
function guard(fn) {
  return async (...a) => {
    try { await fn(...a); } catch (e) { status(e.message, true); }
  };
}
const selection = () => ({ shapes: state.shapes, thresholds: state.thresholds });

// ---- colours -------------------------------------------------------------------------------------------
const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
const PALETTE = [[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
  [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207], [0, 0, 128], [128, 128, 0]];
function colourOf(v, lo, hi, categorical) {
  if (!Number.isFinite(v)) return [200, 200, 200];
  if (categorical) return PALETTE[((Math.round(v) % 12) + 12) % 12];
  let t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  t = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t)), f = t - i;
  return VIRIDIS[i].map((a, k) => a + f * (VIRIDIS[i + 1][k] - a));
}

// ---- scatter ---------------------------------------------------------------------------------------------
function setView() {
  const [x0, x1] = state.meta.ranges[state.x], [y0, y1] = state.meta.ranges[state.y];
  const px = (x1 - x0) * 0.03 || 1, py = (y1 - y0) * 0.03 || 1;
  state.view = { x0: x0 - px, x1: x1 + px, y0: y0 - py, y1: y1 + py };
  const cv = $("scatter");
  for (const k of ["x0", "x1", "y0", "y1"]) cv.dataset[k] = String(state.view[k]);
}
// pixel <-> data: the test suite repeats exactly this arithmetic from the canvas's data-* attributes
function toData(px, py) {
  const v = state.view, cv = $("scatter");
  return [v.x0 + px * (v.x1 - v.x0) / cv.width, v.y1 - py * (v.y1 - v.y0) / cv.height];
}
function toPixel(x, y) {
  const v = state.view, cv = $("scatter");
  return [(x - v.x0) / (v.x1 - v.x0) * cv.width, (v.y1 - y) / (v.y1 - v.y0) * cv.height];
}

async function loadPoints() {
  const buf = await call("/api/points", { params: { x: state.x, y: state.y, c: state.c }, binary: true });
  const n = state.meta.n_sample;
  state.pts = { x: new Float32Array(buf, 0, n), y: new Float32Array(buf, 4 * n, n),
    c: new Float32Array(buf, 8 * n, n) };
  setView();
  draw(true);
}

// The point layer is rebuilt only when the points or the selection change (`points` true); drawing a
// lasso, a path or the clicked point repaints the cached layer and the outlines only.
function draw(points) {
  const cv = $("scatter"), ctx = cv.getContext("2d"), W = cv.width, H = cv.height;
  if (points || !state.base) state.base = pointLayer(ctx, W, H);
  ctx.putImageData(state.base, 0, 0);
  drawOverlays(ctx);
}
function pointLayer(ctx, W, H) {
  const img = ctx.createImageData(W, H), d = img.data;
  d.fill(255);
  const p = state.pts;
  if (p) {
    const v = state.view, sx = W / (v.x1 - v.x0), sy = H / (v.y1 - v.y0);
    const cat = state.meta.categorical.includes(state.c);
    const [lo, hi] = state.meta.ranges[state.c];
    // 2-px points for dense plots, 3-px when few are drawn
    const size = p.x.length < 20000 ? 3 : 2, offs = [];
    for (let a = 0; a < size; a++) for (let b = 0; b < size; b++) offs.push(4 * (a * W + b));
    const sel = state.sel, anySel = sel && (state.shapes.length || Object.keys(state.thresholds).length);
    // two passes: unselected points first (grey), selected on top (in colour)
    for (const pass of anySel ? [0, 1] : [1]) {
      for (let i = 0; i < p.x.length; i++) {
        const inSel = !anySel || ((sel[i >> 3] >> (i & 7)) & 1);
        if ((pass === 1) !== Boolean(inSel)) continue;
        const X = Math.floor((p.x[i] - v.x0) * sx), Y = Math.floor((v.y1 - p.y[i]) * sy);
        if (X < 0 || Y < 0 || X >= W - size || Y >= H - size) continue;
        const col = pass === 1 ? colourOf(p.c[i], lo, hi, cat) : [205, 205, 205];
        for (const o of offs) {
          const k = 4 * (Y * W + X) + o;
          d[k] = col[0]; d[k + 1] = col[1]; d[k + 2] = col[2];
        }
      }
    }
  }
  return img;
}
function drawOverlays(ctx) {
  // shapes drawn on these axes, the one being drawn, the traversal path, the clicked point
  const outline = (pts, colour, close) => {
    if (!pts || pts.length < 2) return;
    ctx.beginPath();
    pts.forEach(([x, y], i) => { const [a, b] = toPixel(x, y); i ? ctx.lineTo(a, b) : ctx.moveTo(a, b); });
    if (close) ctx.closePath();
    ctx.strokeStyle = colour; ctx.lineWidth = 1.5; ctx.stroke();
  };
  for (const s of state.shapes) {
    if (s.kind === "saved" || s.x !== state.x || s.y !== state.y) continue;
    const pts = s.kind === "box" ? boxCorners(s.points) : s.points;
    outline(pts, s.op === "subtract" ? "#c00" : s.op === "intersect" ? "#06c" : "#000", true);
  }
  if (state.drawing) {
    const pts = state.drawing.kind === "box" ? boxCorners(state.drawing.points) : state.drawing.points;
    outline(pts, "#f60", state.drawing.kind === "box");
  }
  if (state.path && state.path.x === state.x && state.path.y === state.y) {
    outline(state.path.xy, "#e0e", false);
  }
  if (state.clicked !== null && state.clickedXY) {
    const [a, b] = toPixel(...state.clickedXY);
    ctx.beginPath(); ctx.arc(a, b, 5, 0, 2 * Math.PI); ctx.strokeStyle = "#f00"; ctx.stroke();
  }
}
function boxCorners(pts) {
  const [a, b] = [pts[0], pts[pts.length - 1]];
  return [[a[0], a[1]], [b[0], a[1]], [b[0], b[1]], [a[0], b[1]]];
}

function nearest(px, py, radius) {
  const p = state.pts;
  if (!p) return -1;
  let best = -1, bd = radius * radius;
  for (let i = 0; i < p.x.length; i++) {
    const [a, b] = toPixel(p.x[i], p.y[i]);
    const dd = (a - px) ** 2 + (b - py) ** 2;
    if (dd < bd) { bd = dd; best = i; }
  }
  return best;
}

async function refreshSelection() {
  const r = await call("/api/select", { body: { selection: selection() } });
  const raw = atob(r.sample_mask);
  state.sel = Uint8Array.from(raw, (ch) => ch.charCodeAt(0));
  $("count").textContent = r.count;
  $("count").dataset.count = r.count;
  $("total").textContent = r.n;
  const desc = state.shapes.map((s, i) => `${i + 1}. ${s.op} ${s.kind}` +
    (s.kind === "saved" ? ` ${s.path}` : ` on ${s.x} × ${s.y} (${s.points.length} points)`));
  $("shapes").textContent = desc.join("; ");
  $("thresholds").textContent = Object.entries(state.thresholds)
    .map(([k, [lo, hi]]) => `${lo.toPrecision(5)} ≤ ${k} ≤ ${hi.toPrecision(5)}`).join("; ");
  draw(true);
  drawHist();
}

// mouse on the scatter: lasso, box, or pick; hover shows the nearest drawn particle
function canvasXY(e) {
  const r = $("scatter").getBoundingClientRect();
  return [e.clientX - r.left, e.clientY - r.top];
}
function setupScatter() {
  const cv = $("scatter");
  cv.addEventListener("mousedown", (e) => {
    const tool = $("tool").value;
    const [px, py] = canvasXY(e);
    if (tool === "pick") return;
    state.drawing = { kind: tool, points: [toData(px, py)] };
  });
  cv.addEventListener("mousemove", (e) => {
    const [px, py] = canvasXY(e);
    if (state.drawing) {
      if (state.drawing.kind === "box") state.drawing.points[1] = toData(px, py);
      else state.drawing.points.push(toData(px, py));
      draw();
      return;
    }
    const i = nearest(px, py, 6);
    if (i >= 0 && i !== state.hover) { state.hover = i; guard(showParticle)(i, false); }
  });
  window.addEventListener("mouseup", guard(async () => {
    const d = state.drawing;
    if (!d) return;
    state.drawing = null;
    const enough = d.kind === "box" ? d.points.length === 2 : d.points.length >= 3;
    if (!enough) { draw(); return; }
    state.shapes.push({ op: $("op").value, kind: d.kind, x: state.x, y: state.y, points: d.points });
    await refreshSelection();
  }));
  cv.addEventListener("click", guard(async (e) => {
    if ($("tool").value !== "pick") return;
    const [px, py] = canvasXY(e);
    const i = nearest(px, py, 8);
    if (i >= 0) await showParticle(i, true);
  }));
}

async function showParticle(i, clicked) {
  const pos = state.samplePos[i];
  const r = await call("/api/particle", { params: { pos } });
  const v = r.values;
  const keys = [state.x, state.y, state.c].filter((k, j, a) => a.indexOf(k) === j);
  $("info").textContent = `row ${r.row} (run position ${pos}) · ` + keys.map((k) => `${k} = ${v[k].toPrecision(4)}`).join(" · ");
  $("info").dataset.row = r.row;
  $("info").dataset.pos = pos;
  if (state.meta.has_images) $("particle-img").src = url("/api/image", { pos });
  if (clicked) {
    state.clicked = pos;
    state.clickedXY = [v[state.x], v[state.y]];
    $("info").dataset.clicked = pos;
    draw();
  }
}

// ---- histogram with threshold handles ----------------------------------------------------------------------
async function loadHist() {
  state.hist = await call("/api/hist", { params: { col: $("hcol").value } });
  const t = state.thresholds[$("hcol").value];
  const e = state.hist.edges;
  $("thr-lo").value = t ? t[0] : e[0];
  $("thr-hi").value = t ? t[1] : e[e.length - 1];
  drawHist();
}
function drawHist() {
  const h = state.hist, cv = $("hist"), ctx = cv.getContext("2d");
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (!h) return;
  const e = h.edges, n = h.counts.length, top = Math.max(...h.counts, 1);
  const X = (v) => (v - e[0]) / (e[n] - e[0] || 1) * cv.width;
  ctx.fillStyle = "#789";
  h.counts.forEach((c, i) => {
    const hh = (cv.height - 4) * Math.log1p(c) / Math.log1p(top);
    ctx.fillRect(X(e[i]), cv.height - hh, Math.max(1, X(e[i + 1]) - X(e[i]) - 0.5), hh);
  });
  const lo = parseFloat($("thr-lo").value), hi = parseFloat($("thr-hi").value);
  ctx.fillStyle = "rgba(255,120,0,0.15)";
  ctx.fillRect(X(lo), 0, X(hi) - X(lo), cv.height);
  ctx.strokeStyle = "#e60"; ctx.lineWidth = 2;
  for (const v of [lo, hi]) { ctx.beginPath(); ctx.moveTo(X(v), 0); ctx.lineTo(X(v), cv.height); ctx.stroke(); }
}
function setupHist() {
  const cv = $("hist");
  let dragging = null;
  const value = (e) => {
    const h = state.hist, r = cv.getBoundingClientRect(), n = h.counts.length;
    return h.edges[0] + (e.clientX - r.left) / cv.width * (h.edges[n] - h.edges[0]);
  };
  cv.addEventListener("mousedown", (e) => {
    if (!state.hist) return;
    const v = value(e), lo = parseFloat($("thr-lo").value), hi = parseFloat($("thr-hi").value);
    dragging = Math.abs(v - lo) <= Math.abs(v - hi) ? "thr-lo" : "thr-hi";
    $(dragging).value = v; drawHist();
  });
  cv.addEventListener("mousemove", (e) => { if (dragging) { $(dragging).value = value(e); drawHist(); } });
  window.addEventListener("mouseup", guard(async () => {
    if (!dragging) return;
    dragging = null;
    await applyThreshold();
  }));
}
async function applyThreshold() {
  const lo = parseFloat($("thr-lo").value), hi = parseFloat($("thr-hi").value);
  if (!Number.isFinite(lo) || !Number.isFinite(hi)) throw new Error("threshold needs two numbers");
  state.thresholds[$("hcol").value] = [Math.min(lo, hi), Math.max(lo, hi)];
  await refreshSelection();
}

// ---- 3-D isosurface (WebGL2, own code) ---------------------------------------------------------------------
const GL = { gl: null, prog: null, n: 0, radius: 1, rx: -0.4, ry: 0.6 };
function setupGL() {
  const cv = $("vol"), gl = cv.getContext("webgl2");
  if (!gl) { $("volinfo").textContent = "WebGL2 is not available in this browser"; return; }
  const vs = `#version 300 es
    in vec3 p; in vec3 nrm; uniform mat4 m; uniform float s; out vec3 vn;
    void main() { vn = mat3(m) * nrm; vec4 q = m * vec4(p * s, 1.0); gl_Position = vec4(q.xy, -q.z * 0.5, 1.0); }`;
  const fs = `#version 300 es
    precision mediump float; in vec3 vn; out vec4 o;
    void main() { float l = abs(normalize(vn).z); o = vec4(vec3(0.25) + 0.7 * l * vec3(0.85, 0.8, 0.6), 1.0); }`;
  const sh = (type, src) => { const x = gl.createShader(type); gl.shaderSource(x, src); gl.compileShader(x); return x; };
  const prog = gl.createProgram();
  gl.attachShader(prog, sh(gl.VERTEX_SHADER, vs));
  gl.attachShader(prog, sh(gl.FRAGMENT_SHADER, fs));
  gl.linkProgram(prog);
  Object.assign(GL, { gl, prog });
  let drag = null;
  cv.addEventListener("mousedown", (e) => { drag = [e.clientX, e.clientY]; });
  window.addEventListener("mousemove", (e) => {
    if (!drag) return;
    GL.ry += (e.clientX - drag[0]) * 0.01; GL.rx += (e.clientY - drag[1]) * 0.01;
    drag = [e.clientX, e.clientY]; drawGL();
  });
  window.addEventListener("mouseup", () => { drag = null; });
}
function uploadMesh(buf) {
  const { gl, prog } = GL;
  if (!gl) return;
  const head = new Uint32Array(buf, 0, 2), nv = head[0], nf = head[1];
  const verts = new Float32Array(buf, 8, 3 * nv), normals = new Float32Array(buf, 8 + 12 * nv, 3 * nv);
  const faces = new Uint32Array(buf, 8 + 24 * nv, 3 * nf);
  let r = 1e-6;
  for (let i = 0; i < verts.length; i++) r = Math.max(r, Math.abs(verts[i]));
  GL.radius = r * 1.75;
  const vao = gl.createVertexArray();
  gl.bindVertexArray(vao);
  const attr = (name, data) => {
    const b = gl.createBuffer(); gl.bindBuffer(gl.ARRAY_BUFFER, b);
    gl.bufferData(gl.ARRAY_BUFFER, data, gl.STATIC_DRAW);
    const loc = gl.getAttribLocation(prog, name);
    gl.enableVertexAttribArray(loc); gl.vertexAttribPointer(loc, 3, gl.FLOAT, false, 0, 0);
  };
  attr("p", verts); attr("nrm", normals);
  const ib = gl.createBuffer(); gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, ib);
  gl.bufferData(gl.ELEMENT_ARRAY_BUFFER, faces, gl.STATIC_DRAW);
  GL.n = 3 * nf;
  $("vol").dataset.triangles = nf;
  drawGL();
}
function drawGL() {
  const { gl, prog } = GL;
  if (!gl) return;
  const cx = Math.cos(GL.rx), sx = Math.sin(GL.rx), cy = Math.cos(GL.ry), sy = Math.sin(GL.ry);
  // rotation about y then x, column-major
  const m = [cy, sx * sy, -cx * sy, 0, 0, cx, sx, 0, sy, -sx * cy, cx * cy, 0, 0, 0, 0, 1];
  gl.viewport(0, 0, gl.canvas.width, gl.canvas.height);
  gl.clearColor(0.07, 0.07, 0.07, 1); gl.enable(gl.DEPTH_TEST);
  gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT);
  gl.useProgram(prog);
  gl.uniformMatrix4fv(gl.getUniformLocation(prog, "m"), false, new Float32Array(m));
  gl.uniform1f(gl.getUniformLocation(prog, "s"), 1 / GL.radius);
  if (GL.n) gl.drawElements(gl.TRIANGLES, GL.n, gl.UNSIGNED_INT, 0);
}

// ---- maps ------------------------------------------------------------------------------------------------
async function showMaps(maps) {
  state.maps = maps; state.mapIndex = 0;
  $("series").max = String(maps.length - 1); $("series").value = "0";
  await showMap(0, true);
}
async function showMap(i, resetLevel) {
  const m = state.maps[i];
  state.mapIndex = i;
  if (resetLevel || state.level === undefined) state.level = m.level;
  const lv = $("level");
  lv.value = String(Math.round((state.level - m.min) / (m.max - m.min) * 1000));
  $("levelval").textContent = state.level.toPrecision(4);
  $("volinfo").textContent = `${m.label} · D=${m.D} · ${m.apix.toPrecision(4)} Å/px` +
    (state.maps.length > 1 ? ` · ${i + 1}/${state.maps.length}` : "");
  $("volinfo").dataset.id = m.id;
  uploadMesh(await call("/api/mesh", { params: { id: m.id, level: state.level }, binary: true }));
  status(`map ready: ${m.label}`);
}
async function decode(body) {
  status("decoding…");
  const m = await call("/api/volume", { body });
  await showMaps([m]);
}

// ---- setup -------------------------------------------------------------------------------------------------
function fillSelect(sel, names, chosen) {
  sel.innerHTML = "";
  for (const n of names) {
    const o = document.createElement("option"); o.value = n; o.textContent = n; sel.appendChild(o);
  }
  sel.value = chosen;
}
async function refreshSaved() {
  const r = await call("/api/selections");
  fillSelect($("saved"), r.selections, r.selections[r.selections.length - 1] || "");
}

async function main() {
  setupGL();
  const meta = await call("/api/meta");
  state.meta = meta;
  $("runname").textContent = meta.run;
  $("total").textContent = meta.n;
  // the drawn subsample's run positions: the server's order (fixed by its seed)
  [state.x, state.y] = meta.default_axes;
  state.c = meta.default_colour;
  fillSelect($("xcol"), meta.columns, state.x);
  fillSelect($("ycol"), meta.columns, state.y);
  fillSelect($("ccol"), meta.columns, state.c);
  fillSelect($("hcol"), meta.columns, meta.columns.includes("defocus") ? "defocus" : "|z|");
  fillSelect($("kcentre"), Array.from({ length: meta.n_kmeans }, (_, k) => String(k)), "0");
  fillSelect($("lstate"), Array.from({ length: meta.n_states }, (_, k) => String(k)), "0");
  state.samplePos = new Int32Array(await call("/api/sample", { binary: true }));
  await loadPoints();
  setupScatter();
  setupHist();
  await Promise.all([refreshSelection(), loadHist(), refreshSaved()]);

  const onAxes = guard(async () => {
    state.x = $("xcol").value; state.y = $("ycol").value; state.c = $("ccol").value;
    await loadPoints();
    if (state.path) await placePath();
  });
  for (const id of ["xcol", "ycol", "ccol"]) $(id).addEventListener("change", onAxes);
  $("hcol").addEventListener("change", guard(loadHist));
  $("thr-apply").addEventListener("click", guard(applyThreshold));
  $("thr-remove").addEventListener("click", guard(async () => {
    delete state.thresholds[$("hcol").value]; await loadHist(); await refreshSelection();
  }));
  $("undo").addEventListener("click", guard(async () => { state.shapes.pop(); await refreshSelection(); }));
  $("clear").addEventListener("click", guard(async () => {
    state.shapes = []; state.thresholds = {}; await loadHist(); await refreshSelection();
  }));
  $("save").addEventListener("click", guard(async () => {
    const r = await call("/api/save", { body: { selection: selection(), name: $("selname").value } });
    $("selinfo").textContent = `saved ${r.record.count} particles → ${r.path}`;
    $("selinfo").dataset.saved = r.path;
    await refreshSaved();
    status("saved");
  }));
  $("load").addEventListener("click", guard(async () => {
    const r = await call("/api/load", { body: { path: $("saved").value } });
    state.shapes = r.selection.shapes; state.thresholds = r.selection.thresholds;
    await refreshSelection();
    $("selinfo").textContent = `loaded ${r.count} particles from ${$("saved").value}`;
    status("loaded");
  }));
  $("export").addEventListener("click", guard(async () => {
    status("exporting…");
    const r = await call("/api/export", { body: { selection: selection(), name: $("selname").value } });
    $("selinfo").textContent = `exported ${r.n} particles: ` + Object.values(r.files).join(", ");
    $("selinfo").dataset.exported = JSON.stringify(r.files);
    status("exported");
  }));
  $("montage").addEventListener("click", guard(async () => {
    const r = await fetch(url("/api/montage"), { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ selection: selection(), n: 36 }) });
    if (!r.ok) throw new Error((await r.json()).error);
    $("montage-img").src = URL.createObjectURL(await r.blob());
  }));
  $("vol-point").addEventListener("click", guard(async () => {
    if (state.clicked === null) throw new Error("pick a point first (tool: pick, then click)");
    await decode({ kind: "point", pos: state.clicked });
  }));
  $("vol-mean").addEventListener("click", guard(() => decode({ kind: "mean", selection: selection() })));
  $("vol-kmeans").addEventListener("click", guard(() => decode({ kind: "kmeans", k: parseInt($("kcentre").value, 10) })));
  // a landscape state: selected by its label (the landscape's own particle → state mapping), mean map shown
  $("state-select").addEventListener("click", guard(async () => {
    if (!state.meta.n_states) throw new Error("no landscape states (drgn explore --landscape DIR)");
    const k = parseInt($("lstate").value, 10);
    state.shapes = []; state.thresholds = { state: [k, k] };
    $("selname").value = `state_${k}`;
    await loadHist(); await refreshSelection();
  }));
  $("vol-state").addEventListener("click", guard(async () => {
    if (!state.meta.n_states) throw new Error("no landscape states (drgn explore --landscape DIR)");
    await showMaps([await call("/api/state_map", { body: { k: parseInt($("lstate").value, 10) } })]);
  }));
  $("level").addEventListener("change", guard(async () => {
    const m = state.maps[state.mapIndex];
    if (!m) return;
    state.level = m.min + (m.max - m.min) * parseInt($("level").value, 10) / 1000;
    await showMap(state.mapIndex, false);
  }));
  $("series").addEventListener("input", guard(() => showMap(parseInt($("series").value, 10), false)));
  $("vol-save").addEventListener("click", guard(async () => {
    const m = state.maps[state.mapIndex];
    if (!m) throw new Error("decode a map first");
    const r = await call("/api/volume/save", { body: { id: m.id, name: $("volname").value } });
    $("volinfo").dataset.saved = r.path;
    status(`saved ${r.path}`);
  }));
  const showAnchors = () => { $("anchors").textContent = state.anchors.map((a) => a.label).join(" → "); };
  $("anchor-add").addEventListener("click", () => {
    if (state.clicked === null) { status("pick a point first", true); return; }
    state.anchors.push({ pos: state.clicked, label: `row ${$("info").dataset.row}` }); showAnchors();
  });
  $("anchor-centres").addEventListener("click", guard(async () => {
    const r = await call("/api/kmeans");
    state.anchors = r.centres.filter((c) => c.pos !== null).map((c) => ({ pos: c.pos, label: `centre ${c.k}` }));
    showAnchors();
  }));
  $("anchor-clear").addEventListener("click", () => { state.anchors = []; state.path = null; showAnchors(); draw(); });
  $("traverse").addEventListener("click", guard(async () => {
    status("traversing…");
    const r = await call("/api/traverse", { body: { anchors: state.anchors.map((a) => a.pos),
      n_volumes: parseInt($("trav-n").value, 10) || 0, name: $("selname").value + "_path" } });
    state.path = { pos: r.path };
    await placePath();
    if (r.maps) await showMaps(r.maps);
    status(`path of ${r.path.length} particles` + (r.folder ? `; maps in ${r.folder}` : ""));
  }));
  document.body.dataset.ready = "1";
  status("ready");
}
async function placePath() {
  const r = await call("/api/coords", { body: { pos: state.path.pos, x: state.x, y: state.y } });
  state.path.x = state.x; state.path.y = state.y;
  state.path.xy = r.x.map((x, i) => [x, r.y[i]]);
  $("scatter").dataset.path = state.path.pos.length;
  draw();
}

main().catch((e) => status(e.message, true));
