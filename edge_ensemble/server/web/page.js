// The edge-ensemble page: a chat over this server's /v1/chat/completions that streams with the provenance
// extension on ("edge_ensemble": {"provenance": true}, docs/web.md) and draws who wrote each token.
// Plain JavaScript, no build step, nothing fetched from anywhere but this server.
"use strict";

const KEY_STORE = "edge-ensemble-api-key"; // sessionStorage only: the key leaves with the tab
const $ = (id) => document.getElementById(id);
const state = { info: null, members: {}, history: [], busy: false };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

// -- the API key: asked once, when the server answers 401 -------------------------------------------------

let keyWaiters = [];
function askKey(message) {
  $("key-error").textContent = message || "";
  $("key-form").hidden = false;
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_STORE, key);
  $("api-key").value = "";
  $("key-form").hidden = true;
  const waiting = keyWaiters;
  keyWaiters = [];
  waiting.forEach((resolve) => resolve());
});

// fetch, asking for the key (again) while the server answers 401
async function call(path, init = {}) {
  for (;;) {
    const resp = await fetch(path, { ...init, headers: headers() });
    if (resp.status !== 401) return resp;
    const had = sessionStorage.getItem(KEY_STORE);
    sessionStorage.removeItem(KEY_STORE);
    await askKey(had ? "That key was refused; try again." : "");
  }
}

// -- the ensemble: members (legend), policies (selector) ---------------------------------------------------

async function load() {
  const resp = await call("/v1/edge_ensemble");
  if (!resp.ok) throw new Error(await errorText(resp));
  const info = await resp.json();
  state.info = info;
  $("model").textContent = info.model;
  const legend = $("legend");
  legend.replaceChildren();
  info.members.forEach((m, i) => {
    state.members[m.name] = i;
    legend.append(el("span", { class: "chip", "data-member": m.name, style: `--c: var(--m${i % 8})` },
      m.name, el("span", { class: "role" }, m.role)));
  });
  legend.append(el("span", { class: "legend-override" }, "overridden by the ensemble"));
  const select = $("policy");
  select.replaceChildren();
  for (const p of info.policies) {
    const option = el("option", { value: p.name }, p.name + (p.name === info.policy ? " (default)" : ""));
    if (p.name === info.policy) option.selected = true;
    select.append(option);
  }
  showSummary();
  document.body.dataset.ready = "1";
}

function policyInfo(name) {
  return (state.info?.policies || []).find((p) => p.name === name);
}

function showSummary() {
  const p = policyInfo($("policy").value);
  if (!p) return;
  const options = p.options.length ? " · options: " + p.options.join(", ") : "";
  $("policy-summary").textContent = p.summary + options;
}
$("policy").addEventListener("change", showSummary);

