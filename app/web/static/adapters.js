// Adapters: the registry table, and one adapter's page with its regional update map.
import { api, download } from "./api.js";
import { drawLegend, drawStrip, stripHit } from "./charts.js";
import { fmtBytes, fmtInt, fmtNum, fmtTime, h, shortName, variantLabel } from "./dom.js";

export async function adaptersPage(view, page) {
  const body = h("tbody", { id: "adapters-body" });
  view.append(h("h1", {}, "Adapters"),
    h("table", { class: "table", id: "adapters-table" },
      h("thead", {}, h("tr", {}, ["Adapter", "Base model", "Method", "Trainable parameters", "Size", "Train loss", "Val loss", "Created"]
        .map((t) => h("th", {}, t)))),
      body));
  const adapters = await api("/adapters?limit=200", { signal: page.signal });
  body.replaceChildren(...(adapters.data.length ? adapters.data.map((a) => h("tr", { dataset: { adapterId: a.id } },
    h("td", {}, h("a", { href: `#/adapters/${a.id}` }, a.name || a.id), a.name ? h("div", { class: "muted mono" }, a.id) : null),
    h("td", {}, a.base_model),
    h("td", {}, `${variantLabel(a.variant)} r=${a.r} α=${fmtNum(a.alpha)}`),
    h("td", { class: "num" }, fmtInt(a.trainable_params)),
    h("td", { class: "num" }, fmtBytes(a.size_bytes)),
    h("td", { class: "num" }, fmtNum(a.metrics.train_loss)),
    h("td", { class: "num" }, fmtNum(a.metrics.val_loss)),
    h("td", {}, fmtTime(a.created_at))))
    : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No adapters yet: a job that succeeds registers one."))]));
}

export async function adapterPage(view, page, _query, adapterId) {
  const head = h("div", { class: "title-row" });
  const facts = h("div", { class: "card", id: "adapter-facts" });
  const map = h("section", { class: "card", id: "update-map" }, h("h2", {}, "Regional update map"), h("p", { class: "muted" }, "Loading…"));
  view.append(head, facts, map);

  const [adapter, updates] = await Promise.all([
    api(`/adapters/${adapterId}/metadata`, { signal: page.signal }),
    api(`/adapters/${adapterId}/update-map`, { signal: page.signal })]);
  const button = (id, label, path, name) => {
    const b = h("button", { id, type: "button" }, label);
    b.addEventListener("click", async () => {
      b.disabled = true;
      try { await download(path, name); } catch (err) { page.fail(err); } finally { b.disabled = false; }
    });
    return b;
  };
  head.replaceChildren(h("h1", {}, "Adapter ", h("span", { class: "mono" }, adapter.name || adapter.id)),
    h("div", { class: "row" },
      button("download-sparse", "Download sparse (.zip)", `/adapters/${adapter.id}`, `${adapter.id}.zip`),
      button("download-peft", "Download PEFT (.zip)", `/adapters/${adapter.id}?format=peft`, `${adapter.id}-peft.zip`),
      h("a", { class: "button secondary", href: `#/playground?adapter=${adapter.id}` }, "Open in playground")));
  const rows = [["id", adapter.id], ["base model", adapter.base_model], ["method", `${variantLabel(adapter.variant)}, r=${adapter.r}, α=${fmtNum(adapter.alpha)}`],
    ["trainable parameters", fmtInt(adapter.trainable_params)], ["size", fmtBytes(adapter.size_bytes)],
    ["layers", `${updates.modules.length} (${adapter.target_modules.join(", ")})`],
    ["job", adapter.job_id ? h("a", { href: `#/jobs/${adapter.job_id}` }, adapter.job_id) : "–"],
    ["created", fmtTime(adapter.created_at)], ["sha256", h("span", { class: "mono", title: adapter.sha256 }, adapter.sha256.slice(0, 16) + "…")],
    ...Object.entries(adapter.metrics).map(([k, v]) => [k, typeof v === "number" ? fmtNum(v) : v == null ? "–" : String(v)])];
  facts.replaceChildren(h("dl", { class: "stats" }, rows.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))));
  renderMap(map, updates, page);
}

function renderMap(section, updates, page) {
  const axis = updates.modules[0]?.axis || "columns";
  const perLayer = h("input", { type: "checkbox", id: "scale-per-layer" });
  const legend = h("canvas", { class: "legend" });
  const legendMax = h("span", { class: "mono" });
  const strips = h("div", { class: "strips" });
  const tooltip = h("div", { class: "tooltip", hidden: true });
  section.replaceChildren(h("h2", {}, "Regional update map"),
    h("p", { class: "muted" }, `One strip per adapted layer. Across: the layer's ${axis} `,
      axis === "rows" ? "(output features)" : "(input features)",
      `. Coloured: the ${axis} this adapter changes, by the L2 norm of the change (α/r)·`,
      updates.variant === "sbora_fb" ? "A" : "B", ` in each. Grey ${axis} are bit-identical to the base model's.`),
    h("div", { class: "row legend-row" }, "0", legend, legendMax, h("label", { class: "inline" }, perLayer, " colour scale per layer")),
    strips, tooltip);

  const items = updates.modules.map((m) => {
    const canvas = h("canvas", { class: "strip-canvas" });
    const row = h("div", { class: "strip", dataset: { module: m.name, axis: m.axis, dimension: m.dimension, indices: m.indices.join(",") } },
      h("div", { class: "strip-label mono", title: m.name }, shortName(m.name)), canvas,
      h("div", { class: "strip-count muted" }, `${m.indices.length} / ${fmtInt(m.dimension)} ${m.axis}`));
    canvas.addEventListener("mousemove", (event) => {
      const hit = stripHit(m, event.offsetX, canvas.clientWidth);
      tooltip.hidden = !hit;
      if (!hit) return;
      tooltip.textContent = `${shortName(m.name)} · ${m.axis === "rows" ? "row" : "column"} ${hit.index} · ‖Δ‖ = ${fmtNum(hit.norm)}`;
      tooltip.style.left = `${event.pageX + 12}px`;
      tooltip.style.top = `${event.pageY + 12}px`;
    });
    canvas.addEventListener("mouseleave", () => { tooltip.hidden = true; });
    strips.append(row);
    return [m, canvas];
  });
  const draw = () => {
    drawLegend(legend);
    legendMax.textContent = perLayer.checked ? "max of each layer" : fmtNum(updates.max_norm);
    for (const [m, canvas] of items) drawStrip(canvas, m, perLayer.checked ? Math.max(...m.norms, 0) : updates.max_norm);
  };
  perLayer.addEventListener("change", draw);
  window.addEventListener("resize", draw, { signal: page.signal });
  draw();
}
