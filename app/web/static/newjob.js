// New job: upload (or pick) a dataset, then fill in the training form. The API
// validates everything; its 422 answers are shown next to what they name.
import { api, ApiError } from "./api.js";
import { fmtInt, h } from "./dom.js";

const FIELDS = [
  // [name, label, JSON path, default, input attributes]
  ["r", "Rank r", "method.r", 16, { min: 1, step: 1 }],
  ["alpha", "Alpha", "method.alpha", 32, { min: 0, step: "any" }],
  ["max_steps", "Max steps", "hyperparameters.max_steps", 30, { min: 1, step: 1 }],
  ["learning_rate", "Learning rate", "hyperparameters.learning_rate", 0.001, { step: "any" }],
  ["batch_size", "Batch size", "hyperparameters.batch_size", 4, { min: 1, step: 1 }],
  ["max_seq_len", "Max sequence length", "hyperparameters.max_seq_len", 512, { min: 8, step: 1 }],
  ["val_fraction", "Validation fraction", "hyperparameters.val_fraction", "", { min: 0, max: 0.99, step: "any", placeholder: "0" }],
  ["eval_every", "Evaluate every (steps)", "hyperparameters.eval_every", "", { min: 1, step: 1, placeholder: "never" }],
  ["devices", "Devices per node", "resources.devices", "", { min: 1, step: 1, placeholder: "1" }],
  ["nodes", "Nodes (machines)", "resources.nodes", "", { min: 1, step: 1, placeholder: "1" }],
];

export async function newJobPage(view, page) {
  const select = h("select", { id: "dataset-select", name: "training_dataset_id" });
  const file = h("input", { id: "dataset-file", type: "file", accept: ".jsonl,.json,application/json" });
  const result = h("div", { id: "dataset-result" });
  const upload = h("button", { id: "dataset-upload", type: "button" }, "Upload");
  const form = buildForm();
  view.append(h("h1", {}, "New job"),
    h("section", { class: "card" }, h("h2", {}, "1. Dataset"),
      h("p", { class: "muted" }, "JSONL or JSON: chat records (", h("code", {}, "messages"), ") or prompt/completion pairs. ",
        "It is validated on upload; problems are listed with their line numbers."),
      h("div", { class: "row" }, file, upload),
      result,
      h("label", {}, "Training dataset", select), fieldError("training_dataset_id")),
    form);

  upload.addEventListener("click", async () => {
    if (!file.files.length) { result.replaceChildren(h("p", { class: "error" }, "Choose a file first.")); return; }
    upload.disabled = true;
    result.replaceChildren(h("p", { class: "muted" }, "Uploading and validating…"));
    const body = new FormData();
    body.append("file", file.files[0]);
    try {
      const ds = await api("/datasets", { method: "POST", form: body, signal: page.signal });
      result.replaceChildren(datasetSummary(ds));
      select.prepend(h("option", { value: ds.id }, `${ds.filename} · ${ds.records} records · ${ds.id}`));
      select.value = ds.id;
    } catch (err) {
      result.replaceChildren(uploadErrors(err));
    } finally {
      upload.disabled = false;
    }
  });

  const [datasets, models] = await Promise.all([
    api("/datasets?limit=200", { signal: page.signal }), api("/models", { signal: page.signal })]);
  for (const ds of datasets.data) select.append(h("option", { value: ds.id }, `${ds.filename} · ${ds.records} records · ${ds.id}`));
  if (!datasets.data.length) select.append(h("option", { value: "" }, "— upload a dataset first —"));
  const modelSelect = form.querySelector("[name=base_model]");
  for (const m of models) {
    modelSelect.append(h("option", { value: m.id }, `${m.id}${m.hidden_size ? ` (hidden ${m.hidden_size}, ${m.num_hidden_layers} layers)` : ""}`));
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    view.querySelectorAll(".field-error").forEach((e) => e.replaceChildren());
    const status = form.querySelector("#job-status");
    status.textContent = "";
    const submit = form.querySelector("button[type=submit]");
    submit.disabled = true;
    try {
      const job = await api("/jobs", { method: "POST", json: jobBody(form, select.value), signal: page.signal });
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 422) { status.textContent = err.message; return; }
      for (const [field, messages] of Object.entries(err.fieldErrors())) {
        const slot = view.querySelector(`.field-error[data-for="${CSS.escape(field)}"]`) || status;
        slot.append(h("div", {}, slot === status ? `${field}: ${messages.join("; ")}` : messages.join("; ")));
      }
    } finally {
      submit.disabled = false;
    }
  });
}

