// Evaluations: the list, and one evaluation's page (candidates side by side with 95% intervals,
// paired differences on the same items, per-item outputs filtered by candidate and right or wrong).
import { api } from "./api.js";
import { badge, fmtInt, fmtNum, fmtTime, h, progressBar } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;

export function evaluationsPage(view, page) {
  const body = h("tbody", { id: "evaluations-body" });
  view.append(h("h1", {}, "Evaluations"),
    h("p", { class: "muted" }, "Create one with ", h("code", {}, "sbora evals create"), ", ", h("code", {}, "POST /evaluations"),
      " or a job's ", h("code", {}, "eval_after"), "."),
    h("table", { class: "table", id: "evaluations-table" },
      h("thead", {}, h("tr", {}, ["Evaluation", "Grader", "Candidates", "Status", "Progress", "Created"].map((t) => h("th", {}, t)))),
      body));
  page.poll(async () => {
    const list = await api("/evaluations?limit=100", { signal: page.signal });
    body.replaceChildren(...(list.data.length ? list.data.map((e) => h("tr", { dataset: { evaluationId: e.id, status: e.status } },
      h("td", {}, h("a", { href: `#/evaluations/${e.id}` }, e.name || e.id), e.name ? h("div", { class: "muted mono" }, e.id) : null),
      h("td", {}, e.settings.grader),
      h("td", {}, e.candidates.map((c) => c.label).join(", ")),
      h("td", {}, badge(e.status)),
      h("td", {}, progressBar(e.progress.done, e.progress.total, e.status)),
      h("td", {}, fmtTime(e.created_at))))
      : [h("tr", {}, h("td", { colspan: 6, class: "empty" }, "No evaluations yet."))]));
  }, POLL_MS);
}

const interval = (m, signed = false) => {
  const f = (x) => (signed && x > 0 ? "+" : "") + fmtNum(x);
  return `${f(m.value ?? m.difference)} [${f(m.ci95[0])}, ${f(m.ci95[1])}]`;
};

export async function evaluationPage(view, page, _query, evaluationId) {
  const head = h("div", { class: "title-row" });
  const summary = h("div", { class: "card", id: "evaluation-summary" });
  const results = h("section", { class: "card", id: "evaluation-results" }, h("h2", {}, "Results"),
    h("p", { class: "muted" }, "Shown once the evaluation succeeds."));
  const items = h("section", { class: "card", id: "evaluation-items" });
  view.append(head, summary, results, items);
  let shown = false;
  page.poll(async () => {
    const evaluation = await api(`/evaluations/${evaluationId}`, { signal: page.signal });
    renderHead(head, evaluation, page);
    renderSummary(summary, evaluation);
    if (evaluation.result && !shown) {
      renderResults(results, evaluation.result);
      renderItems(items, evaluation, page);
      shown = true;
    }
    return !TERMINAL.has(evaluation.status);
  }, POLL_MS);
}

function renderHead(head, evaluation, page) {
  const cancel = h("button", { id: "cancel-evaluation", class: "danger", disabled: TERMINAL.has(evaluation.status) }, "Cancel");
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try { await api(`/evaluations/${evaluation.id}/cancel`, { method: "POST" }); } catch (err) { page.fail(err); }
  });
  head.replaceChildren(h("h1", {}, "Evaluation ", h("span", { class: "mono" }, evaluation.name || evaluation.id), " ",
    badge(evaluation.status)), cancel);
}

