// Jobs: the live table, and one job's page (loss curve, events, settings, cancel).
import { api } from "./api.js";
import { drawLossChart } from "./charts.js";
import { badge, fmtDuration, fmtNum, fmtTime, h, progressBar, variantLabel } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 2000;

export function jobsPage(view, page) {
  const body = h("tbody", { id: "jobs-body" });
  const total = h("span", { class: "muted" });
  view.append(
    h("div", { class: "title-row" }, h("h1", {}, "Jobs ", total), h("a", { class: "button", href: "#/new" }, "New job")),
    h("table", { class: "table", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["Job", "Base model", "Method", "Status", "Progress", "Loss", "Created"].map((t) => h("th", {}, t)))),
      body));

  page.poll(async () => {
    const jobs = await api("/jobs?limit=100", { signal: page.signal });
    total.textContent = jobs.total ? `(${jobs.total})` : "";
    body.replaceChildren(...(jobs.data.length ? jobs.data.map(jobRow)
      : [h("tr", {}, h("td", { colspan: 7, class: "empty" }, "No jobs yet. ", h("a", { href: "#/new" }, "Start one.")))]));
  }, POLL_MS);
}

function jobRow(job) {
  const p = job.progress;
  const href = `#/jobs/${job.id}`;
  return h("tr", { dataset: { jobId: job.id, status: job.status } },
    h("td", {}, h("a", { href }, job.name || job.id), job.name ? h("div", { class: "muted mono" }, job.id) : null),
    h("td", {}, job.base_model),
    h("td", {}, `${variantLabel(job.method.variant)} r=${job.method.r}`),
    h("td", {}, badge(job.status)),
    h("td", {}, progressBar(p.step, p.total_steps, job.status)),
    h("td", { class: "num" }, fmtNum(p.loss)),
    h("td", {}, fmtTime(job.created_at)));
}

export async function jobPage(view, page, _query, jobId) {
  const head = h("div", { class: "title-row" });
  const summary = h("div", { class: "card", id: "job-summary" });
  const canvas = h("canvas", { id: "loss-chart", class: "chart" });
  // DPO jobs: the reward margin per step (train) and at each validation (the same chart drawn on margins).
  const rewardsCanvas = h("canvas", { id: "rewards-chart", class: "chart" });
  const rewardsCard = h("section", { class: "card", id: "rewards", hidden: true },
    h("h2", {}, "Reward margin ", h("span", { class: "muted", id: "rewards-accuracy" })), rewardsCanvas);
  const settings = h("div", { class: "card", id: "job-settings" });
  const events = h("tbody", { id: "events-body" });
  const eventsNote = h("span", { class: "muted" });
  const checkpoints = h("tbody", { id: "checkpoints-body" });
  const checkpointsCard = h("section", { class: "card", id: "checkpoints", hidden: true }, h("h2", {}, "Checkpoints"),
    h("table", { class: "table compact", id: "checkpoints-table" },
      h("thead", {}, h("tr", {}, ["Step", ...CHECKPOINT_METRICS.map(([, label]) => label)].map((t) => h("th", {}, t)))),
      checkpoints));
  view.append(head, summary,
    h("div", { class: "grid-2" },
      h("div", {},
        h("section", { class: "card" }, h("h2", {}, "Loss"), canvas),
        rewardsCard,
        checkpointsCard,
        h("section", { class: "card" }, h("h2", {}, "Events ", eventsNote),
          h("div", { class: "scroll" }, h("table", { class: "table compact", id: "events-table" },
            h("thead", {}, h("tr", {}, ["Time", "Kind", "Message"].map((t) => h("th", {}, t)))), events)))),
      settings));

  const train = [];
  const val = [];
  const margins = [];
  const valMargins = [];
  let after = 0;
  let job = null;
  let settingsShown = false;
  let finalShown = false;
  const redraw = () => {
    drawLossChart(canvas, train, val);
    if (!rewardsCard.hidden) drawLossChart(rewardsCanvas, margins, valMargins);
  };
  window.addEventListener("resize", redraw, { signal: page.signal });
  redraw();

  page.poll(async () => {
    job = await api(`/jobs/${jobId}`, { signal: page.signal });
    renderHead(head, job, page);
    renderSummary(summary, job);
    if (!settingsShown) { renderSettings(settings, job); settingsShown = true; }
    const fresh = await newEvents();
    if (job.adapter_id && !finalShown) { // the end: the whole validation set's figures
      finalShown = true;
      const adapter = await api(`/adapters/${job.adapter_id}/metadata`, { signal: page.signal });
      if (adapter.metrics.full_valid_loss != null || adapter.metrics.train_mean_token_accuracy != null) {
        checkpoints.append(checkpointRow("final", { ...adapter.metrics, valid_loss: adapter.metrics.full_valid_loss,
          valid_mean_token_accuracy: adapter.metrics.full_valid_mean_token_accuracy, train_loss: adapter.metrics.train_loss }));
        checkpointsCard.hidden = false;
      }
    }
    if (fresh) {
      redraw();
      eventsNote.textContent = `(${train.length} loss points)`;
    }
    return !TERMINAL.has(job.status) || fresh > 0; // one more round once it ends, for the last events
  }, POLL_MS);

  // Events since the last one seen, page by page; metric/eval events feed the chart.
  async function newEvents() {
    let count = 0;
    for (;;) {
      const batch = await api(`/jobs/${jobId}/events?after=${after}&limit=1000`, { signal: page.signal });
      for (const e of batch.data) {
        after = e.id;
        if (e.kind === "metric" && typeof e.data.loss === "number") {
          train.push({ step: e.data.step, loss: e.data.loss });
          if (typeof e.data.rewards_margins === "number") {
            margins.push({ step: e.data.step, loss: e.data.rewards_margins });
            rewardsCard.hidden = false;
            document.getElementById("rewards-accuracy").textContent =
              `(preference accuracy ${fmtNum(e.data.rewards_accuracies)} at step ${e.data.step})`;
          }
        } else {
          if (e.kind === "eval" && typeof e.data.val_loss === "number") val.push({ step: e.data.step, loss: e.data.val_loss });
          if (e.kind === "eval" && typeof e.data.val_rewards_margins === "number") {
            valMargins.push({ step: e.data.step, loss: e.data.val_rewards_margins });
          }
          if (e.kind === "checkpoint") { checkpoints.append(checkpointRow(e.data.step, e.data)); checkpointsCard.hidden = false; }
          events.append(h("tr", { dataset: { kind: e.kind } }, h("td", { class: "nowrap" }, fmtTime(e.created_at)),
            h("td", {}, h("span", { class: `kind ${e.kind}` }, e.kind)), h("td", {}, e.message)));
        }
      }
      count += batch.data.length;
      if (batch.data.length < 1000) return count;
    }
  }
}

