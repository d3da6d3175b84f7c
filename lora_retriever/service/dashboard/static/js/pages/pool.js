// Pool: every adapter with its metadata, a 2-D PCA map of the retrieval keys, register / delete (admin).
import { api, isAdmin } from "../api.js";
import { scatter } from "../chart.js";
import { clearErrors, field, h, notice, showError, values } from "../dom.js";

const groupOf = (a) => a.category || a.task || a.domain || "uncategorised";

export async function render(root, { params }) {
  const status = h("div", { "aria-live": "polite" });
  root.append(h("h1", {}, "Adapter pool"), status);
  const body = h("div");
  root.append(body);

  async function load(selected) {
    const { adapters, map } = await api("/ui/api/pool");
    body.replaceChildren(...view(adapters, map, selected, load, status));
  }
  await load(params.get("adapter"));
}

function view(adapters, map, selected, reload, status) {
  const filter = h("input", { type: "search", id: "pool-filter", placeholder: "name, task, category, target…", "aria-controls": "pool-table" });
  const rows = new Map();
  let picked = null;
  const mapView = scatter(
    adapters.map((a) => ({ x: a.x, y: a.y, label: a.name, group: groupOf(a) })),
    {
      title: "Retrieval keys, first two principal components",
      xLabel: `PC 1 (${(100 * map.explained[0]).toFixed(0)} % of variance)`,
      yLabel: `PC 2 (${(100 * map.explained[1]).toFixed(0)} %)`,
      onPick: (name) => pick(name, true),
    },
  );

  function pick(name, scroll) {
    if (picked) picked.classList.remove("selected");
    picked = rows.get(name) || null;
    mapView.select(name);
    if (picked) {
      picked.classList.add("selected");
      if (scroll) picked.scrollIntoView({ block: "nearest" });
    }
  }

  const admin = isAdmin();
  const tbody = h("tbody");
  for (const a of adapters) {
    const targets = Array.isArray(a.target_modules) ? a.target_modules : [a.target_modules].filter(Boolean);
    const tr = h("tr", { "data-name": a.name, onclick: () => pick(a.name, false) },
      h("td", { class: "name" }, a.name),
      h("td", {}, a.task || "–", a.category ? h("div", { class: "small muted" }, a.category) : null),
      h("td", { class: "num" }, a.r ?? "–"),
      h("td", { class: "num" }, a.lora_alpha ?? "–"),
      h("td", {}, targets.map((t) => h("span", { class: "tag" }, t))),
      h("td", { class: "small", title: a.base_model || "" }, a.base_model ? a.base_model.split("/").filter(Boolean).pop() : "–"),
      h("td", { class: "desc small" }, a.source || "–", a.registered ? h("div", { class: "muted" }, "registered over HTTP") : null),
      h("td", { class: "small" }, a.pinned ? "pinned" : a.resident ? "loaded" : "on disk"),
      h("td", { class: "desc small" }, a.description || "", a.config_error ? h("div", { class: "notice error" }, a.config_error) : null),
      admin ? h("td", {}, h("button", { class: "danger", type: "button", "aria-label": `Delete ${a.name}`, onclick: (e) => remove(e, a.name) }, "Delete")) : null,
    );
    rows.set(a.name, tr);
    tbody.append(tr);
  }

  async function remove(event, name) {
    event.stopPropagation();
    if (!window.confirm(`Delete the adapter ${name} from the pool? Its files are kept.`)) return;
    try {
      await api(`/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
      status.replaceChildren(notice("ok", `Deleted ${name}.`));
      await reload();
    } catch (err) {
      status.replaceChildren(notice("error", err.message));
    }
  }

  filter.addEventListener("input", () => {
    const q = filter.value.trim().toLowerCase();
    let shown = 0;
    for (const a of adapters) {
      const text = [a.name, a.task, a.category, a.domain, a.description, a.source, ...(Array.isArray(a.target_modules) ? a.target_modules : [a.target_modules])].join(" ").toLowerCase();
      const visible = !q || text.includes(q);
      rows.get(a.name).hidden = !visible;
      shown += visible;
    }
    count.textContent = `${shown} of ${adapters.length} adapters`;
  });
  const count = h("span", { class: "muted small", "aria-live": "polite" }, `${adapters.length} adapters`);

  const table = h("div", { class: "table-wrap", id: "pool-table" },
    h("table", {},
      h("caption", { class: "muted small", style: "caption-side:bottom;text-align:left;padding:.3rem" }, "Click a row or a point to find it on the other."),
      h("thead", {}, h("tr", {},
        ["Adapter", "Task / category", "r", "alpha", "Targets", "Base model", "Source", "State", "Description"].map((t) => h("th", { scope: "col", class: t === "r" || t === "alpha" ? "num" : null }, t)),
        admin ? h("th", { scope: "col" }, h("span", { class: "muted" }, "Admin")) : null)),
      tbody));

  const parts = [
    h("div", { class: "grid-side pool-layout" },
      h("section", { class: "panel", "aria-labelledby": "map-title" },
        h("h2", { id: "map-title" }, "Key map"),
        adapters.length ? mapView.figure : h("p", { class: "muted" }, "The pool is empty."),
        h("p", { class: "muted small" }, "Each point is an adapter's retrieval key (the mean embedding of its samples); nearby adapters are retrieved for similar inputs. Colour: category, else task.")),
      h("section", { class: "panel", "aria-labelledby": "list-title" },
        h("h2", { id: "list-title" }, "Adapters"),
        h("div", { class: "field" }, h("label", { for: "pool-filter" }, "Filter adapters"), filter, count),
        table)),
  ];
  if (admin) parts.push(registerForms(reload, status));
  if (selected) setTimeout(() => pick(selected, true), 0);
  return parts;
}

function registerForms(reload, status) {
  const byPath = h("form", { class: "panel", "aria-labelledby": "reg-title", novalidate: true },
    h("h2", { id: "reg-title" }, "Register an adapter from a server folder"),
    h("div", { class: "row" },
      field({ name: "name", label: "Name", hint: "letters, digits, _ or -" }),
      field({ name: "path", label: "Adapter folder on the server", hint: "absolute path of a PEFT adapter directory", attrs: { size: 40 } })),
    field({ name: "samples", label: "Key samples (one per line)", type: "textarea", hint: "texts like the inputs this adapter should be retrieved for", wide: true }),
    h("div", { class: "row" },
      field({ name: "description", label: "Description" }),
      field({ name: "pin", label: "Keep loaded (pin)", type: "checkbox" })),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Register")));
  byPath.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(byPath);
    const v = values(byPath);
    const body = { name: v.name || "", path: v.path || "", description: v.description || "", pin: v.pin, samples: (v.samples || "").split("\n").map((x) => x.trim()).filter(Boolean) };
    try {
      const { adapter } = await api("/adapters", { method: "POST", body });
      status.replaceChildren(notice("ok", `Registered ${adapter.lora_name}.`));
      await reload(adapter.lora_name);
    } catch (err) {
      showError(byPath, err);
    }
  });

  const upload = h("form", { class: "panel", "aria-labelledby": "up-title", novalidate: true },
    h("h2", { id: "up-title" }, "Upload an adapter archive"),
    h("div", { class: "row" },
      field({ name: "name", label: "Name" }),
      field({ name: "body", label: "Archive (.tar, .tar.gz or .zip of a PEFT folder)", type: "file", attrs: { accept: ".tar,.gz,.tgz,.zip" } })),
    field({ name: "samples", label: "Key samples (one per line)", type: "textarea", wide: true }),
    field({ name: "description", label: "Description" }),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Upload and register")));
  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(upload);
    const v = values(upload);
    const file = upload.querySelector("input[type=file]").files[0];
    if (!file) {
      showError(upload, { param: "body", message: "choose an archive file" });
      return;
    }
    const query = new URLSearchParams({ name: v.name || "", description: v.description || "" });
    for (const line of (v.samples || "").split("\n").map((x) => x.trim()).filter(Boolean)) query.append("samples", line);
    try {
      const { adapter } = await api(`/adapters/archive?${query}`, { method: "POST", raw: file });
      status.replaceChildren(notice("ok", `Registered ${adapter.lora_name} from ${file.name}.`));
      await reload(adapter.lora_name);
    } catch (err) {
      showError(upload, err);
    }
  });
  return h("div", { class: "grid2" }, byPath, upload);
}
