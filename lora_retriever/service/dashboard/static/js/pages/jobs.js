// Jobs: every job with its live state and progress; one job's loss curve, metrics and log tail; cancel.
import { api, isAdmin } from "../api.js";
import { lineChart } from "../chart.js";
import { h, notice, num, when } from "../dom.js";

const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const POLL_MS = 1000;

export async function render(root, { params, navigate }) {
  let selected = params.get("id");
  let timer = null;
  let stopped = false;
  const list = h("section", { class: "panel", "aria-labelledby": "jobs-title" });
  const detail = h("section", { class: "panel", id: "job-detail", "aria-live": "polite" });
  root.append(h("div", { class: "grid-side" }, list, detail));

  async function tick() {
    if (stopped) return;
    let busy = false;
    try {
      const { jobs } = await api("/jobs");
      busy = jobs.some((j) => !FINAL.has(j.state));
      list.replaceChildren(...listView(jobs, selected, (id) => navigate("jobs", { id })));
      if (selected) busy = (await showJob(detail, selected, navigate)) || busy;
      else detail.replaceChildren(h("p", { class: "muted" }, jobs.length ? "Choose a job to see its progress, curves and log." : "No jobs yet."));
    } catch (err) {
      detail.replaceChildren(notice("error", err.message));
    }
    if (!stopped) timer = setTimeout(tick, busy ? POLL_MS : POLL_MS * 5);
  }
  await tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

function progressOf(job) {
  const p = job.progress || {};
  if (p.total_steps) return [p.step || 0, p.total_steps];
  return job.state === "succeeded" ? [1, 1] : null;
}

function listView(jobs, selected, open) {
  const rows = [...jobs].reverse().map((job) => {
    const progress = progressOf(job);
    const name = (job.params && (job.params.adapter_name || job.params.suite)) || "";
    return h("tr", { class: job.id === selected ? "selected" : null, "data-job": job.id },
      h("td", {}, h("a", { href: `#/jobs?id=${job.id}`, onclick: (e) => { e.preventDefault(); open(job.id); } }, job.id)),
      h("td", {}, job.kind, name ? h("div", { class: "small muted" }, name) : null),
      h("td", {}, h("span", { class: `state state-${job.state}` }, job.state)),
      h("td", { style: "min-width:6rem" }, progress ? h("progress", { max: progress[1], value: progress[0], "aria-label": `progress of ${job.id}` }) : "–"),
      h("td", { class: "small" }, when(job.created)));
  });
  return [
    h("h1", { id: "jobs-title" }, "Jobs"),
    jobs.length
      ? h("div", { class: "table-wrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Job", "Kind", "State", "Progress", "Created"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rows)))
      : h("p", { class: "muted" }, "No jobs yet: start one on the Train or Evaluate page."),
  ];
}

/** Render one job; returns whether it is still going (poll fast). */
async function showJob(detail, id, navigate) {
  const job = await api(`/jobs/${encodeURIComponent(id)}`);
  const progress = progressOf(job);
  const p = job.progress || {};
  const parts = [
    h("h2", {}, `${job.kind} job ${job.id}`),
    h("dl", { class: "kv" },
      h("dt", {}, "State"), h("dd", {}, h("span", { class: `state state-${job.state}`, id: "job-state" }, job.state)),
      h("dt", {}, "Progress"), h("dd", {}, progress ? `${progress[0]} / ${progress[1]} steps` : p.stage || "–", p.loss !== undefined ? ` · loss ${num(p.loss, 4)}` : ""),
      h("dt", {}, "Started"), h("dd", {}, when(job.started)),
      h("dt", {}, "Finished"), h("dd", {}, when(job.finished))),
    progress ? h("progress", { max: progress[1], value: progress[0], "aria-label": "job progress" }) : null,
  ];
  if (job.error) parts.push(notice("error", job.error));
  const actions = h("div", { class: "actions" });
  if (isAdmin() && !FINAL.has(job.state)) {
    actions.append(h("button", { class: "danger", type: "button", id: "job-cancel", onclick: async () => {
      try {
        await api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" });
      } catch (err) {
        actions.append(notice("error", err.message));
      }
    } }, "Cancel job"));
  }
  if (job.kind === "train" && job.state === "succeeded") {
    actions.append(h("a", { class: "button", id: "job-adapter", href: `#/pool?adapter=${encodeURIComponent(job.params.adapter_name)}` }, `Open ${job.params.adapter_name} in the pool`));
  }
  if (job.kind === "protocol") {
    actions.append(h("a", { class: "button secondary", href: `#/evaluate?id=${encodeURIComponent(job.id)}` }, "Results on the Evaluate page"));
  }
  parts.push(actions);
  if (job.kind === "train") parts.push(await curves(id));
  if (job.metrics) parts.push(metricsView(job));
  parts.push(h("h3", {}, "Log (tail)"), h("pre", { class: "log", tabindex: "0", "aria-label": "job log" }, job.log_tail || "(empty)"));
  detail.replaceChildren(...parts);
  const log = detail.querySelector("pre.log");
  log.scrollTop = log.scrollHeight;
  return !FINAL.has(job.state);
}

async function curves(id) {
  const box = h("div", { id: "job-curves" }, h("h3", {}, "Training curves"));
  try {
    const { series } = await api(`/ui/api/jobs/${encodeURIComponent(id)}/curves`);
    const loss = [];
    if (series["train/loss"]) loss.push({ name: "train loss", points: series["train/loss"] });
    if (series["eval/loss"]) loss.push({ name: "eval loss", points: series["eval/loss"], dotsOnly: true });
    box.append(lineChart(loss, { title: "loss per step", yLabel: "loss" }));
    if (series["train/learning_rate"]) {
      box.append(h("h3", {}, "Learning rate"), lineChart([{ name: "learning rate", points: series["train/learning_rate"] }], { title: "learning rate per step", height: 180 }));
    }
    box.append(h("p", { class: "muted small" }, "Read from the run's TensorBoard event files: tensorboard --logdir on the adapter's folder shows the same."));
  } catch (err) {
    box.append(notice("info", err.message));
  }
  return box;
}

function metricsView(job) {
  const m = job.metrics;
  const rows = [];
  const show = (label, value) => rows.push(h("dt", {}, label), h("dd", {}, value));
  if (job.kind === "train") {
    show("Steps", m.steps);
    show("Train loss", `${num(m.train_loss_first, 4)} → ${num(m.train_loss_last, 4)}`);
    if (m.eval_loss_before !== null && m.eval_loss_before !== undefined) show("Eval loss", `${num(m.eval_loss_before, 4)} → ${num(m.eval_loss_after, 4)} (perplexity ${num(m.eval_perplexity_before, 2)} → ${num(m.eval_perplexity_after, 2)})`);
    show("Time", `${num(m.train_seconds, 1)} s (${num(m.seconds_per_step, 2)} s/step)`);
    show("Trainable parameters", `${m.trainable_params} of ${m.all_params}`);
  } else if (job.kind === "protocol" && m.averages) {
    for (const [label, v] of Object.entries(m.averages)) show(label, num(v, 3));
  } else {
    rows.push(h("dt", {}, "Result"), h("dd", {}, h("pre", { class: "small" }, JSON.stringify(m, null, 1).slice(0, 2000))));
  }
  return h("div", {}, h("h3", {}, "Metrics"), h("dl", { class: "kv" }, rows));
}
