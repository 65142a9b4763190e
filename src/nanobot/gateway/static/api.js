// The page's client of nanobot's own /v1 API: the API key, readable errors, and SSE parsing.

const KEY_STORAGE = "nanobot.apiKey";

/** An error answer of the API (an OpenAI error body), or a failure inside a stream. */
export class ApiError extends Error {
  constructor(status, message, { param = null, code = null, retryAfter = null } = {}) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

let askForKey = async () => null;
let pendingKey = null;

/** Install the function that asks the user for the API key: (refused: bool) => Promise<string|null>. */
export function setKeyPrompt(fn) {
  askForKey = fn;
}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return ""; // storage disabled: ask each time instead of failing
  }
}

function storeKey(key) {
  try {
    localStorage.setItem(KEY_STORAGE, key);
  } catch {
    /* storage disabled: the key lives as long as the page */
  }
  memoryKey = key;
}

let memoryKey = "";

/** One prompt at a time: requests that meet the same 401 wait for the same answer. */
function promptKey(refused) {
  if (!pendingKey) {
    pendingKey = askForKey(refused).finally(() => { pendingKey = null; });
  }
  return pendingKey;
}

async function errorFrom(response) {
  let message = "";
  let detail = {};
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") {
      message = body.error.message;
      detail = { param: body.error.param ?? null, code: body.error.code ?? null };
    }
  } catch {
    /* not JSON: a proxy's page, say; the status says enough */
  }
  const retry = Number(response.headers.get("Retry-After"));
  return new ApiError(response.status, message || response.statusText || "request failed", {
    ...detail,
    retryAfter: Number.isFinite(retry) && retry > 0 ? retry : null,
  });
}

/**
 * fetch() against the API with the stored key; a 401 asks the user for the key and tries again.
 * Resolves to an ok Response; rejects with ApiError (an error answer), AbortError, or TypeError
 * (the network).
 */
export async function apiFetch(path, init = {}) {
  for (let attempt = 0; ; attempt++) {
    const key = memoryKey || storedKey();
    const headers = new Headers(init.headers || {});
    if (key) headers.set("Authorization", `Bearer ${key}`);
    const response = await fetch(path, { ...init, headers });
    if (response.ok) return response;
    const error = await errorFrom(response);
    if (response.status !== 401 || attempt >= 3) throw error;
    const given = await promptKey(Boolean(key));
    if (!given) throw error;
    storeKey(given);
  }
}

/** GET/PATCH/DELETE with a JSON answer. */
export async function apiJson(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal };
  if (body !== undefined) {
    init.body = JSON.stringify(body);
    init.headers = { "Content-Type": "application/json" };
  }
  const response = await apiFetch(path, init);
  return response.json();
}

/** The events of a text/event-stream response, as {event, data}. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      // A CR at the end may be half of a CRLF: keep it until the next piece arrives.
      const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
      const text = buffer.slice(0, cut).replace(/\r\n?/g, "\n");
      buffer = text + buffer.slice(cut);
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
    const last = parseEvent(buffer.replace(/\r\n?/g, "\n"));
    if (last) yield last;
  } finally {
    reader.releaseLock();
  }
}

function parseEvent(raw) {
  let name = "message";
  const data = [];
  for (const line of raw.split("\n")) {
    if (!line || line.startsWith(":")) continue; // a comment: the server's keep-alive
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event: name, data: data.join("\n") } : null;
}

/** A sentence a person can act on, for any failure of a request. */
export function describeError(error) {
  if (error && error.name === "AbortError") return "Stopped.";
  if (error instanceof ApiError) {
    const text = error.message;
    const later = error.retryAfter ? ` Try again in ${Math.ceil(error.retryAfter)} s.` : "";
    switch (error.status) {
      case 0: return `The answer failed: ${text}`;
      case 401: return `The API key was not accepted: ${text}`;
      case 403: return `The server refused this page: ${text}`;
      case 404: return `Not found: ${text}`;
      case 413: return `Too large: ${text}`;
      case 415: return `This kind of file cannot be sent: ${text}`;
      case 429: return `The server is busy: ${text}${later}`;
      case 502: return `The model's server failed: ${text}`;
      case 503: return `The server cannot answer now: ${text}${later}`;
      case 504: return `The model took too long to answer: ${text}`;
      default: return `${text} (HTTP ${error.status})`;
    }
  }
  if (error instanceof TypeError) {
    return "Cannot reach the nanobot server. Is it still running? Check the connection and try again.";
  }
  return `Something went wrong: ${error && error.message ? error.message : error}`;
}