// What each checkpoint records (OpenAI's names); the final row is the whole validation set (full_valid_*).
const CHECKPOINT_METRICS = [["train_loss", "Train loss"], ["train_mean_token_accuracy", "Train token acc."],
  ["valid_loss", "Valid loss"], ["valid_mean_token_accuracy", "Valid token acc."]];

function checkpointRow(step, metrics) {
  // A DPO checkpoint has no token accuracy: its reward accuracy stands in those columns (data-metric says which).
  const key = (k) => (metrics[k] === undefined && k.endsWith("mean_token_accuracy")
    ? k.replace("mean_token_accuracy", "rewards_accuracies") : k);
  return h("tr", { dataset: { step } }, h("td", { class: "num" }, String(step)),
    CHECKPOINT_METRICS.map(([k]) => h("td", { class: "num", dataset: { metric: key(k) } }, fmtNum(metrics[key(k)]))));
}

function renderHead(head, job, page) {
  const cancel = h("button", { id: "cancel-job", class: "danger", disabled: TERMINAL.has(job.status) }, "Cancel");
  cancel.addEventListener("click", async () => {
    if (!confirm(`Cancel job ${job.id}?`)) return;
    cancel.disabled = true;
    try { await api(`/jobs/${job.id}/cancel`, { method: "POST" }); } catch (err) { page.fail(err); }
  });
  head.replaceChildren(h("h1", {}, "Job ", h("span", { class: "mono" }, job.name || job.id), " ", badge(job.status)), cancel);
}

function renderSummary(box, job) {
  const p = job.progress;
  const stats = [
    ["step", `${p.step} / ${p.total_steps ?? "?"}`],
    ["loss", fmtNum(p.loss)],
    ["learning rate", fmtNum(p.learning_rate, 3)],
    ["tokens/s", p.tokens_per_s == null ? "–" : Math.round(p.tokens_per_s)],
    ["elapsed", fmtDuration(p.elapsed_s)],
    ["ETA", TERMINAL.has(job.status) ? "–" : fmtDuration(p.eta_s)],
  ];
  box.replaceChildren(...[ // replaceChildren, unlike h(), would print a null as "null"
    progressBar(p.step, p.total_steps, job.status),
    h("dl", { class: "stats" }, stats.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, String(v))))),
    job.error ? h("p", { class: "error", id: "job-error" }, `${job.error.code}: ${job.error.message}`) : null,
    job.adapter_id ? h("p", {}, "Adapter ", h("a", { href: `#/adapters/${job.adapter_id}`, id: "job-adapter" }, job.adapter_id),
      " · ", h("a", { href: `#/playground?adapter=${job.adapter_id}` }, "try it in the playground")) : null,
  ].filter(Boolean));
}

function renderSettings(box, job) {
  const rows = [
    ["base model", job.base_model], ["quantization", job.quantization],
    ["training dataset", job.training_dataset_id], ["validation dataset", job.validation_dataset_id ?? "–"],
    ...Object.entries(job.method).map(([k, v]) => [`method.${k}`, v]),
    ...Object.entries(job.hyperparameters).map(([k, v]) => [k, v]),
    ...Object.entries(job.resources || {}).map(([k, v]) => [`resources.${k}`, v]),
  ];
  box.replaceChildren(h("h2", {}, "Settings"), h("table", { class: "table compact kv", id: "hyperparameters" },
    h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k),
      h("td", { class: "mono" }, Array.isArray(v) ? v.join(", ") : v == null ? "–" : String(v)))))));
}
