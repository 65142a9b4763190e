// nanobot's web chat: the composer, attachments, sending and streaming, the open chat, the key prompt.

import { apiFetch, apiJson, ApiError, describeError, setKeyPrompt, sseEvents } from "./api.js";
import { icon, placeIcons } from "./icons.js";
import { Sidebar } from "./sessions.js";
import { AssistantView, addUser, clearMessages, showHistory } from "./view.js";

const SESSION_STORAGE = "nanobot.session";
const $ = (id) => document.getElementById(id);
const input = $("input");
const sendButton = $("send");
const stopButton = $("stop");
const fileInput = $("file-input");
const attachments = $("attachments");
const banner = $("banner");
const title = $("chat-title");
const chat = $("chat");
const layout = $("layout");

let sessionId = "";
let turn = null; // {controller, view} while an answer is coming
let files = []; // [{file, error}]

function newSessionId() {
  // crypto.randomUUID needs a secure context; a LAN address over plain http is not one.
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return "web-" + [...bytes].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Reopen this chat after a reload (only once it exists on the server: a chat never sent to has nothing to restore). */
function remember(id) {
  try {
    localStorage.setItem(SESSION_STORAGE, id);
  } catch {
    /* storage disabled: the chat is still there, it just is not reopened on reload */
  }
}

function showBanner(text) {
  banner.replaceChildren();
  if (!text) {
    banner.hidden = true;
    return;
  }
  const message = document.createElement("span");
  message.textContent = text;
  const close = document.createElement("button");
  close.type = "button";
  close.className = "icon";
  close.append(icon("close"));
  close.setAttribute("aria-label", "Dismiss");
  close.addEventListener("click", () => showBanner(""));
  banner.append(message, close);
  banner.hidden = false;
}

function setTitle(text) {
  title.textContent = text || "New chat";
  document.title = text ? `${text} – nanobot` : "nanobot";
}

// -- attachments -----------------------------------------------------------------------------

function formatSize(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function drawFiles() {
  attachments.replaceChildren(
    ...files.map((entry, index) => {
      const li = document.createElement("li");
      li.className = entry.error ? "file has-error" : "file";
      const name = document.createElement("span");
      name.className = "file-name";
      name.textContent = `${entry.file.name} (${formatSize(entry.file.size)})`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.className = "icon";
      remove.append(icon("close"));
      remove.setAttribute("aria-label", `Remove ${entry.file.name}`);
      remove.addEventListener("click", () => {
        files.splice(index, 1);
        drawFiles();
        input.focus();
      });
      li.append(name, remove);
      if (entry.error) {
        const error = document.createElement("span");
        error.className = "file-error";
        error.setAttribute("role", "alert");
        error.textContent = entry.error;
        li.append(error);
      }
      return li;
    }),
  );
}

function addFiles(list) {
  for (const file of list) files.push({ file, error: "" });
  drawFiles();
}

/** The server's error about a file goes next to that file: by index (files[2]) or by name. */
function blameFile(error) {
  const match = /^files\[(\d+)\]/.exec(error.param || "");
  let index = match ? Number(match[1]) : -1;
  if (index < 0) index = files.findIndex((f) => error.message.includes(`'${f.file.name}'`));
  if (index < 0 && files.length === 1 && (error.param === "files" || [413, 415].includes(error.status))) index = 0;
  if (index < 0 || index >= files.length) return false;
  files[index].error = describeError(error);
  drawFiles();
  return true;
}

// -- sending ---------------------------------------------------------------------------------

function busy(on) {
  sendButton.hidden = on;
  stopButton.hidden = !on;
  if (on) stopButton.focus();
  else if (document.activeElement === stopButton || document.activeElement === document.body) input.focus();
}

function chatRequest(text) {
  if (files.length) {
    // The multipart form of /v1/chat/completions: the same limits as any client's upload.
    const form = new FormData();
    form.append("message", text);
    form.append("session_id", sessionId);
    form.append("stream", "true");
    form.append("include_tool_events", "true");
    for (const { file } of files) form.append("files", file, file.name);
    return { method: "POST", body: form };
  }
  return {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    body: JSON.stringify({
      messages: [{ role: "user", content: text }],
      stream: true,
      session_id: sessionId,
      // Tool progress events, where the server sends them; the stream is read the same without.
      stream_options: { include_tool_events: true },
    }),
  };
}

async function readAnswer(response, view) {
  let finished = false;
  for await (const { event, data } of sseEvents(response)) {
    if (event === "nanobot.tool.progress") {
      try { view.tool(JSON.parse(data)); } catch { /* a malformed progress line is not worth a failure */ }
      continue;
    }
    if (event !== "message") continue;
    if (data === "[DONE]") {
      finished = true;
      break;
    }
    const chunk = JSON.parse(data);
    if (chunk.error) {
      throw new ApiError(0, chunk.error.message || "the turn failed", { code: chunk.error.code });
    }
    const piece = chunk.choices?.[0]?.delta?.content;
    if (piece) view.append(piece);
  }
  if (!finished) throw new ApiError(0, "the connection closed before the answer was complete.");
}

async function send() {
  // Sent before the chat list and the open chat are in place (right after the key dialog, say):
  // wait for them, or starting the chat would cancel this turn.
  await loaded;
  const text = input.value;
  if (turn || (!text.trim() && !files.length)) return;
  showBanner("");
  const sent = files.slice();
  const userBox = addUser(text, sent.map((f) => f.file.name));
  const view = new AssistantView();
  const controller = new AbortController();
  const id = sessionId;
  remember(id);
  turn = { controller, view };
  const request = chatRequest(text);
  input.value = "";
  autoGrow();
  busy(true);
  let response;
  try {
    response = await apiFetch("/v1/chat/completions", { ...request, signal: controller.signal });
  } catch (error) {
    // Refused before anything ran: nothing was said, so the message goes back to the box.
    userBox.remove();
    view.remove();
    if (!input.value) input.value = text;
    autoGrow();
    if (error.name !== "AbortError" && !(error instanceof ApiError && blameFile(error))) {
      showBanner(describeError(error));
    } else if (error instanceof ApiError) {
      showBanner("A file was refused: remove it or pick another, then send again.");
    }
    turn = null;
    busy(false);
    return;
  }
  files = [];
  drawFiles();
  try {
    await readAnswer(response, view);
    view.done();
  } catch (error) {
    if (error.name === "AbortError") view.stopped();
    else view.failed(describeError(error));
  } finally {
    turn = null;
    busy(false);
    await sidebar.load();
    if (sessionId === id) setTitle(sidebar.titleOf(id));
  }
}

function stop() {
  if (turn) turn.controller.abort(); // the server cancels the turn when the request goes away
}

// -- chats -----------------------------------------------------------------------------------

async function openSession(id, { titleOnly = false } = {}) {
  if (titleOnly) {
    setTitle(sidebar.titleOf(id));
    return;
  }
  if (turn) stop();
  sessionId = id;
  remember(id);
  setTitle(sidebar.titleOf(id));
  sidebar.highlight();
  closeSidebar();
  clearMessages();
  try {
    const session = await apiJson(`/v1/sessions/${encodeURIComponent(id)}`);
    if (sessionId !== id) return; // another chat was opened meanwhile
    setTitle(session.title);
    showHistory(session.messages);
  } catch (error) {
    // A chat that has no stored turns yet (or a server without session routes): start empty.
    if (!(error instanceof ApiError && error.status === 404)) showBanner(describeError(error));
  }
  input.focus();
}

function newChat() {
  if (turn) stop();
  sessionId = newSessionId();
  setTitle("");
  clearMessages();
  sidebar.highlight();
  closeSidebar();
  input.focus();
}

const sidebar = new Sidebar({
  onOpen: openSession,
  onDeleted: (id) => {
    if (id !== sessionId) return;
    try {
      localStorage.removeItem(SESSION_STORAGE);
    } catch {
      /* storage disabled: nothing was kept */
    }
    newChat();
  },
  currentId: () => sessionId,
  onError: showBanner,
});

// -- the API key -----------------------------------------------------------------------------

function askKey(refused) {
  const dialog = $("key-dialog");
  const field = $("key-input");
  $("key-text").textContent = refused
    ? "That API key was not accepted. Enter the server's api.apiKey again; it is kept in this browser only."
    : "This nanobot server asks for its API key (api.apiKey). It is kept in this browser only.";
  field.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      dialog.removeEventListener("close", onClose);
      resolve(value);
    };
    const onClose = () => done(dialog.returnValue === "ok" ? field.value.trim() || null : null);
    dialog.addEventListener("close", onClose);
    dialog.returnValue = "";
    dialog.showModal();
    field.focus();
  });
}