function renderSummary(box, evaluation) {
  const p = evaluation.progress;
  const facts = [["grader", evaluation.settings.grader], ["dataset", evaluation.dataset_id], ["base model", evaluation.base_model],
    ["items × candidates", p.total == null ? "–" : `${fmtInt(p.total / evaluation.candidates.length)} × ${evaluation.candidates.length}`],
    ["tokens", fmtInt(p.tokens)], ["attempts", evaluation.attempts]];
  if (evaluation.source_job_id) facts.push(["queued by", h("a", { href: `#/jobs/${evaluation.source_job_id}` }, evaluation.source_job_id)]);
  box.replaceChildren(...[
    progressBar(p.done, p.total, evaluation.status),
    h("dl", { class: "stats" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
    evaluation.error ? h("p", { class: "error", id: "evaluation-error" }, `${evaluation.error.code}: ${evaluation.error.message}`) : null,
  ].filter(Boolean));
}

function renderResults(section, result) {
  const metrics = result.metrics;
  const table = h("table", { class: "table", id: "results-table" },
    h("thead", {}, h("tr", {}, ["Candidate", ...metrics.map((m) => `${m} (95% CI)`), "Right", "Wrong", "Tokens"].map((t) => h("th", {}, t)))),
    h("tbody", {}, result.candidates.map((c) => h("tr", { dataset: { candidate: c.label } },
      h("td", { class: "mono" }, c.label),
      metrics.map((m) => h("td", { class: "num", dataset: { metric: m } }, interval(c.metrics[m]))),
      h("td", { class: "num" }, c.correct ?? "–"), h("td", { class: "num" }, c.wrong ?? "–"),
      h("td", { class: "num" }, fmtInt(c.tokens))))));
  const paired = result.paired.length ? h("table", { class: "table compact", id: "paired-table" },
    h("thead", {}, h("tr", {}, ["Candidate", "Versus", ...metrics.map((m) => `Δ ${m} (95% CI)`)].map((t) => h("th", {}, t)))),
    h("tbody", {}, result.paired.map((p) => h("tr", {},
      h("td", { class: "mono" }, p.candidate), h("td", { class: "mono" }, p.versus),
      metrics.map((m) => {
        const d = p.metrics[m];
        const sure = d.ci95[0] > 0 ? "up" : d.ci95[1] < 0 ? "down" : "unsure"; // does the interval exclude 0?
        return h("td", { class: `num diff ${sure}`, dataset: { metric: m, sign: sure } }, interval(d, true));
    }))))) : null;
  section.replaceChildren(h("h2", {}, `Results on ${fmtInt(result.items)} items`), table,
    paired ? h("h2", {}, "Paired differences on the same items") : null, paired);
}

// One line per item: what the model chose or said against the gold answer.
function describeOutput(o) {
  if ("choice" in o) return `chose ${o.choice} (normalised ${o.choice_norm}), gold ${o.gold}; log-likelihoods ${o.logprobs.map((x) => fmtNum(x)).join(", ")}`;
  if ("text" in o) return `${JSON.stringify(o.text).slice(0, 200)} → ${o.extracted ?? "–"} (gold ${o.gold})`;
  return `loss ${fmtNum(o.loss)} over ${o.target_tokens} tokens`;
}

function renderItems(section, evaluation, page) {
  const candidate = h("select", { id: "items-candidate" }, evaluation.candidates.map((c) => h("option", { value: c.label }, c.label)));
  const outcome = h("select", { id: "items-outcome" }, h("option", { value: "" }, "all"),
    h("option", { value: "true" }, "right"), h("option", { value: "false" }, "wrong"));
  const body = h("tbody", { id: "items-body" });
  const note = h("span", { class: "muted", id: "items-total" });
  const load = async () => {
    const query = new URLSearchParams({ candidate: candidate.value, limit: "200" });
    if (outcome.value) query.set("correct", outcome.value);
    const page_ = await api(`/evaluations/${evaluation.id}/items?${query}`, { signal: page.signal });
    note.textContent = `${page_.total} item(s)`;
    body.replaceChildren(...page_.data.map((i) => h("tr", { dataset: { item: i.item, correct: String(i.correct) } },
      h("td", { class: "num" }, i.item), h("td", { class: "num" }, i.line),
      h("td", {}, i.correct == null ? "–" : i.correct ? "right" : "wrong"),
      h("td", { class: "mono" }, describeOutput(i.output)))));
  };
  candidate.addEventListener("change", () => load().catch((err) => page.fail(err)));
  outcome.addEventListener("change", () => load().catch((err) => page.fail(err)));
  section.replaceChildren(h("h2", {}, "Items ", note), h("div", { class: "row" }, candidate, outcome),
    h("div", { class: "scroll" }, h("table", { class: "table compact", id: "items-table" },
      h("thead", {}, h("tr", {}, ["Item", "Line", "Outcome", "Output"].map((t) => h("th", {}, t)))), body)));
  load().catch((err) => page.fail(err));
}
