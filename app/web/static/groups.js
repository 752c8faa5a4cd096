// Adapter groups: the list, and one group's page with its index map (which member owns which
// columns or rows of each layer) and its free capacity.
import { api } from "./api.js";
import { MEMBER_COLOURS, drawOwners } from "./charts.js";
import { badge, fmtInt, fmtTime, h, shortName, variantLabel } from "./dom.js";

export async function groupsPage(view, page) {
  const body = h("tbody", { id: "groups-body" });
  view.append(h("h1", {}, "Groups"),
    h("p", { class: "muted" }, "Members of a group get disjoint index sets, so any of them compose exactly. ",
      "Create one with POST /groups or `sbora groups create`; a job joins with `group`."),
    h("table", { class: "table", id: "groups-table" },
      h("thead", {}, h("tr", {}, ["Group", "Base model", "Method", "Members", "Free", "Created"].map((t) => h("th", {}, t)))),
      body));
  const groups = await api("/groups?limit=200", { signal: page.signal });
  body.replaceChildren(...(groups.data.length ? groups.data.map((g) => h("tr", { dataset: { groupId: g.id } },
    h("td", {}, h("a", { href: `#/groups/${g.id}` }, g.name), h("div", { class: "muted mono" }, g.id)),
    h("td", {}, g.base_model),
    h("td", {}, `${variantLabel(g.variant)} r=${g.r}`),
    h("td", { class: "num" }, fmtInt(g.used)),
    h("td", { class: "num" }, `${fmtInt(g.free)} of ${fmtInt(g.capacity)}`),
    h("td", {}, fmtTime(g.created_at))))
    : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No groups yet."))]));
}

export async function groupPage(view, page, _query, groupId) {
  const [group, map] = await Promise.all([
    api(`/groups/${groupId}`, { signal: page.signal }),
    api(`/groups/${groupId}/index-map`, { signal: page.signal })]);
  const axis = map.layers[0]?.axis || "columns";
  const slots = map.members.map((m) => m.slot);
  const colourOf = new Map(slots.map((slot, k) => [slot, MEMBER_COLOURS[k % MEMBER_COLOURS.length]]));
  view.append(
    h("h1", {}, "Group ", h("span", { class: "mono" }, group.name)),
    h("div", { class: "card", id: "group-facts" }, h("dl", { class: "stats" },
      [["id", group.id], ["base model", group.base_model], ["method", `${variantLabel(group.variant)}, r=${group.r}`],
        ["members", `${group.used} of ${group.capacity}`], ["free slots", String(group.free)],
        ["layers", `${group.layers.length} (${group.target_modules.join(", ")})`], ["created", fmtTime(group.created_at)]]
        .map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", { id: k === "free slots" ? "group-free" : null }, v))))),
    h("section", { class: "card" }, h("h2", {}, "Members"),
      h("table", { class: "table", id: "members-table" },
        h("thead", {}, h("tr", {}, ["", "Slot", "Job", "Status", "Adapter"].map((t) => h("th", {}, t)))),
        h("tbody", {}, map.members.length ? map.members.map((m) => h("tr", { dataset: { slot: m.slot } },
          h("td", {}, h("span", { class: "swatch", style: `background:${colourOf.get(m.slot)}` })),
          h("td", { class: "num" }, String(m.slot)),
          h("td", {}, h("a", { href: `#/jobs/${m.job_id}` }, m.job_id)),
          h("td", {}, m.status ? badge(m.status) : "–"),
          h("td", {}, m.adapter_id ? h("a", { href: `#/adapters/${m.adapter_id}` }, m.adapter_id) : "–")))
          : h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No members yet."))))));
  const strips = h("div", { class: "strips", id: "index-map" });
  view.append(h("section", { class: "card" }, h("h2", {}, "Index map"),
    h("p", { class: "muted" }, `One strip per layer, across its ${axis}: each member's ${axis} in its colour. `,
      `Grey ${axis} belong to no member yet: ${group.free} more members fit.`), strips));
  const items = map.layers.map((layer) => {
    const canvas = h("canvas", { class: "strip-canvas" });
    const owned = slots.reduce((n, s) => n + (layer.owners[s] || []).length, 0);
    strips.append(h("div", { class: "strip", dataset: { layer: layer.name, owned } },
      h("div", { class: "strip-label mono", title: layer.name }, shortName(layer.name)), canvas,
      h("div", { class: "strip-count muted" }, `${fmtInt(owned)} / ${fmtInt(layer.dimension)} ${layer.axis}`)));
    return [layer, canvas];
  });
  const draw = () => { for (const [layer, canvas] of items) drawOwners(canvas, layer, slots); };
  window.addEventListener("resize", draw, { signal: page.signal });
  draw();
}
