// The dashboard shell: API key form, hash router, and the lifetime of each page
// (its polling timers and requests stop when the user navigates away).
import { ApiError, auth } from "./api.js";
import { h } from "./dom.js";
import { adapterPage, adaptersPage } from "./adapters.js";
import { evaluationPage, evaluationsPage } from "./evaluations.js";
import { groupPage, groupsPage } from "./groups.js";
import { jobPage, jobsPage } from "./jobs.js";
import { newJobPage } from "./newjob.js";
import { playgroundPage } from "./playground.js";

const view = document.getElementById("view");
const flashBox = document.getElementById("flash");

const ROUTES = [
  [/^jobs$/, jobsPage, "jobs"],
  [/^jobs\/([\w-]+)$/, jobPage, "jobs"],
  [/^new$/, newJobPage, "new"],
  [/^evaluations$/, evaluationsPage, "evaluations"],
  [/^evaluations\/([\w-]+)$/, evaluationPage, "evaluations"],
  [/^adapters$/, adaptersPage, "adapters"],
  [/^adapters\/([\w-]+)$/, adapterPage, "adapters"],
  [/^groups$/, groupsPage, "groups"],
  [/^groups\/([\w-]+)$/, groupPage, "groups"],
  [/^playground$/, playgroundPage, "playground"],
];

class Page {
  constructor() { this.controller = new AbortController(); this.timers = new Set(); }
  get signal() { return this.controller.signal; }
  get alive() { return !this.signal.aborted; }

  // Run `fn` now and every `ms` after it finishes (never two at once); `fn` returning false stops it.
  poll(fn, ms) {
    const tick = async () => {
      if (!this.alive) return;
      let again = true;
      try {
        again = (await fn()) !== false;
        if (this.failed) { flash(""); this.failed = false; } // recovered: take the banner down
      } catch (err) {
        this.fail(err);
        // a missing object or a bad request stays so; network blips and 429/5xx are worth retrying
        again = !(err instanceof ApiError && err.status >= 400 && err.status < 500 && err.status !== 429);
      }
      if (again && this.alive) {
        const timer = setTimeout(() => { this.timers.delete(timer); tick(); }, ms);
        this.timers.add(timer);
      }
    };
    tick();
  }

  fail(err) {
    if (!this.alive || err.name === "AbortError" || (err instanceof ApiError && err.status === 401)) return;
    flash(err.message || String(err));
    this.failed = true;
  }

  dispose() { this.controller.abort(); this.timers.forEach(clearTimeout); }
}

function flash(message, kind = "error") {
  flashBox.textContent = message;
  flashBox.className = kind;
  flashBox.hidden = !message;
}

let current = null;

async function route() {
  current?.dispose();
  flash("");
  view.replaceChildren();
  if (!auth.key) return loginPage();
  document.getElementById("nav").hidden = false;
  document.getElementById("sign-out").hidden = false;
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  for (const [pattern, render, section] of ROUTES) {
    const match = pattern.exec(path);
    if (!match) continue;
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.nav === section));
    const page = (current = new Page());
    try {
      await render(view, page, new URLSearchParams(query || ""), ...match.slice(1));
    } catch (err) {
      page.fail(err);
    }
    return;
  }
  location.hash = "#/jobs";
}

function loginPage(message = "") {
  document.getElementById("nav").hidden = true;
  document.getElementById("sign-out").hidden = true;
  const input = h("input", { id: "key-input", type: "password", placeholder: "sbora-…", autocomplete: "off", required: true });
  const error = h("p", { class: "error", id: "key-error" }, message);
  const form = h("form", { id: "key-form", class: "card narrow", onsubmit: submit },
    h("h1", {}, "API key"),
    h("p", { class: "muted" }, "Every call to the API carries a key (", h("code", {}, "sbora keys create --tenant NAME"),
      "). It is kept in this browser's local storage only."),
    input, h("button", { id: "key-save", type: "submit" }, "Save key"), error);
  view.replaceChildren(form);
  input.focus();

  async function submit(event) {
    event.preventDefault();
    const key = input.value.trim();
    let res;
    try { // prove the key before anything else is shown (plain fetch: a 401 here is no expired session)
      res = await fetch("/models", { headers: { Authorization: `Bearer ${key}` } });
    } catch (err) {
      error.textContent = `The server is unreachable: ${err.message}`;
      return;
    }
    if (!res.ok) {
      error.textContent = res.status === 401 ? "That key was rejected." : `The server answered ${res.status}.`;
      return;
    }
    auth.set(key);
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    else route();
  }
}

window.addEventListener("sbora:unauthorized", () => {
  auth.clear();
  current?.dispose();
  loginPage("The server rejected the saved key; enter it again.");
});
document.getElementById("sign-out").addEventListener("click", () => {
  auth.clear();
  current?.dispose();
  loginPage();
});
window.addEventListener("hashchange", route);
route();