async function errorText(resp) {
  try {
    const body = await resp.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (_) {
    return `HTTP ${resp.status}`;
  }
}

// -- one answer --------------------------------------------------------------------------------------------

function memberStyle(name) {
  const i = state.members[name];
  return i === undefined ? "" : `--c: var(--m${i % 8})`;
}

function tokenSpan(token) {
  const span = el("span", { class: "tok", "data-member": token.member || "", "data-kind": token.kind || "",
                            style: memberStyle(token.member) }, token.text);
  if (token.end) span.classList.add("end"); // the ensemble's choice to end here (drawn by the style sheet)
  if (token.override) {
    span.classList.add("override");
    span.dataset.override = "1";
    span.dataset.drafted = token.override.drafted;
  }
  if (token.override || token.top) {
    span.classList.add("has-tip");
    span.tip = token; // read by the tooltip
  }
  return span;
}

function figuresLine(stats, ext) {
  const parts = [`${stats.tokens} tokens`, `${stats.tokens_per_second.toFixed(1)} tok/s`,
                 `E/T ${(100 * stats.ensembled_fraction).toFixed(0)}%`, `policy ${stats.policy}`];
  if (stats.overridden_tokens) parts.push(`${stats.overridden_tokens} overridden`);
  if (stats.draft_acceptance_rate !== null && stats.draft_acceptance_rate !== undefined)
    parts.push(`drafts accepted ${(100 * stats.draft_acceptance_rate).toFixed(0)}%`);
  if (stats.branches) parts.push(`${stats.branches} branches, ${stats.generated_tokens} tokens generated`);
  parts.push(`prompt ${stats.prompt_seconds.toFixed(2)} s`);
  if (ext.timed_out) parts.push("time limit reached");
  return parts.join(" · ");
}

// Every branch or sample, whatever fields its policy gives it: known ones first, the rest as they come.
const FIRST = ["index", "chosen", "answer", "votes", "confidence", "mean_logprob", "weight", "member", "origin"];
function branchTable(branches) {
  const keys = [];
  for (const k of FIRST) if (branches.some((b) => k in b)) keys.push(k);
  for (const b of branches) for (const k of Object.keys(b)) if (!keys.includes(k) && k !== "text") keys.push(k);
  keys.push("text");
  const table = el("table", { class: "branches" },
    el("caption", {}, `${branches.length} branches/samples; the highlighted one was returned`));
  table.append(el("tr", {}, ...keys.map((k) => el("th", {}, k))));
  for (const b of branches) {
    const row = el("tr", { class: "branch" + (b.chosen ? " chosen" : ""), "data-chosen": b.chosen ? "1" : "0" });
    for (const k of keys) {
      let v = b[k];
      if (typeof v === "number" && !Number.isInteger(v)) v = v.toFixed(3);
      if (v === undefined || v === null) v = "";
      if (typeof v === "object") v = JSON.stringify(v);
      row.append(k === "text" ? el("td", { class: "text", title: String(v) }, el("div", { class: "clip" }, String(v)))
                              : el("td", {}, String(v)));
    }
    table.append(row);
  }
  return table;
}

function requestBody() {
  const ext = { provenance: true, policy: $("policy").value };
  const options = $("options").value.trim();
  if (options) Object.assign(ext, JSON.parse(options)); // a bad one throws: shown as the answer's error
  const body = { model: state.info.model, messages: state.history, stream: true, edge_ensemble: ext,
                 max_tokens: parseInt($("max-tokens").value, 10) || 128 };
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature; // 0: greedy
  return body;
}

async function ask(prompt) {
  state.busy = true;
  $("send").disabled = true;
  state.history.push({ role: "user", content: prompt });
  $("chat").append(el("div", { class: "msg user" }, el("div", { class: "who" }, "you"), prompt));
  const answer = el("div", { class: "answer" });
  const msg = el("div", { class: "msg assistant", "data-state": "streaming" },
                 el("div", { class: "who" }, "ensemble"), answer);
  $("chat").append(msg);
  let text = "";
  try {
    const body = JSON.stringify(requestBody());
    const resp = await call("/v1/chat/completions", { method: "POST", body });
    if (!resp.ok) throw new Error(await errorText(resp));
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = (chunk.choices || [])[0];
      const ext = chunk.edge_ensemble || {};
      if (ext.tokens) {
        for (const t of ext.tokens) answer.append(tokenSpan(t));
      } else if (choice && choice.delta && choice.delta.content) {
        answer.append(choice.delta.content);
      }
      if (choice && choice.delta && choice.delta.content) text += choice.delta.content;
      if (ext.stats) {
        msg.append(el("div", { class: "figures" }, figuresLine(ext.stats, ext)));
        if (ext.branches && ext.branches.length) msg.append(branchTable(ext.branches));
        msg.dataset.finish = choice ? choice.finish_reason : "";
      }
      scrollDown();
    });
    state.history.push({ role: "assistant", content: text });
    msg.dataset.state = "done";
  } catch (err) {
    state.history.pop(); // the question goes unanswered: not part of the conversation
    msg.append(el("div", { class: "error" }, String(err.message || err)));
    msg.dataset.state = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
  }
}

// The server-sent events of a response, one parsed chunk at a time, up to "data: [DONE]".
async function readEvents(resp, onChunk) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") { reader.cancel(); return; }
        onChunk(JSON.parse(data));
      }
    }
  }
}

function scrollDown() {
  window.scrollTo(0, document.body.scrollHeight);
}

// -- the tooltip: who wrote a token, what the drafter had, the candidates ------------------------------------

function tipContent(token) {
  const box = el("div");
  box.append(el("div", {}, `${token.member} · ${token.kind}`));
  if (token.override) {
    const drafted = token.override.ended ? "to end the answer" : JSON.stringify(token.override.drafted);
    const chose = token.end ? "to end it" : JSON.stringify(token.text);
    box.append(el("div", {}, `the drafter proposed ${drafted}; the ensemble chose ${chose}`));
  }
  if (token.top && token.top.length) {
    const table = el("table");
    for (const [t, lp] of token.top) {
      table.append(el("tr", { class: t === token.text ? "picked" : "" },
        el("td", {}, JSON.stringify(t)), el("td", {}, `${(100 * Math.exp(lp)).toFixed(1)}%`)));
    }
    box.append(el("div", {}, `candidates as ${token.member} scored them:`), table);
  }
  return box;
}

function showTip(span) {
  const tip = $("tip");
  tip.replaceChildren(tipContent(span.tip));
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  tip.style.left = `${Math.max(4, window.scrollX + r.left)}px`;
  tip.style.top = `${window.scrollY + r.bottom + 4}px`;
}

document.addEventListener("mouseover", (e) => {
  const span = e.target.closest && e.target.closest(".has-tip");
  if (span) showTip(span);
});
document.addEventListener("mouseout", (e) => {
  if (e.target.closest && e.target.closest(".has-tip")) $("tip").hidden = true;
});
document.addEventListener("click", (e) => { // a tap on a touch screen
  const span = e.target.closest && e.target.closest(".has-tip");
  if (span) showTip(span); else $("tip").hidden = true;
});

// -- the form --------------------------------------------------------------------------------------------

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = $("prompt").value.trim();
  if (!prompt || state.busy || !state.info) return;
  $("prompt").value = "";
  ask(prompt);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
$("clear").addEventListener("click", () => {
  state.history = [];
  $("chat").replaceChildren();
});

load().catch((err) => {
  $("chat").append(el("div", { class: "msg error" }, "cannot reach the server: " + (err.message || err)));
});
