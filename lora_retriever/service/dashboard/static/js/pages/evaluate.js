// Evaluate: the paper's protocol (lora-retriever-eval) as a job; its per-task table and an IID/OOD plot.
import { api, isAdmin, objectUrl } from "../api.js";
import { groupedBars } from "../chart.js";
import { clearErrors, field, h, notice, num, showError, values, when } from "../dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);

export async function render(root, { info, params, navigate }) {
  const p = info.protocol;
  root.append(h("h1", {}, "Evaluate: the LoraRetriever protocol"),
    h("p", { class: "muted" }, "Every method on one mixed-task test set, in-domain (IID: every adapter available) and out-of-domain (OOD: each item's own adapter excluded). Scores are exact match, averaged over tasks."));
  if (isAdmin()) root.append(protocolForm(p, navigate));
  const runs = h("section", { class: "panel", "aria-labelledby": "runs-title" });
  const result = h("section", { class: "panel", id: "protocol-result", "aria-live": "polite" });
  root.append(h("div", { class: "grid-side" }, runs, result));

  let timer = null;
  let stopped = false;
  const selected = params.get("id");
  async function tick() {
    if (stopped) return;
    let busy = false;
    try {
      const jobs = (await api("/jobs")).jobs.filter((j) => j.kind === "protocol").reverse();
      runs.replaceChildren(h("h2", { id: "runs-title" }, "Protocol runs"), jobs.length
        ? h("ul", {}, jobs.map((j) => h("li", {}, h("a", { href: `#/evaluate?id=${j.id}` }, j.id), ` · ${j.params.suite} · `, h("span", { class: `state state-${j.state}` }, j.state), ` · ${when(j.created)}`)))
        : h("p", { class: "muted" }, "No protocol runs yet."));
      const job = jobs.find((j) => j.id === selected) || (!selected && jobs.find((j) => j.state === "succeeded"));
      if (job) busy = await showRun(result, job);
      else result.replaceChildren(h("p", { class: "muted" }, "Run the protocol to see its table and plot here."));
    } catch (err) {
      result.replaceChildren(notice("error", err.message));
    }
    if (!stopped) timer = setTimeout(tick, busy ? 1500 : 6000);
  }
  await tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function protocolForm(p, navigate) {
  const suites = [["text", "text (the served pool)"], ["multimodal", p.suites.multimodal ? "multimodal (make demo-vlm's pools)" : "multimodal (not built: make demo-vlm)"]];
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "protocol-title" },
    h("h2", { id: "protocol-title" }, "Run the protocol"),
    h("div", { class: "row" },
      field({ name: "suite", label: "Suite", type: "select", options: suites, value: "text" }),
      field({ name: "test_data", label: "Test set (JSONL on the server)", value: p.default_test_data || "", hint: "mixed tasks; every task needs its own adapter in the pool", attrs: { size: 44 } }),
      field({ name: "num_samples", label: "Items", type: "number", value: 20, attrs: { min: 1 } }),
      field({ name: "max_new_tokens", label: "Max new tokens", type: "number", value: 16, attrs: { min: 1 } }),
      field({ name: "top_k", label: "k", type: "number", value: 3, attrs: { min: 1 } })),
    h("fieldset", {}, h("legend", {}, "Methods"),
      h("div", { class: "checks" }, p.methods.map((m) => h("label", {}, h("input", { type: "checkbox", name: `m-${m}`, "data-method": m, checked: ["base", "selection", "mixture"].includes(m) }), m))),
      h("span", { class: "field-error", "data-error-for": "methods", role: "alert" })),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Run as a job")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const v = values(form);
    const methods = [...form.querySelectorAll("input[data-method]:checked")].map((b) => b.dataset.method);
    const body = { suite: v.suite, methods, num_samples: v.num_samples, max_new_tokens: v.max_new_tokens, top_k: v.top_k };
    if (v.test_data && v.suite === "text") body.test_data = v.test_data;
    try {
      const job = await api("/ui/api/protocol", { method: "POST", body });
      navigate("evaluate", { id: job.id });
    } catch (err) {
      showError(form, err);
    }
  });
  return form;
}

/** Show one run (progress, or its table and plot); returns whether it is still going. */
async function showRun(box, job) {
  const head = [h("h2", {}, `Run ${job.id} (${job.params.suite})`), h("p", {}, h("span", { class: `state state-${job.state}` }, job.state), ` · methods ${job.params.methods.join(", ")} · ${job.params.num_samples} items · `, h("a", { href: `#/jobs?id=${job.id}` }, "log and progress"))];
  if (job.error) head.push(notice("error", job.error));
  if (job.state !== "succeeded") {
    box.replaceChildren(...head, FINAL.has(job.state) ? null : h("p", { class: "muted" }, "Running: the table appears when the run completes."));
    return !FINAL.has(job.state);
  }
  if (box.dataset.shown === job.id) return false;
  const { results } = await api(`/ui/api/jobs/${job.id}/protocol`);
  const columns = Object.keys(results.scores);
  const tasks = Object.keys(results.scores[columns[0]].per_task).sort();
  const table = h("div", { class: "table-wrap", style: "max-height:none" }, h("table", { id: "protocol-table" },
    h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "task"), columns.map((c) => h("th", { scope: "col", class: "num" }, c)))),
    h("tbody", {},
      tasks.map((t) => h("tr", {}, h("th", { scope: "row" }, t), columns.map((c) => h("td", { class: "num" }, num(results.scores[c].per_task[t], 2))))),
      h("tr", {}, h("th", { scope: "row" }, "average"), columns.map((c) => h("td", { class: "num" }, h("b", {}, num(results.scores[c].average, 3))))))));
  const groups = new Map();
  for (const c of columns) {
    const [method, setting] = c.split("/");
    if (!groups.has(method)) groups.set(method, { label: method, values: {} });
    groups.get(method).values[setting.toUpperCase()] = results.scores[c].average;
  }
  const retrieval = Object.entries(results.retrieval).map(([k, r]) => (r.top1 !== undefined ? `${k}: top-1 ${num(r.top1)}, top-3 ${num(r.top3)}` : k));
  const png = h("img", { alt: "the plot lora-retriever-eval wrote (results.png)", style: "max-width:100%" });
  objectUrl(`/ui/api/jobs/${job.id}/protocol.png`).then((url) => { png.src = url; }).catch(() => png.remove());
  box.replaceChildren(...head,
    h("h3", {}, "Exact match per task"), table,
    h("p", { class: "small muted" }, `Retriever accuracy (own adapter among the retrieved): ${retrieval.join("; ") || "–"}`),
    h("h3", {}, "Average by method"), groupedBars([...groups.values()], ["IID", "OOD"], { title: "exact match, IID vs OOD", yLabel: "exact match" }),
    h("details", {}, h("summary", {}, "The command's own plot (results.png)"), png));
  box.dataset.shown = job.id;
  return false;
}
