// The dashboard's shell: hash routes (#/pool, #/try, ...), sign-in state, and one page rendered at a time.
import { api, ApiError, isAdmin, session, signOut } from "./api.js";
import { h, notice } from "./dom.js";

const PAGES = {
  pool: () => import("./pages/pool.js"),
  try: () => import("./pages/try.js"),
  train: () => import("./pages/train.js"),
  jobs: () => import("./pages/jobs.js"),
  merge: () => import("./pages/merge.js"),
  evaluate: () => import("./pages/evaluate.js"),
  signin: () => import("./pages/signin.js"),
};
const ADMIN_PAGES = new Set(["train", "merge"]);

const main = document.getElementById("main");
let cleanup = null;
let info = null;
let renders = 0; // each render's number: one that a newer render overtook stops at its next await

/** "#/jobs?id=abc" -> {page: "jobs", params: URLSearchParams("id=abc")} */
function route() {
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  return { page: path || "pool", params: new URLSearchParams(query || "") };
}

export function navigate(page, params = {}) {
  const query = new URLSearchParams(params).toString();
  location.hash = `#/${page}${query ? `?${query}` : ""}`;
}

/** Ask the server who the key is (GET /whoami); a key it refuses is dropped. */
export async function refreshSession() {
  session.auth = (await api("/ui/api/auth")).auth;
  if (session.auth && !session.key) {
    session.scope = null;
  } else {
    try {
      const me = await api("/whoami");
      session.scope = me.scope;
      session.label = me.label;
    } catch (err) {
      if (!(err instanceof ApiError) || err.status !== 401) throw err;
      signOut();
    }
  }
  info = null;
  renderChrome();
}

function renderChrome() {
  document.body.dataset.scope = session.scope || "none";
  for (const link of document.querySelectorAll("#nav a")) {
    link.hidden = !session.scope || (link.hasAttribute("data-admin") && !isAdmin());
  }
  const who = document.getElementById("who");
  const signin = document.getElementById("signin-link");
  if (!session.auth) {
    who.textContent = "open server (no API keys)";
    signin.hidden = true;
  } else if (session.scope) {
    who.textContent = `signed in: ${session.label || "key"} (${session.scope})`;
    signin.textContent = "Sign out";
    signin.hidden = false;
  } else {
    who.textContent = "";
    signin.textContent = "Sign in";
    signin.hidden = false;
  }
}

async function render() {
  const mine = ++renders;
  const current = () => mine === renders;
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  let { page, params } = route();
  if (!PAGES[page]) page = "pool";
  if (session.auth && !session.scope && page !== "signin") page = "signin";
  if (ADMIN_PAGES.has(page) && !isAdmin()) {
    main.replaceChildren(h("h1", {}, "Not available"), notice("info", "This page needs an admin key. ", h("a", { href: "#/signin" }, "Sign in"), " with one."));
    return;
  }
  for (const link of document.querySelectorAll("header a[data-page]")) {
    if (link.dataset.page === page) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  try {
    if (!info && page !== "signin") info = await api("/ui/api/info");
    const module = await PAGES[page]();
    if (!current()) return;
    const root = h("div", { class: `page page-${page}` });
    main.replaceChildren(root);
    const stop = await module.render(root, { info, params, navigate, refresh: refreshSession, reloadInfo });
    if (current()) cleanup = stop || null;
    else if (stop) stop(); // the page was left while it loaded
  } catch (err) {
    if (current()) main.replaceChildren(h("h1", {}, "Something went wrong"), notice("error", err.message || String(err)));
  }
  if (current()) document.body.dataset.ready = page;
}

async function reloadInfo() {
  info = await api("/ui/api/info");
  return info;
}

// Pages render only once the session is known (a hash change during start-up waits for it).
const boot = refreshSession().then(
  () => true,
  (err) => {
    main.replaceChildren(h("h1", {}, "The service did not answer"), notice("error", err.message || String(err)));
    return false;
  },
);
window.addEventListener("hashchange", () => boot.then((ok) => ok && render()));
boot.then((ok) => ok && render());
