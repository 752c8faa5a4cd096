// Playground: a base model, any adapters trained on it, a prompt, and the answer as it streams.
import { api, request, sse } from "./api.js";
import { fmtNum, h, variantLabel } from "./dom.js";

export async function playgroundPage(view, page, query) {
  const model = h("select", { id: "pg-model" });
  const adapterList = h("div", { id: "pg-adapters", class: "checks" });
  const prompt = h("textarea", { id: "pg-prompt", rows: 4, placeholder: "Ask something…" }, "");
  const chat = h("input", { type: "checkbox", id: "pg-chat", checked: true });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", value: "64", min: 1 });
  const temperature = h("input", { id: "pg-temperature", type: "number", value: "0", min: 0, step: "any" });
  const go = h("button", { id: "pg-generate", type: "submit" }, "Generate");
  const stop = h("button", { id: "pg-stop", type: "button", class: "secondary", disabled: true }, "Stop");
  const output = h("pre", { id: "pg-output", class: "output" });
  const status = h("div", { id: "pg-status", class: "muted", dataset: { state: "idle" } });
  view.append(h("h1", {}, "Playground"),
    h("form", { class: "card", id: "pg-form", novalidate: true, onsubmit: generate },
      h("div", { class: "form-grid" },
        h("label", {}, "Base model", model),
        h("label", {}, "Max new tokens", maxTokens),
        h("label", {}, "Temperature", temperature)),
      h("fieldset", {}, h("legend", {}, "Adapters (several compose when their index sets are disjoint)"), adapterList),
      h("label", { class: "wide" }, "Prompt", prompt),
      h("div", { class: "row" }, h("label", { class: "inline" }, chat, " send as a chat message (the model's chat template)"),
        h("span", { class: "spacer" }), go, stop)),
    h("section", { class: "card" }, h("h2", {}, "Answer"), output, status));

  const [models, adapters] = await Promise.all([
    api("/models", { signal: page.signal }), api("/adapters?limit=200", { signal: page.signal })]);
  for (const m of models) model.append(h("option", { value: m.id }, m.id));
  const wanted = query.get("adapter");
  const preset = adapters.data.find((a) => a.id === wanted);
  if (preset) model.value = preset.base_model;
  const listAdapters = () => {
    const mine = adapters.data.filter((a) => a.base_model === model.value);
    adapterList.replaceChildren(...(mine.length ? mine.map((a) => h("label", { class: "inline" },
      h("input", { type: "checkbox", name: "adapter", value: a.id, checked: a.id === wanted }),
      ` ${a.name || a.id} `, h("span", { class: "muted" }, `${variantLabel(a.variant)} r=${a.r}`)))
      : [h("span", { class: "muted" }, "none for this model: the base model answers alone")]));
  };
  model.addEventListener("change", listAdapters);
  listAdapters();

  let running = null;
  stop.addEventListener("click", () => running?.abort());
  page.signal.addEventListener("abort", () => running?.abort());

  async function generate(event) {
    event.preventDefault();
    running = new AbortController();
    const ids = [...adapterList.querySelectorAll("input[name=adapter]:checked")].map((i) => i.value);
    const text = prompt.value;
    const body = { base_model: model.value, max_new_tokens: Number(maxTokens.value) || 64,
      temperature: Number(temperature.value) || 0, stream: true,
      ...(chat.checked ? { messages: [{ role: "user", content: text }] } : { prompt: text }),
      ...(ids.length ? { adapter_id: ids } : {}) };
    output.textContent = "";
    output.dataset.pieces = "0";
    setState("streaming", "generating…");
    go.disabled = true;
    stop.disabled = false;
    const started = performance.now();
    try {
      const res = await request("/generate", { method: "POST", json: body, signal: running.signal });
      for await (const message of sse(res)) {
        const data = JSON.parse(message.data);
        if (message.event === "token") {
          output.append(data.text);
          output.dataset.pieces = String(Number(output.dataset.pieces || 0) + 1);
        }
        else if (message.event === "done") {
          const seconds = (performance.now() - started) / 1000;
          setState("done", `${data.completion_tokens} tokens in ${fmtNum(seconds, 2)} s · finish: ${data.finish_reason}` +
            ` · ${data.adapter_ids.length ? `adapters ${data.adapter_ids.join(" + ")}` : "base model"}`);
        } else if (message.event === "error") setState("error", data.detail);
      }
      if (status.dataset.state === "streaming") setState("error", "the stream ended early");
    } catch (err) {
      setState(err.name === "AbortError" ? "stopped" : "error", err.name === "AbortError" ? "stopped" : err.message);
    } finally {
      go.disabled = false;
      stop.disabled = true;
    }
  }

  function setState(state, message) {
    status.dataset.state = state;
    status.className = state === "error" ? "error" : "muted";
    status.textContent = message;
  }
}
