// The conversation on screen: user and assistant messages, streaming text, tool progress, errors.

import { icon } from "./icons.js";
import { renderMarkdown } from "./markdown.js";

const messages = document.getElementById("messages");

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function nearBottom() {
  return messages.scrollHeight - messages.scrollTop - messages.clientHeight < 80;
}

function keepScrolled(wasNear) {
  if (wasNear) messages.scrollTop = messages.scrollHeight;
}

function emptyNote(show) {
  const note = document.getElementById("empty");
  if (note) note.hidden = !show;
}

/** Remove every message (a new or another chat). */
export function clearMessages() {
  for (const node of [...messages.children]) {
    if (node.id !== "empty") node.remove();
  }
  emptyNote(true);
}

/** A user's message, with the names of the files sent along. */
export function addUser(text, fileNames = []) {
  emptyNote(false);
  const wasNear = true;
  const box = el("article", "msg user");
  box.setAttribute("aria-label", "You said");
  const body = el("div", "body");
  body.textContent = text; // what the user typed is shown as typed
  box.append(body);
  if (fileNames.length) {
    const list = el("ul", "sent-files");
    list.setAttribute("aria-label", "Files sent");
    for (const name of fileNames) {
      const li = el("li");
      li.append(icon("clip"), document.createTextNode(name));
      list.append(li);
    }
    box.append(list);
  }
  messages.append(box);
  keepScrolled(wasNear);
  return box;
}

const TOOL_MARK = { started: "…", finished: "✓", failed: "✗" };

/** The assistant's answer as it streams in. */
export class AssistantView {
  constructor() {
    emptyNote(false);
    this.text = "";
    this.box = el("article", "msg assistant pending");
    this.box.setAttribute("aria-label", "nanobot said");
    this.box.setAttribute("aria-busy", "true");
    this.tools = el("ul", "tools");
    this.tools.hidden = true;
    this.tools.setAttribute("aria-label", "Tools used");
    this.body = el("div", "body");
    this.typing = el("span", "typing", "nanobot is thinking…");
    this.body.append(this.typing);
    this.status = el("p", "status");
    this.status.hidden = true;
    this.box.append(this.tools, this.body, this.status);
    this.toolRows = new Map();
    this.frame = 0;
    const wasNear = nearBottom();
    messages.append(this.box);
    keepScrolled(wasNear);
  }

  /** More text of the answer; rendered at most once per frame. */
  append(piece) {
    this.text += piece;
    if (!this.frame) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    this.frame = 0;
    const wasNear = nearBottom();
    this.body.replaceChildren();
    renderMarkdown(this.text, this.body);
    keepScrolled(wasNear);
  }

  /** One ``nanobot.tool.progress`` event: a compact line per tool call, updated in place. */
  tool(event) {
    if (!event || typeof event !== "object") return;
    const id = String(event.call_id ?? event.tool ?? "tool");
    let row = this.toolRows.get(id);
    if (!row) {
      row = {
        li: el("li", "tool"),
        mark: el("span", "tool-mark"),
        name: el("span", "tool-name"),
        summary: el("span", "tool-summary"),
      };
      row.mark.setAttribute("aria-hidden", "true");
      row.li.append(row.mark, row.name, row.summary);
      this.tools.append(row.li);
      this.toolRows.set(id, row);
    }
    const status = ["started", "finished", "failed"].includes(event.status) ? event.status : "started";
    row.li.dataset.status = status;
    row.mark.textContent = TOOL_MARK[status];
    row.name.textContent = String(event.tool ?? "tool");
    row.summary.textContent = event.summary ? String(event.summary) : status === "started" ? "working…" : status;
    this.tools.hidden = false;
  }

  finish(note, kind) {
    if (this.frame) cancelAnimationFrame(this.frame);
    this.render();
    if (!this.text) this.body.hidden = true;
    this.box.classList.remove("pending");
    this.box.removeAttribute("aria-busy");
    if (note) {
      this.status.textContent = note;
      this.status.hidden = false;
      this.box.classList.add(kind);
      if (kind === "error") this.status.setAttribute("role", "alert");
    }
  }

  /** The answer ended normally. */
  done() { this.finish(); }

  /** The user pressed Stop: keep what came, say it was stopped. */
  stopped() { this.finish("Stopped.", "stopped"); }

  /** The turn failed: say why, next to what came before the failure. */
  failed(message) { this.finish(message, "error"); }

  remove() { this.box.remove(); }
}

function textOf(content) {
  if (typeof content === "string") return { text: content, files: [] };
  const texts = [];
  const files = [];
  for (const part of Array.isArray(content) ? content : []) {
    if (part && part.type === "text") texts.push(String(part.text ?? ""));
    else if (part && part.type === "image_url") files.push("image");
    else if (part && part.type === "file") files.push(part.file?.filename || "file");
  }
  return { text: texts.join("\n"), files };
}

/** A stored conversation (OpenAI chat messages) as the page shows it. */
export function showHistory(history) {
  clearMessages();
  let answer = null;
  for (const m of history || []) {
    if (!m || m.role === "system" || m.role === "developer") continue;
    if (m.role === "user") {
      const { text, files } = textOf(m.content);
      addUser(text, files);
      answer = null;
    } else if (m.role === "assistant") {
      answer = answer || new AssistantView();
      for (const call of m.tool_calls || []) {
        answer.tool({ call_id: call.id, tool: call.function?.name, status: "finished" });
      }
      const { text } = textOf(m.content ?? "");
      if (text) answer.text += (answer.text ? "\n\n" : "") + text;
      if (!m.tool_calls || !m.tool_calls.length) {
        answer.done();
        answer = null;
      }
    }
  }
  if (answer) answer.done();
  messages.scrollTop = messages.scrollHeight;
}