function fieldError(path) {
  return h("div", { class: "field-error error", dataset: { for: path } });
}

function buildForm() {
  return h("form", { id: "job-form", class: "card", novalidate: true }, // the server is the one validator
    h("h2", {}, "2. Training"),
    h("div", { class: "form-grid" },
      h("label", {}, "Base model", h("select", { name: "base_model" }), fieldError("base_model")),
      h("label", {}, "Variant",
        h("select", { name: "variant" },
          h("option", { value: "sbora_fa" }, "SBoRA-FA: trains B, changes r columns"),
          h("option", { value: "sbora_fb" }, "SBoRA-FB: trains A, changes r rows"),
          h("option", { value: "lora" }, "LoRA baseline: trains A and B")),
        fieldError("method.variant")),
      h("label", {}, "Sharding",
        h("select", { name: "sharding" },
          h("option", { value: "none" }, "none: every rank holds the whole base"),
          h("option", { value: "full" }, "full: the base is sharded over the ranks (FSDP2)")),
        fieldError("resources.sharding")),
      FIELDS.map(([name, label, path, value, attrs]) =>
        h("label", {}, label, h("input", { name, type: "number", value: String(value), ...attrs }), fieldError(path))),
      h("label", { class: "wide" }, "Name (optional)", h("input", { name: "name", type: "text", maxlength: 200 }), fieldError("name"))),
    h("div", { class: "row" }, h("button", { type: "submit", id: "launch" }, "Launch job"),
      h("div", { id: "job-status", class: "error" })));
}

// Empty inputs are left out, so the server's defaults apply.
function jobBody(form, datasetId) {
  const field = (name) => form.elements.namedItem(name);
  const body = { base_model: field("base_model").value, training_dataset_id: datasetId,
    method: { variant: field("variant").value }, hyperparameters: {}, resources: { sharding: field("sharding").value } };
  for (const [name, , path] of FIELDS) {
    const raw = field(name).value.trim();
    if (raw === "") continue;
    const [group, key] = path.split(".");
    body[group][key] = Number(raw);
  }
  const name = field("name").value.trim();
  if (name) body.name = name;
  return body;
}

function datasetSummary(ds) {
  const s = ds.stats || {};
  const facts = [`${fmtInt(ds.records)} records`, s.total_tokens != null ? `${fmtInt(s.total_tokens)} tokens` : null,
    s.steps_per_epoch != null ? `${fmtInt(s.steps_per_epoch)} steps per epoch at batch ${s.steps_per_epoch_batch_size}` : null,
    s.truncated_records ? `${fmtInt(s.truncated_records)} truncated at the model's context` : null].filter(Boolean);
  return h("div", { class: "ok", id: "dataset-ok" },
    h("p", {}, "✓ ", h("b", {}, ds.filename), ` uploaded as `, h("span", { class: "mono" }, ds.id), ": ", facts.join(", ")),
    (s.warnings || []).length ? h("ul", { class: "warnings" }, s.warnings.map((w) => h("li", {}, `line ${w.line}: ${w.message}`))) : null);
}

function uploadErrors(err) {
  const lines = (err.body && err.body.errors) || [];
  const heading = err instanceof ApiError && Array.isArray(err.body?.detail)
    ? err.body.detail.map((d) => d.msg).join("; ") : err.message;
  return h("div", { class: "problems" }, h("p", { class: "error" }, heading),
    lines.length ? h("ul", { id: "dataset-errors" },
      lines.map((e) => h("li", { dataset: { line: e.line ?? "" } },
        e.line != null ? h("b", {}, `line ${e.line}: `) : null, e.message))) : null);
}
