// Sign-in: an API key, checked with GET /whoami, kept in this tab's sessionStorage and sent as a Bearer header.
import { session, signIn, signOut } from "../api.js";
import { clearErrors, field, h, notice, showError } from "../dom.js";

export async function render(root, { refresh, navigate }) {
  root.append(h("h1", {}, "Sign in"));
  if (!session.auth) {
    root.append(notice("info", "This server has no API keys: every page is open, with admin rights."));
    return;
  }
  if (session.scope) {
    const out = h("button", { type: "button", class: "secondary", onclick: async () => {
      signOut();
      await refresh();
      navigate("signin");
    } }, "Sign out");
    root.append(h("div", { class: "panel" },
      h("p", {}, `Signed in with ${session.label ? `the key “${session.label}”` : "a key"} of scope `, h("b", { id: "scope" }, session.scope),
        session.scope === "read" ? " (read-only: no training, registering, deleting or merging)." : "."),
      out));
    return;
  }
  const form = h("form", { class: "panel", novalidate: true, style: "max-width:36rem" },
    h("p", { class: "muted" }, "Paste an API key of this server (it starts with lrk_). It stays in this browser tab only."),
    field({ name: "authorization", label: "API key", type: "password", attrs: { autocomplete: "off", spellcheck: "false", size: 48 } }),
    h("div", { class: "actions" }, h("button", { type: "submit" }, "Sign in")));
  root.append(form);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const key = form.elements.namedItem("authorization").value.trim();
    if (!key) {
      showError(form, { param: "authorization", message: "paste a key" });
      return;
    }
    signIn(key);
    try {
      await refresh();
    } catch (err) {
      signOut();
      showError(form, err);
      return;
    }
    if (!session.scope) {
      showError(form, { param: "authorization", message: "the server refused this key: it is not one of its keys" });
      return;
    }
    navigate("pool");
  });
}
