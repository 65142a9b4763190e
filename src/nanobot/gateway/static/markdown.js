// Markdown to DOM nodes, safely: model text only ever becomes text nodes and a fixed set of
// elements we create ourselves (never parsed as HTML), and links only to http(s) URLs.
// Covers what chat answers use: fenced code (with a copy button), inline code, bold, italic,
// strike-through, links, lists (nested), headings, block quotes, rules, paragraphs.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const PUNCT = "\\`*_{}[]()#+-.!~<>|\"'";

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** A link target we allow: an absolute http(s) URL; anything else (javascript:, data:) is null. */
export function safeUrl(raw) {
  try {
    const url = new URL(raw.trim());
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(href, label) {
  const a = el("a");
  a.href = href;
  a.target = "_blank";
  a.rel = "noopener noreferrer";
  if (typeof label === "string") a.textContent = label;
  else inline(label.text, a);
  return a;
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  // Plain http on another machine is not a secure context: the older way still works there.
  const area = el("textarea", "offscreen");
  area.value = text;
  document.body.append(area);
  area.select();
  document.execCommand("copy");
  area.remove();
}

function codeBlock(code, lang) {
  const box = el("div", "code");
  const head = el("div", "code-head");
  const name = el("span", "code-lang");
  name.textContent = lang || "code";
  const copy = el("button", "copy");
  copy.type = "button";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", `Copy ${lang || "code"} to the clipboard`);
  copy.addEventListener("click", () => {
    copyText(code).then(
      () => { copy.textContent = "Copied"; },
      () => { copy.textContent = "Copy failed"; },
    );
    setTimeout(() => { copy.textContent = "Copy"; }, 1500);
  });
  head.append(name, copy);
  const pre = el("pre");
  const inner = el("code");
  inner.textContent = code;
  pre.append(inner);
  pre.tabIndex = 0; // a wide block scrolls: let the keyboard reach it
  box.append(head, pre);
  return box;
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

/** Render ``text`` into ``parent`` (appending). */
export function renderMarkdown(text, parent) {
  blocks(text.replace(/\r\n?/g, "\n").split("\n"), parent);
}

function blocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (!line.trim()) { i++; continue; }
    let m;
    if ((m = FENCE.exec(line))) {
      const closing = new RegExp(`^ {0,3}${m[1][0]}{${m[1].length},}\\s*$`);
      const body = [];
      i++;
      // An unclosed fence runs to the end: the normal state of a block still streaming in.
      while (i < lines.length && !closing.test(lines[i])) {
        body.push(lines[i]);
        i++;
      }
      i++;
      parent.append(codeBlock(body.join("\n"), m[2]));
    } else if ((m = HEADING.exec(line))) {
      const h = el(`h${Math.min(6, m[1].length + 2)}`); // h1/h2 belong to the page itself
      inline(m[2], h);
      parent.append(h);
      i++;
    } else if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) { inner.push(m[1]); i++; }
      const quote = el("blockquote");
      blocks(inner, quote);
      parent.append(quote);
    } else if (ITEM.test(line)) {
      i = list(lines, i, parent);
    } else {
      const para = [];
      while (i < lines.length && lines[i].trim() && !(para.length && startsBlock(lines[i]))) {
        para.push(lines[i].trim());
        i++;
      }
      const p = el("p");
      inline(para.join("\n"), p);
      parent.append(p);
    }
  }
}

function list(lines, i, parent) {
  const first = ITEM.exec(lines[i]);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const out = el(ordered ? "ol" : "ul");
  if (ordered && parseInt(first[2], 10) !== 1) out.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = ITEM.exec(lines[i]);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const width = indent + m[2].length + 1;
    i++;
    // The item goes on while lines are indented past its marker (a nested list, a wrapped line),
    // or are plain text right below it; a blank line ends it unless indented text follows.
    while (i < lines.length) {
      const line = lines[i];
      const spaces = line.length - line.trimStart().length;
      if (!line.trim()) {
        const next = lines[i + 1];
        if (next !== undefined && next.trim() && next.length - next.trimStart().length >= width) {
          body.push("");
          i++;
          continue;
        }
        break;
      }
      if (spaces >= width || (spaces > indent && ITEM.test(line))) {
        body.push(line.slice(Math.min(spaces, width)));
      } else if (!startsBlock(line)) {
        body.push(line.trim());
      } else {
        break;
      }
      i++;
    }
    const li = el("li");
    blocks(body, li);
    // A one-paragraph item reads better without the paragraph's margins.
    if (li.childElementCount === 1 && li.firstElementChild.tagName === "P") {
      li.replaceChildren(...li.firstElementChild.childNodes);
    }
    out.append(li);
    while (i < lines.length && !lines[i].trim() && ITEM.test(lines[i + 1] || "")
      && ITEM.exec(lines[i + 1])[1].length === indent) i++;
  }
  parent.append(out);
  return i;
}