// -- layout and keyboard ---------------------------------------------------------------------

function autoGrow() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 240)}px`;
}

function closeSidebar() {
  layout.classList.remove("sidebar-open");
  $("open-sidebar").setAttribute("aria-expanded", "false");
}

function wire() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  input.addEventListener("input", autoGrow);
  stopButton.addEventListener("click", stop);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && turn) stop(); });
  $("attach").addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    addFiles(fileInput.files);
    fileInput.value = "";
    input.focus();
  });
  $("new-chat").addEventListener("click", newChat);
  $("open-sidebar").addEventListener("click", () => {
    layout.classList.add("sidebar-open");
    $("open-sidebar").setAttribute("aria-expanded", "true");
    $("new-chat").focus();
  });
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  // Dropping a file anywhere attaches it; the browser would otherwise navigate away to it.
  let depth = 0;
  const hint = $("drop-hint");
  window.addEventListener("dragenter", (e) => {
    if (!e.dataTransfer || ![...e.dataTransfer.types].includes("Files")) return;
    depth++;
    hint.hidden = false;
  });
  window.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; hint.hidden = true; } });
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    hint.hidden = true;
    if (e.dataTransfer && e.dataTransfer.files.length) addFiles(e.dataTransfer.files);
    input.focus();
  });
  chat.dataset.ready = "1";
}

async function start() {
  setKeyPrompt(askKey);
  placeIcons();
  wire();
  let stored = "";
  try {
    stored = localStorage.getItem(SESSION_STORAGE) || "";
  } catch {
    stored = "";
  }
  await sidebar.load();
  if (stored) await openSession(stored);
  else newChat();
  document.body.dataset.ready = "1"; // the tests wait for this
}

const loaded = start().catch((error) => showBanner(describeError(error)));
