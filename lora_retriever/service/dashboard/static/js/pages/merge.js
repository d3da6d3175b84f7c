// Merge (admin): pick adapters and weights, a fusion method -> POST /merge -> a new registered adapter.
import { api } from "../api.js";
import { clearErrors, field, h, notice, showError, values } from "../dom.js";

const OPTION_HELP = {
  svd_rank: "svd: rank of the result (default: the exact rank)",
  density: "ties / dare: share of each delta kept (0-1]",
  seed: "dare: seed of the random drop",
};

export async function render(root, { info }) {
  const { adapters } = await api("/ui/api/pool");
  const filter = h("input", { type: "search", id: "merge-filter", "aria-controls": "merge-picker", placeholder: "filter…" });
  const picker = h("div", { class: "picker", id: "merge-picker", role: "group", "aria-label": "Adapters to merge" },
    adapters.map((a, i) => {
      const box = h("input", { type: "checkbox", id: `pick-${i}`, "data-name": a.name });
      const weight = h("input", { type: "number", id: `w-${i}`, value: 1, step: "any", "aria-label": `weight of ${a.name}`, disabled: true });
      box.addEventListener("change", () => {
        weight.disabled = !box.checked;
      });
      return h("div", { class: "pick", "data-name": a.name }, box, h("label", { for: `pick-${i}` }, a.name, a.task || a.category ? h("span", { class: "muted small" }, ` · ${a.task || a.category}`) : null), weight);
    }));
  filter.addEventListener("input", () => {
    const q = filter.value.trim().toLowerCase();
    for (const row of picker.children) row.hidden = q && !row.dataset.name.toLowerCase().includes(q);
  });
  const form = h("form", { class: "panel", novalidate: true, "aria-labelledby": "merge-title" },
    h("h1", { id: "merge-title" }, "Merge adapters"),
    h("p", { class: "muted" }, "Fuses the chosen adapters into one new PEFT adapter (a plain PEFT directory any PEFT or vLLM user can load) and registers it in the pool; its key is the weighted mean of the sources' keys."),
    h("div", { class: "row" },
      field({ name: "name", label: "New adapter name", hint: "letters, digits, _ or -" }),
      field({ name: "method", label: "Fusion method", type: "select", options: info.fusion_methods, value: "cat", hint: "cat is exact (rank = sum of ranks); linear is the paper's" }),
      field({ name: "svd_rank", label: "SVD rank", type: "number", hint: OPTION_HELP.svd_rank, attrs: { min: 1 } }),
      field({ name: "density", label: "Density", type: "number", hint: OPTION_HELP.density, attrs: { step: "any", min: 0, max: 1 } }),
      field({ name: "seed", label: "Seed", type: "number", hint: OPTION_HELP.seed })),
    h("div", { class: "field wide" },
      h("span", { class: "label", id: "adapters-label" }, `Adapters and weights (${adapters.length} in the pool)`),
      h("label", { for: "merge-filter", class: "small" }, "Filter the list"), filter,
      picker,
      h("span", { class: "field-error", "data-error-for": "adapters", role: "alert" })),
    field({ name: "description", label: "Description", wide: true }),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Merge and register")));
  const status = h("div", { "aria-live": "polite" });
  root.append(form, status);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    status.replaceChildren();
    const v = values(form);
    const chosen = [...picker.querySelectorAll("input[type=checkbox]:checked")].map((box) => ({
      name: box.dataset.name,
      weight: Number(box.closest(".pick").querySelector("input[type=number]").value),
    }));
    const body = { name: v.name || "", method: v.method, adapters: chosen, description: v.description || "" };
    for (const key of ["svd_rank", "density", "seed"]) if (v[key] !== undefined) body[key] = v[key];
    try {
      const { adapter } = await api("/merge", { method: "POST", body });
      status.replaceChildren(notice("ok", `Registered ${adapter.lora_name} (${v.method} of ${chosen.map((c) => c.name).join(", ")}). `,
        h("a", { href: `#/pool?adapter=${encodeURIComponent(adapter.lora_name)}`, id: "merge-result" }, "See it in the pool")));
    } catch (err) {
      showError(form, err);
    }
  });
}