function findClosing(text, marker, from) {
  let j = text.indexOf(marker, from);
  while (j !== -1) {
    const before = text[j - 1];
    if (j > from && before !== " " && before !== "\n" && before !== "\\") return j;
    j = text.indexOf(marker, j + 1);
  }
  return -1;
}

const WORD = /[\p{L}\p{N}]/u;

/** Inline spans of ``text`` appended to ``parent``. */
export function inline(text, parent) {
  let buf = "";
  const flush = () => {
    if (buf) parent.append(document.createTextNode(buf));
    buf = "";
  };
  let i = 0;
  while (i < text.length) {
    const c = text[i];
    if (c === "\\" && i + 1 < text.length && PUNCT.includes(text[i + 1])) {
      buf += text[i + 1];
      i += 2;
      continue;
    }
    if (c === "\n") {
      flush();
      parent.append(el("br"));
      i++;
      continue;
    }
    if (c === "`") {
      let run = 1;
      while (text[i + run] === "`") run++;
      const ticks = "`".repeat(run);
      const end = text.indexOf(ticks, i + run);
      if (end !== -1) {
        flush();
        const code = el("code");
        let body = text.slice(i + run, end).replace(/\n/g, " ");
        if (body.length > 2 && body.startsWith(" ") && body.endsWith(" ")) body = body.slice(1, -1);
        code.textContent = body;
        parent.append(code);
        i = end + run;
      } else {
        buf += ticks;
        i += run;
      }
      continue;
    }
    if (c === "*" || c === "_" || c === "~") {
      const double = text[i + 1] === c;
      const marker = double ? c + c : c;
      const next = text[i + marker.length];
      const intraword = c === "_" && i > 0 && WORD.test(text[i - 1]);
      if ((c !== "~" || double) && next && next !== " " && next !== "\n" && !intraword) {
        const end = findClosing(text, marker, i + marker.length);
        const after = text[end + marker.length];
        if (end !== -1 && !(c === "_" && after && WORD.test(after))) {
          flush();
          const span = el(c === "~" ? "del" : double ? "strong" : "em");
          inline(text.slice(i + marker.length, end), span);
          parent.append(span);
          i = end + marker.length;
          continue;
        }
      }
      buf += marker;
      i += marker.length;
      continue;
    }
    if (c === "[" || (c === "!" && text[i + 1] === "[")) {
      const open = c === "!" ? i + 1 : i;
      const close = text.indexOf("](", open);
      const end = close === -1 ? -1 : text.indexOf(")", close + 2);
      if (close !== -1 && end !== -1 && !text.slice(open + 1, close).includes("\n")) {
        const href = safeUrl(text.slice(close + 2, end).split(/\s+"/)[0]);
        if (href) {
          flush();
          const label = text.slice(open + 1, close) || href;
          parent.append(link(href, { text: label }));
          i = end + 1;
          continue;
        }
      }
      buf += c;
      i++;
      continue;
    }
    if (c === "<") {
      const end = text.indexOf(">", i);
      const href = end === -1 ? null : safeUrl(text.slice(i + 1, end));
      if (href && /^<https?:\/\//i.test(text.slice(i, end))) {
        flush();
        parent.append(link(href, text.slice(i + 1, end)));
        i = end + 1;
        continue;
      }
    }
    if ((c === "h" || c === "H") && (i === 0 || !WORD.test(text[i - 1]))) {
      const m = /^https?:\/\/[^\s<>"`]+/i.exec(text.slice(i, i + 2048));
      if (m) {
        const raw = m[0].replace(/[.,;:!?)\]'"*_]+$/, "");
        const href = safeUrl(raw);
        if (href) {
          flush();
          parent.append(link(href, raw));
          i += raw.length;
          continue;
        }
      }
    }
    buf += c;
    i++;
  }
  flush();
}
