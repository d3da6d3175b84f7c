// Try: one input -> the adapters it retrieves (weights, similarity to every adapter) and the streamed answer of
// one method, or two methods side by side on the same retrieval.
import { api, streamChat } from "../api.js";
import { barChart, PALETTE } from "../chart.js";
import { clearErrors, field, h, notice, num, showError } from "../dom.js";

const METHOD_HELP = {
  mixture: "the top-k adapters mixed per layer with their weights (LoraRetriever's mixture)",
  fusion: "the top-k merged into one adapter, then generated with it",
  selection: "the top-1 adapter alone",
  base: "no adapter: the base model",
};

export async function render(root, { info }) {
  let controller = null;
  const methodOptions = info.methods.map((m) => [m, m]);
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "try-title" },
    h("h1", { id: "try-title" }, "Try a query"),
    field({ name: "input", label: "Your input", type: "textarea", wide: true, value: "What is the capital of Japan?", attrs: { rows: 3 } }),
    h("div", { class: "row" },
      field({ name: "image", label: "Image (optional)", type: "file", attrs: { accept: "image/png,image/jpeg", disabled: !info.images.supported }, hint: info.images.supported ? "scored against the adapters' image keys" : `Disabled: ${info.images.reason}.` }),
      field({ name: "method", label: "Method", type: "select", options: methodOptions, value: "mixture" }),
      field({ name: "top_k", label: "k (adapters retrieved)", type: "number", value: info.top_k, attrs: { min: 1, max: info.max_top_k } }),
      field({ name: "fusion_method", label: "Fusion method", type: "select", options: info.fusion_methods, value: info.fusion_methods.includes("linear") ? "linear" : info.fusion_methods[0], hint: "for the fusion method" }),
      field({ name: "max_tokens", label: "Max tokens", type: "number", value: Math.min(48, info.max_tokens_limit), attrs: { min: 1, max: info.max_tokens_limit } })),
    h("div", { class: "row" },
      field({ name: "compare", label: "Compare with a second method", type: "checkbox" }),
      field({ name: "method_b", label: "Second method", type: "select", options: methodOptions, value: "base" })),
    h("p", { class: "muted small" }, Object.entries(METHOD_HELP).map(([m, t]) => h("span", { style: "margin-right:1rem" }, h("b", {}, m), ": ", t))),
    h("div", { class: "actions" }, h("button", { type: "submit", id: "try-run" }, "Run"), h("button", { type: "button", class: "secondary", id: "try-stop", disabled: true }, "Stop")));
  const retrieval = h("section", { class: "grid2", "aria-label": "Retrieval" });
  const answers = h("section", { class: "grid2", "aria-label": "Answers" });
  root.append(form, answers, retrieval);

  const get = (name) => form.elements.namedItem(name);
  const sync = () => {
    get("method_b").disabled = !get("compare").checked;
  };
  get("compare").addEventListener("change", sync);
  sync();
  const stop = form.querySelector("#try-stop");
  stop.addEventListener("click", () => controller && controller.abort());

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    if (controller) controller.abort();
    controller = new AbortController();
    const text = get("input").value;
    const k = Number(get("top_k").value);
    const maxTokens = Number(get("max_tokens").value);
    const methods = [get("method").value];
    if (get("compare").checked) methods.push(get("method_b").value);
    let image = null;
    const file = get("image").files && get("image").files[0];
    if (file) image = await dataUrl(file);
    let found;
    try {
      found = await api("/ui/api/similarities", { method: "POST", body: { input: text, top_k: k, image } });
    } catch (err) {
      showError(form, err);
      return;
    }
    showRetrieval(retrieval, found);
    stop.disabled = false;
    const settings = { text, k, maxTokens, fusion: get("fusion_method").value, retrieved: found.retrieved, signal: controller.signal };
    answers.replaceChildren();
    await Promise.all(methods.map((m, i) => runMethod(answers, m, i, settings, info)));
    stop.disabled = true;
  });
}

function dataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showRetrieval(section, found) {
  const top = found.retrieved;
  const chosen = new Set(top.map((a) => a.name));
  section.replaceChildren(
    h("div", { class: "panel", id: "retrieved" },
      h("h2", {}, `Retrieved adapters (top ${top.length})`),
      h("table", {},
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Adapter"), h("th", { scope: "col", class: "num" }, "Weight"), h("th", { scope: "col", class: "num" }, "Similarity"))),
        h("tbody", {}, top.map((a) => h("tr", {}, h("td", { class: "name" }, a.name), h("td", { class: "num" }, num(a.weight)), h("td", { class: "num" }, num(a.similarity)))))),
      h("h3", {}, "Weights"),
      barChart(top.map((a) => ({ label: a.name, value: a.weight, color: PALETTE[1] })), { title: "mixture weight of each retrieved adapter" }),
      h("p", { class: "muted small" }, `retrieval took ${found.milliseconds} ms`)),
    h("div", { class: "panel", id: "similarities" },
      h("h2", {}, `Similarity to every adapter (${found.similarities.length})`),
      h("div", { class: "scroll" },
        barChart(found.similarities.map((a) => ({ label: a.name, value: a.similarity, color: chosen.has(a.name) ? PALETTE[1] : PALETTE[0], note: chosen.has(a.name) ? "retrieved" : null })), { title: "cosine similarity of the input to each adapter's key" })),
      h("p", { class: "muted small" }, "Orange: the retrieved top-k. Cosine similarity between the input's embedding and each adapter's key.")),
  );
}

async function runMethod(section, method, index, settings, info) {
  const out = h("div", { class: "answer streaming", "aria-live": "polite", "data-method": method });
  const used = h("div", { class: "small muted" });
  const panel = h("div", { class: "panel answer-panel", "data-method": method },
    h("h2", {}, index ? `Answer B: ${method}` : `Answer: ${method}`), out, used);
  section.append(panel);
  const started = performance.now();
  const messages = [{ role: "user", content: settings.text }];
  try {
    let adapters = [];
    if (method === "fusion") {
      const done = await api("/ui/api/fusion", { method: "POST", body: { input: settings.text, top_k: settings.k, fusion_method: settings.fusion, max_tokens: settings.maxTokens } });
      out.textContent = done.answer;
      adapters = done.adapters;
      used.append(`${settings.fusion} fusion (generated whole, not streamed); `);
    } else {
      const body = { messages, max_tokens: settings.maxTokens };
      if (method === "mixture") Object.assign(body, { model: "mixture", adapters: settings.retrieved.map((a) => ({ name: a.name, weight: a.weight })) });
      else if (method === "selection") body.model = settings.retrieved[0].name;
      else body.model = info.model;
      const last = await streamChat(body, (delta) => out.append(delta), settings.signal);
      adapters = (last && last.adapters) || [];
    }
    used.append(
      adapters.length ? `adapters used: ${adapters.map((a) => `${a.name} × ${num(a.weight, 2)}`).join(", ")}` : "no adapter (base model)",
      ` · ${((performance.now() - started) / 1000).toFixed(1)} s`,
    );
  } catch (err) {
    panel.append(notice("error", err.name === "AbortError" ? "stopped" : err.message));
  } finally {
    out.classList.remove("streaming");
  }
}
