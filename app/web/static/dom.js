// DOM and formatting helpers. Elements are built with textContent, never innerHTML,
// so job names and file names that users typed always stay text.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value" || key === "checked" || key === "selected") el[key] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(n < 10 ? 1 : 0) : n} ${units[i]}`;
}

export function fmtInt(n) {
  return n == null ? "–" : Number(n).toLocaleString("en-US");
}

export function fmtNum(x, digits = 4) {
  if (x == null || Number.isNaN(x)) return "–";
  const a = Math.abs(x);
  return a !== 0 && (a < 1e-3 || a >= 1e5) ? x.toExponential(2) : Number(x.toPrecision(digits)).toString();
}

export function fmtDuration(s) {
  if (s == null) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  // The API answers naive UTC timestamps: say so before the browser reads them as local time.
  const t = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(iso) ? iso : `${iso}Z`);
  return t.toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
}

export function badge(status) {
  return h("span", { class: `badge ${status}`, dataset: { status } }, status);
}

export function progressBar(step, total, status) {
  const pct = total ? Math.min(100, (100 * step) / total) : status === "succeeded" ? 100 : 0;
  return h("div", { class: `progress ${status || ""}`, title: `${step} / ${total ?? "?"} steps` },
    h("div", { class: "fill", style: `width:${pct.toFixed(1)}%` }),
    h("span", {}, total ? `${step} / ${total}` : `${step}`));
}

export function variantLabel(variant) {
  return { sbora_fa: "SBoRA-FA", sbora_fb: "SBoRA-FB", lora: "LoRA" }[variant] || variant;
}

export function shortName(name) {
  return name.replace(/^(base_model\.)?model\./, "");
}
