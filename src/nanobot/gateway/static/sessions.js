// The sidebar: the API's sessions (GET /v1/sessions), switch, rename (PATCH), delete (DELETE).

import { apiJson, describeError, ApiError } from "./api.js";
import { icon } from "./icons.js";

const list = document.getElementById("sessions");
const note = document.getElementById("sessions-note");
const more = document.getElementById("more-sessions");
const PAGE = 30;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

/**
 * The chat list. ``onOpen(id)`` switches to a chat; ``onDeleted(id)`` is told when one is gone;
 * ``currentId()`` names the open chat.
 */
export class Sidebar {
  constructor({ onOpen, onDeleted, currentId, onError }) {
    this.onOpen = onOpen;
    this.onDeleted = onDeleted;
    this.currentId = currentId;
    this.onError = onError;
    this.items = [];
    this.lastId = null;
    more.addEventListener("click", () => this.load(true));
  }

  showNote(text) {
    note.textContent = text;
    note.hidden = !text;
  }

  /** Fetch the newest chats (or, with ``older``, the next page) and draw the list. */
  async load(older = false) {
    const query = older && this.lastId ? `&after=${encodeURIComponent(this.lastId)}` : "";
    let page;
    try {
      page = await apiJson(`/v1/sessions?limit=${PAGE}${query}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        this.showNote("This server does not list past chats.");
      } else {
        this.showNote(`Chats could not be listed. ${describeError(error)}`);
      }
      return;
    }
    const data = Array.isArray(page.data) ? page.data : [];
    this.items = older ? [...this.items, ...data] : data;
    this.lastId = page.last_id ?? (data.length ? data[data.length - 1].id : null);
    more.hidden = !page.has_more;
    this.showNote(this.items.length ? "" : "No chats yet.");
    this.draw();
  }

  /** The title the list has for ``id``, if listed. */
  titleOf(id) {
    const found = this.items.find((s) => s.id === id);
    return found ? found.title : null;
  }

  /** Mark the open chat. */
  highlight() {
    const current = this.currentId();
    for (const li of list.children) {
      const open = li.dataset.id === current;
      li.classList.toggle("current", open);
      const button = li.querySelector(".open");
      if (open) button.setAttribute("aria-current", "page");
      else button.removeAttribute("aria-current");
    }
  }

  draw() {
    list.replaceChildren(...this.items.map((s) => this.row(s)));
    this.highlight();
  }

  row(session) {
    const li = el("li", "session");
    li.dataset.id = session.id;
    const title = session.title || session.preview || "Untitled chat";
    const open = el("button", "open", title);
    open.type = "button";
    open.title = title;
    open.addEventListener("click", () => this.onOpen(session.id));
    const rename = el("button", "icon rename");
    rename.append(icon("pencil"));
    rename.type = "button";
    rename.setAttribute("aria-label", `Rename “${title}”`);
    rename.addEventListener("click", () => this.startRename(li, session));
    const remove = el("button", "icon delete");
    remove.append(icon("trash"));
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete “${title}”`);
    remove.addEventListener("click", () => this.confirmDelete(remove, session, title));
    li.append(open, rename, remove);
    return li;
  }

  startRename(li, session) {
    const form = el("form", "rename-form");
    const label = el("label", "sr-only", "New title");
    const input = el("input");
    input.id = `rename-${Math.random().toString(36).slice(2)}`;
    label.htmlFor = input.id;
    input.value = session.title || "";
    input.maxLength = 200;
    form.append(label, input);
    let settled = false;
    const finish = async (save) => {
      if (settled) return;
      settled = true;
      const title = input.value.trim();
      if (save && title && title !== session.title) {
        try {
          const updated = await apiJson(`/v1/sessions/${encodeURIComponent(session.id)}`, {
            method: "PATCH",
            body: { title },
          });
          session.title = updated.title ?? title;
        } catch (error) {
          this.onError(`The chat could not be renamed. ${describeError(error)}`);
        }
      }
      this.draw();
      if (session.id === this.currentId()) this.onOpen(session.id, { titleOnly: true });
      list.querySelector(`li[data-id="${CSS.escape(session.id)}"] .open`)?.focus();
    };
    form.addEventListener("submit", (e) => { e.preventDefault(); finish(true); });
    input.addEventListener("keydown", (e) => { if (e.key === "Escape") { e.preventDefault(); finish(false); } });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(form);
    input.focus();
    input.select();
  }

  confirmDelete(button, session, title) {
    if (button.dataset.armed) {
      this.remove(session);
      return;
    }
    // Deleting cannot be undone: a second press confirms (no modal dialog to get lost in).
    button.dataset.armed = "1";
    button.textContent = "Delete?";
    button.classList.add("armed");
    button.setAttribute("aria-label", `Press again to delete “${title}”`);
    const disarm = () => {
      delete button.dataset.armed;
      button.replaceChildren(icon("trash"));
      button.classList.remove("armed");
      button.setAttribute("aria-label", `Delete “${title}”`);
    };
    button.addEventListener("blur", disarm, { once: true });
    setTimeout(disarm, 5000);
  }

  async remove(session) {
    try {
      await apiJson(`/v1/sessions/${encodeURIComponent(session.id)}`, { method: "DELETE" });
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 404)) {
        this.onError(`The chat could not be deleted. ${describeError(error)}`);
        return;
      }
    }
    this.items = this.items.filter((s) => s.id !== session.id);
    this.showNote(this.items.length ? "" : "No chats yet.");
    this.draw();
    this.onDeleted(session.id);
  }
}
