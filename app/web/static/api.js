// The JSON API, called with the key kept in localStorage. Every route needs the
// Authorization header, which is why downloads and streams go through fetch too:
// neither a plain link nor EventSource can send it.
import { h } from "./dom.js";

const KEY = "sbora.apiKey";

export const auth = {
  get key() { return localStorage.getItem(KEY) || ""; },
  set(key) { localStorage.setItem(KEY, key); },
  clear() { localStorage.removeItem(KEY); },
};

export class ApiError extends Error {
  constructor(status, body) {
    super(describe(status, body));
    this.status = status;
    this.body = body;
  }

  // Field errors by dotted path ("method.r"), from FastAPI's `detail` list.
  fieldErrors() {
    const out = {};
    const detail = this.body && this.body.detail;
    if (!Array.isArray(detail)) return out;
    for (const e of detail) {
      const field = (e.loc || []).filter((p) => p !== "body").join(".") || "_";
      (out[field] ||= []).push(e.msg);
    }
    return out;
  }
}

function describe(status, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((e) => `${(e.loc || []).filter((p) => p !== "body").join(".")}: ${e.msg}`).join("; ");
  }
  return `HTTP ${status}`;
}

export async function request(path, { method = "GET", json, form, signal } = {}) {
  const headers = { Authorization: `Bearer ${auth.key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form; // the browser sets the multipart boundary
  }
  const res = await fetch(path, { method, headers, body, signal });
  if (res.status === 401) window.dispatchEvent(new CustomEvent("sbora:unauthorized"));
  if (!res.ok) {
    let payload = null;
    try { payload = await res.json(); } catch { /* not JSON */ }
    throw new ApiError(res.status, payload);
  }
  return res;
}

export async function api(path, options) {
  const res = await request(path, options);
  return res.status === 204 ? null : res.json();
}

// Server-sent events from a fetch Response: yields {event, data, id} per message.
export async function* sse(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = parseBlock(block);
        if (message) yield message;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function parseBlock(block) {
  const message = { event: "message", data: "", id: null };
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue; // comments keep the connection alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") message.event = value;
    else if (field === "data") data.push(value);
    else if (field === "id") message.id = value;
  }
  if (!data.length) return null;
  message.data = data.join("\n");
  return message;
}

// Save a file from an authenticated route: fetch it as a Blob and click a temporary link.
export async function download(path, fallbackName) {
  const res = await request(path);
  const blob = await res.blob();
  const disposition = res.headers.get("Content-Disposition") || "";
  const match = /filename\*?=(?:UTF-8'')?"?([^";]+)"?/i.exec(disposition);
  const url = URL.createObjectURL(blob);
  const link = h("a", { href: url, download: match ? decodeURIComponent(match[1]) : fallbackName });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
  return blob.size;
}
