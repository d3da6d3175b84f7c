// The service's HTTP API as the pages use it: JSON calls with the signed-in key, SSE streaming, errors.

const KEY = "lora-retriever-api-key";

/** Who is signed in: the key (kept in this tab's sessionStorage only), its scope, whether the server checks keys. */
export const session = { key: sessionStorage.getItem(KEY), scope: null, label: null, auth: null };

export function signIn(key) {
  session.key = key;
  sessionStorage.setItem(KEY, key);
}

export function signOut() {
  session.key = null;
  session.scope = null;
  session.label = null;
  sessionStorage.removeItem(KEY);
}

export const isAdmin = () => session.scope === "admin";

/** A refused request: the server's OpenAI-shaped error ({message, type, param, code}) and the HTTP status. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

function headers(extra = {}) {
  const h = { ...extra };
  if (session.key) h.Authorization = `Bearer ${session.key}`;
  return h;
}

async function parse(response) {
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: { message: text.slice(0, 500) } };
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

/** A JSON request; `body` is sent as JSON, `raw` (a Blob / File / string) as it is. */
export async function api(path, { method = "GET", body, raw, contentType } = {}) {
  const init = { method, headers: headers() };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  } else if (raw !== undefined) {
    init.headers["Content-Type"] = contentType || "application/octet-stream";
    init.body = raw;
  }
  return parse(await fetch(path, init));
}

/** A file the API serves behind the key (an <img> can't send headers): an object URL of it. */
export async function objectUrl(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) await parse(response);
  return URL.createObjectURL(await response.blob());
}

/**
 * POST /v1/chat/completions with stream: true; calls onText(delta) per chunk and returns the last chunk
 * (it carries the adapters, weights and similarities used). An error sent inside the stream is thrown.
 */
export async function streamChat(body, onText, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true }),
    signal,
  });
  if (!response.ok) await parse(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return last;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) onText(delta.content);
        if (chunk.adapters) last = chunk;
      }
    }
  }
  return last;
}
