// Train (admin): a form over the training settings -> POST /train -> the job's page.
import { api } from "../api.js";
import { clearErrors, field, h, notice, showError, values } from "../dom.js";

// Server error params that name another field of this form.
const ALIASES = { name: "adapter_name", file: "upload" };

export async function render(root, { info, navigate }) {
  const d = info.train.defaults;
  const { datasets, folder } = await api("/ui/api/datasets");
  const datasetOptions = [["", datasets.length ? "— choose —" : "— none yet: upload one —"], ...datasets.map((x) => [x.path, `${x.name} (${(x.bytes / 1024).toFixed(1)} KB)`])];
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "train-title" },
    h("h1", { id: "train-title" }, "Train an adapter"),
    h("p", { class: "muted" }, `Trains a LoRA adapter on ${info.model} in a worker process; when it finishes it is registered in the pool with its retrieval key.`),
    h("fieldset", {},
      h("legend", {}, "Data"),
      h("div", { class: "row" },
        field({ name: "dataset_path", label: "Dataset (from the data directory)", type: "select", options: datasetOptions, hint: folder }),
        field({ name: "upload", label: "…or upload a training file", type: "file", attrs: { accept: ".json,.jsonl" }, hint: "JSON list or JSONL of {input, output}" })),
      field({ name: "server_path", label: "…or a file path on the server", hint: "absolute path; used when set", wide: true })),
    h("fieldset", {},
      h("legend", {}, "Adapter"),
      h("div", { class: "row" },
        field({ name: "adapter_name", label: "Adapter name", hint: "letters, digits, _ or -" }),
        field({ name: "lora_r", label: "Rank r", type: "number", value: d.lora_r, attrs: { min: 1 } }),
        field({ name: "lora_alpha", label: "lora_alpha", type: "number", value: d.lora_alpha, attrs: { step: "any" } }),
        field({ name: "target_modules", label: "Target modules", value: d.target_modules.join(", "), hint: "comma-separated names, or all-linear" }),
        field({ name: "quantization", label: "QLoRA (base quantization)", type: "select", options: info.train.quantizations, value: d.quantization || "none" })),
      field({ name: "description", label: "Description", wide: true })),
    h("fieldset", {},
      h("legend", {}, "Run"),
      h("div", { class: "row" },
        field({ name: "max_steps", label: "Steps", type: "number", value: d.max_steps }),
        field({ name: "learning_rate", label: "Learning rate", type: "number", value: d.learning_rate, attrs: { step: "any" } }),
        field({ name: "batch_size", label: "Batch size", type: "number", value: d.batch_size }),
        field({ name: "max_length", label: "Max length (tokens)", type: "number", value: d.max_length }),
        field({ name: "save_steps", label: "Checkpoint every (steps)", type: "number", value: d.save_steps }))),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Start training")));
  const status = h("div", { "aria-live": "polite" });
  root.append(form, status);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const v = values(form);
    try {
      const file = form.elements.namedItem("upload").files[0];
      let dataset = v.server_path || v.dataset_path || "";
      if (file && !v.server_path) {
        const { dataset: saved } = await api(`/ui/api/datasets?name=${encodeURIComponent(file.name)}`, { method: "POST", raw: file });
        dataset = saved.path;
        status.replaceChildren(notice("ok", `Uploaded ${saved.name}: ${saved.records} records.`));
      }
      const body = {
        adapter_name: v.adapter_name || "",
        dataset_path: dataset,
        lora_r: v.lora_r,
        lora_alpha: v.lora_alpha,
        target_modules: (v.target_modules || "").split(",").map((x) => x.trim()).filter(Boolean),
        quantization: v.quantization,
        max_steps: v.max_steps,
        learning_rate: v.learning_rate,
        batch_size: v.batch_size,
        max_length: v.max_length,
        save_steps: v.save_steps,
        description: v.description || "",
      };
      for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
      const job = await api("/train", { method: "POST", body });
      navigate("jobs", { id: job.id });
    } catch (err) {
      showError(form, err, { ...ALIASES, dataset_path: v.server_path ? "server_path" : "dataset_path" });
    }
  });
}
