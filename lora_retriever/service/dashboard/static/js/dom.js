// Small DOM helpers: an element builder, labelled form fields, and the server's errors shown next to fields.

/** h("div", {class: "x", onclick: f}, child, "text", [more]) -> an element. `null`/`false` children are skipped. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key === "value") el.value = value;
    else if (key === "checked") el.checked = Boolean(value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export const SVG_NS = "http://www.w3.org/2000/svg";

/** An SVG element with attributes (and children). */
export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) el.setAttribute(key, String(value));
  }
  append(el, children);
  return el;
}

let uid = 0;

/**
 * A labelled form control with a slot for its error: {name, label, type, value, hint, options, attrs}.
 * `type`: text | number | password | textarea | select | checkbox | file. The control gets `name`, so the
 * server's error for that `param` lands next to it (`showError`).
 */
export function field({ name, label, type = "text", value, hint, options, attrs = {}, wide = false }) {
  const id = `f-${name}-${++uid}`;
  const errorId = `${id}-error`;
  const hintId = hint ? `${id}-hint` : null;
  const common = { id, name, "aria-describedby": [hintId, errorId].filter(Boolean).join(" "), ...attrs };
  let control;
  if (type === "textarea") control = h("textarea", common, value ?? "");
  else if (type === "select") {
    control = h("select", common, (options || []).map((o) => {
      const [v, text] = Array.isArray(o) ? o : [o, o];
      return h("option", { value: v, selected: String(v) === String(value) }, text);
    }));
  } else if (type === "checkbox") {
    const box = h("input", { type: "checkbox", ...common, checked: Boolean(value) });
    return h("div", { class: "field" },
      h("label", { for: id }, box, " ", label),
      hint ? h("span", { class: "hint", id: hintId }, hint) : null,
      h("span", { class: "field-error", id: errorId, "data-error-for": name, role: "alert" }));
  } else control = h("input", { type, ...common, value: value ?? null });
  return h("div", { class: `field${wide ? " wide" : ""}${type === "text" || type === "textarea" ? " grow" : ""}` },
    h("label", { for: id }, label),
    control,
    hint ? h("span", { class: "hint", id: hintId }, hint) : null,
    h("span", { class: "field-error", id: errorId, "data-error-for": name, role: "alert" }));
}

/** Clear every field error and the form-level notice of `form`. */
export function clearErrors(form) {
  for (const el of form.querySelectorAll("[data-error-for]")) el.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  const notice = form.querySelector(".form-error");
  if (notice) notice.textContent = "";
}

/**
 * Show a refused request's message next to the field it names (`err.param`, e.g. "max_steps" or
 * "adapters.0.weight"; `aliases` maps server names to field names), else in the form's notice.
 */
export function showError(form, err, aliases = {}) {
  const param = err && err.param ? String(err.param) : "";
  const parts = param.split(".");
  const candidates = [param, parts[0], parts[parts.length - 1]].map((p) => aliases[p] || p).filter(Boolean);
  for (const name of candidates) {
    const slot = form.querySelector(`[data-error-for="${CSS.escape(name)}"]`);
    if (slot) {
      slot.textContent = err.message;
      const control = form.querySelector(`[name="${CSS.escape(name)}"]`);
      if (control) {
        control.setAttribute("aria-invalid", "true");
        control.focus();
      }
      return;
    }
  }
  let notice = form.querySelector(".form-error");
  if (!notice) {
    notice = h("div", { class: "notice error form-error", role: "alert" });
    form.append(notice);
  }
  notice.textContent = err.message || String(err);
}

/** A number with `digits` decimals, or "–" for null. */
export function num(value, digits = 3) {
  return value === null || value === undefined || Number.isNaN(value) ? "–" : Number(value).toFixed(digits);
}

export function when(seconds) {
  return seconds ? new Date(seconds * 1000).toLocaleTimeString() : "–";
}

/** A notice element (`kind`: error | ok | info). */
export function notice(kind, ...children) {
  return h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, ...children);
}

/** The values of a form's named controls (numbers as numbers, checkboxes as booleans, blanks left out). */
export function values(form) {
  const out = {};
  for (const el of form.elements) {
    if (!el.name || el.disabled || el.type === "file" || el.type === "submit") continue;
    if (el.type === "checkbox") out[el.name] = el.checked;
    else if (el.value === "") continue;
    else if (el.type === "number") out[el.name] = Number(el.value);
    else out[el.name] = el.value;
  }
  return out;
}
