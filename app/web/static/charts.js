// Charts drawn by hand on <canvas>: the loss curve and the per-layer heat strips.

const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
export const UNTOUCHED = "#e5e7eb";
const MIN_BAR_PX = 2; // one changed column out of thousands must stay visible

export function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - i;
  const [a, b] = [VIRIDIS[i], VIRIDIS[i + 1]];
  return `rgb(${a.map((v, k) => Math.round(v + f * (b[k] - v))).join(",")})`;
}

// Size the backing store to the element's CSS size times the pixel ratio; draw in CSS pixels.
function setup(canvas) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || Number(canvas.getAttribute("width")) || 300;
  const height = canvas.clientHeight || Number(canvas.getAttribute("height")) || 150;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, height);
  return { ctx, w, h: height };
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / mag;
  return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
}

function ticks(min, max, count) {
  const step = niceStep(max - min, count);
  const out = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function tickLabel(v) {
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? v.toExponential(1) : String(Number(v.toPrecision(4)));
}

// train, val: [{step, loss}] in step order.
export function drawLossChart(canvas, train, val) {
  const { ctx, w, h } = setup(canvas);
  canvas.dataset.trainPoints = String(train.length);
  canvas.dataset.valPoints = String(val.length);
  const pad = { l: 56, r: 16, t: 28, b: 36 };
  const points = [...train, ...val];
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#6b7280";
  if (!points.length) {
    ctx.textAlign = "center";
    ctx.fillText("waiting for the first step…", w / 2, h / 2);
    return;
  }
  const xmin = Math.min(...points.map((p) => p.step));
  const xmax = Math.max(xmin + 1, ...points.map((p) => p.step));
  let ymin = Math.min(...points.map((p) => p.loss));
  let ymax = Math.max(...points.map((p) => p.loss));
  const margin = (ymax - ymin) * 0.08 || Math.abs(ymax) * 0.1 || 0.5;
  ymin -= margin;
  ymax += margin;
  const X = (s) => pad.l + ((s - xmin) / (xmax - xmin)) * (w - pad.l - pad.r);
  const Y = (v) => h - pad.b - ((v - ymin) / (ymax - ymin)) * (h - pad.t - pad.b);

  ctx.strokeStyle = "#e5e7eb";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (const v of ticks(ymin, ymax, 5)) {
    ctx.beginPath(); ctx.moveTo(pad.l, Y(v)); ctx.lineTo(w - pad.r, Y(v)); ctx.stroke();
    ctx.fillText(tickLabel(v), pad.l - 6, Y(v));
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (const s of ticks(xmin, xmax, 8).filter(Number.isInteger)) {
    ctx.beginPath(); ctx.moveTo(X(s), h - pad.b); ctx.lineTo(X(s), h - pad.b + 4); ctx.stroke();
    ctx.fillText(String(s), X(s), h - pad.b + 6);
  }
  ctx.fillText("step", (pad.l + w - pad.r) / 2, h - 16);
  ctx.strokeStyle = "#9ca3af";
  ctx.strokeRect(pad.l, pad.t, w - pad.l - pad.r, h - pad.t - pad.b);

  series(ctx, train, X, Y, "#2563eb", []);
  series(ctx, val, X, Y, "#ea580c", [6, 4]);
  legend(ctx, w - pad.r, 8, [["train loss", "#2563eb", train.length], ["validation loss", "#ea580c", val.length]]);
}

function series(ctx, pts, X, Y, stroke, dash) {
  if (!pts.length) return;
  ctx.strokeStyle = stroke;
  ctx.fillStyle = stroke;
  ctx.lineWidth = 2;
  ctx.setLineDash(dash);
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p.step), Y(p.loss)) : ctx.moveTo(X(p.step), Y(p.loss))));
  ctx.stroke();
  ctx.setLineDash([]);
  if (pts.length <= 60 || dash.length) {
    for (const p of pts) { ctx.beginPath(); ctx.arc(X(p.step), Y(p.loss), 2.5, 0, 2 * Math.PI); ctx.fill(); }
  }
}

function legend(ctx, right, top, entries) {
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  let x = right;
  for (const [label, stroke, n] of entries.filter((e) => e[2]).reverse()) {
    x -= ctx.measureText(label).width + 26;
    ctx.fillStyle = stroke;
    ctx.fillRect(x, top + 5, 14, 3);
    ctx.fillStyle = "#374151";
    ctx.fillText(label, x + 18, top + 7);
  }
}

// One adapted layer as a strip: x spans the layer's columns (or rows); changed ones are coloured.
export function drawStrip(canvas, module, maxNorm) {
  const { ctx, w, h } = setup(canvas);
  ctx.fillStyle = UNTOUCHED;
  ctx.fillRect(0, 0, w, h);
  const order = module.indices.map((_, k) => k).sort((a, b) => module.norms[a] - module.norms[b]);
  for (const k of order) { // the largest changes are drawn last, on top
    const [x, width] = barSpan(module.indices[k], module.dimension, w);
    ctx.fillStyle = colour(maxNorm > 0 ? module.norms[k] / maxNorm : 0);
    ctx.fillRect(x, 0, width, h);
  }
}

function barSpan(index, dimension, w) {
  const x0 = (index / dimension) * w;
  const x1 = ((index + 1) / dimension) * w;
  const width = Math.max(MIN_BAR_PX, x1 - x0);
  return [x0 - (width - (x1 - x0)) / 2, width];
}

// The changed column/row under CSS x-coordinate `x`, or null (for the tooltip).
export function stripHit(module, x, w) {
  let best = null;
  module.indices.forEach((index, k) => {
    const [x0, width] = barSpan(index, module.dimension, w);
    const distance = x < x0 ? x0 - x : x > x0 + width ? x - x0 - width : 0;
    if (distance <= 1 && (!best || distance < best.distance)) best = { index, norm: module.norms[k], distance };
  });
  return best;
}

export function drawLegend(canvas) {
  const { ctx, w, h } = setup(canvas);
  for (let x = 0; x < w; x++) {
    ctx.fillStyle = colour(x / (w - 1));
    ctx.fillRect(x, 0, 1, h);
  }
}

// A group's layer as a strip: each member's columns (or rows) in the member's own colour.
export const MEMBER_COLOURS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

export function drawOwners(canvas, layer, slots) {
  const { ctx, w, h } = setup(canvas);
  ctx.fillStyle = UNTOUCHED;
  ctx.fillRect(0, 0, w, h);
  slots.forEach((slot, k) => {
    ctx.fillStyle = MEMBER_COLOURS[k % MEMBER_COLOURS.length];
    for (const index of layer.owners[slot] || []) {
      const [x, width] = barSpan(index, layer.dimension, w);
      ctx.fillRect(x, 0, width, h);
    }
  });
}
