// nbdfault's live page: reads the control API (the same endpoints and token as every client)
// and draws what the server does. Events arrive over fetch-based Server-Sent Events (fetch, not
// EventSource, so the bearer token goes in a header); they are queued and drawn once per animation
// frame into a canvas, and every buffer is bounded, so fio at full speed cannot freeze the tab.
"use strict";

const WINDOW_NS = 30e9;          // the disk map shows the last 30 s
const MAX_MARKS = 20000;         // requests kept for drawing
const MAX_QUEUE = 50000;         // events waiting for the next frame; beyond, the oldest go
const MAX_FAULTS = 20;           // rows of the fault table
const COLORS = { read: "#4ea1ff", write: "#3fcf6f", other: "#9aa5b1", failed: "#ff2020", pending: "#ffb020" };

const state = {
  token: null,
  export: null,         // the export's view (GET /v1/exports/{name})
  hello: null,          // the stream's first event
  clockAt: 0,           // performance.now() when hello came
  marks: [],            // {start, end, offset, length, op, failed, pending, key}
  pending: new Map(),   // connection:cookie:offset -> mark, for stalled and delayed requests
  bins: [],             // aggregated requests: {start, end, bin, count, op}
  queue: [],
  faults: [],
  stats: new Map(),     // op -> [{t, requests, bytes, errors, latencyNs}]
  abort: null,
};

// ---- the token -----------------------------------------------------------------------------
// Kept in sessionStorage (this tab only, gone when it closes), sent as `Authorization: Bearer`.
// A `#token=...` fragment (never sent to servers, not in Referer) is moved there and erased.
function loadToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  if (fragment.has("token")) {
    sessionStorage.setItem("nbdfault-token", fragment.get("token"));
    fragment.delete("token");
    history.replaceState(null, "", location.pathname + location.search + (fragment.toString() ? "#" + fragment : ""));
  }
  state.token = sessionStorage.getItem("nbdfault-token");
}

function headers() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: headers(), cache: "no-store" });
  if (response.status === 401) {
    askToken();
    throw new Error("this server needs its control token");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error || response.status + " " + response.statusText);
  }
  return response.json();
}

function askToken() {
  const form = document.getElementById("token-form");
  form.hidden = false;
  form.onsubmit = (event) => {
    event.preventDefault();
    sessionStorage.setItem("nbdfault-token", document.getElementById("token").value);
    location.reload();
  };
}

function segment(name) {
  return name === "" ? "@default" : encodeURIComponent(name);
}

function status(text) {
  document.getElementById("status").textContent = text;
}

// ---- the stream ----------------------------------------------------------------------------
async function stream(name) {
  if (state.abort) state.abort.abort();
  const abort = new AbortController();
  state.abort = abort;
  Object.assign(state, { marks: [], bins: [], queue: [], faults: [], hello: null });
  state.pending.clear();
  state.stats.clear();
  const response = await fetch(`/v1/exports/${segment(name)}/events?rate=2000`, { headers: headers(), signal: abort.signal });
  if (response.status === 401) return askToken();
  if (!response.ok) return status("event stream refused: " + response.status);
  status("live");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;
      state.queue.push([kind, JSON.parse(data)]);
      if (state.queue.length > MAX_QUEUE) state.queue.splice(0, state.queue.length - MAX_QUEUE);
    }
  }
  if (!abort.signal.aborted) status("the stream ended; reload to watch again");
}

function now() {
  if (!state.hello) return 0;
  return state.hello.time_ns + (performance.now() - state.clockAt) * 1e6;
}

function stat(op, requests, bytes, errors, latencyNs) {
  const t = now();
  if (!state.stats.has(op)) state.stats.set(op, []);
  const list = state.stats.get(op);
  list.push({ t, requests, bytes, errors, latencyNs });
  while (list.length && list[0].t < t - 5e9) list.shift();
  if (list.length > 5000) list.splice(0, list.length - 5000);
}

function addMark(mark) {
  state.marks.push(mark);
  if (state.marks.length > MAX_MARKS) state.marks.splice(0, state.marks.length - MAX_MARKS);
}

let refreshSoon = false;

function handle(kind, data) {
  switch (kind) {
    case "hello":
      state.hello = data;
      state.clockAt = performance.now();
      break;
    case "request": {
      const key = `${data.connection}:${data.cookie}:${data.offset}`;
      const failed = data.reply !== "ok";
      const waiting = state.pending.get(key);
      if (waiting) {
        state.pending.delete(key);
        Object.assign(waiting, { end: data.end_ns, pending: false, failed });
      } else {
        addMark({ start: data.start_ns, end: data.end_ns, offset: data.offset, length: data.length, op: data.op, failed, pending: false });
      }
      stat(data.op, 1, failed ? 0 : data.length, failed ? 1 : 0, data.end_ns - data.start_ns);
      break;
    }
    case "pending": {
      const mark = { start: data.start_ns, end: null, offset: data.offset, length: data.length, op: data.op, failed: false, pending: true };
      state.pending.set(`${data.connection}:${data.cookie}:${data.offset}`, mark);
      addMark(mark);
      break;
    }
    case "aggregate":
      for (const [op, counts] of Object.entries(data.ops)) {
        stat(op, counts.requests, counts.bytes, counts.errors, counts.latency_sum_ns);
        for (const [bin, count] of counts.bins) state.bins.push({ start: data.from_ns, end: data.to_ns, bin, count, op });
      }
      if (state.bins.length > MAX_MARKS) state.bins.splice(0, state.bins.length - MAX_MARKS);
      document.getElementById("sampling").textContent =
        `more than ${state.hello.rate} requests per second: the rest are drawn summed up per 100 ms (${data.requests} in the last)`;
      break;
    case "fault":
      state.faults.unshift(data);
      state.faults.length = Math.min(state.faults.length, MAX_FAULTS);
      refreshSoon = true;
      break;
    case "trigger": case "policy": case "reset": case "power":
      refreshSoon = true;
      break;
    case "dropped":
      status("dropped by the server: " + data.reason);
      break;
  }
}

// ---- drawing, once per frame -----------------------------------------------------------------
function frame() {
  const batch = state.queue;
  state.queue = [];
  for (const [kind, data] of batch) handle(kind, data);
  if (batch.length) drawFaults();
  if (refreshSoon) { refreshSoon = false; refresh(); }
  draw();
  requestAnimationFrame(frame);
}

function draw() {
  const canvas = document.getElementById("map");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.fillStyle = "#10161d";
  context.fillRect(0, 0, width, height);
  if (!state.hello) return;
  const size = state.hello.size || 1;
  const right = now(), left = right - WINDOW_NS;
  const x = (t) => ((t - left) / WINDOW_NS) * width;
  const y = (offset) => (offset / size) * height;
  context.fillStyle = "rgba(154,165,177,0.25)";
  for (const bin of state.bins) {
    if (bin.end < left) continue;
    context.globalAlpha = Math.min(1, 0.15 + bin.count / 50);
    context.fillStyle = COLORS[bin.op] || COLORS.other;
    context.fillRect(x(bin.start), y(bin.bin * state.hello.bin_bytes), Math.max(2, x(bin.end) - x(bin.start)), Math.max(2, y(state.hello.bin_bytes)));
  }
  context.globalAlpha = 1;
  // Failed and pending requests last, on top.
  for (const pass of ["ok", "pending", "failed"]) {
    for (const mark of state.marks) {
      const kind = mark.failed ? "failed" : mark.pending ? "pending" : "ok";
      if (kind !== pass) continue;
      const end = mark.end ?? right;
      if (end < left) continue;
      const big = kind !== "ok";
      context.fillStyle = big ? COLORS[kind] : (COLORS[mark.op] || COLORS.other);
      const w = Math.max(big ? 6 : 3, x(end) - x(mark.start));
      const h = Math.max(big ? 6 : 3, y(mark.length || 1));
      context.fillRect(x(mark.start) - (big ? 3 : 0), y(mark.offset) - (big ? 2 : 0), w, h);
    }
  }
  drawStats();
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

let statsDrawn = 0;
function drawStats() {
  if (performance.now() - statsDrawn < 500) return;
  statsDrawn = performance.now();
  const body = document.querySelector("#ops tbody");
  body.replaceChildren();
  const t = now();
  for (const [op, list] of state.stats) {
    const recent = list.filter((entry) => entry.t >= t - 5e9);
    const sum = (key) => recent.reduce((total, entry) => total + entry[key], 0);
    const requests = sum("requests");
    const row = body.insertRow();
    cell(row, op);
    cell(row, (requests / 5).toFixed(1), "num");
    cell(row, (sum("bytes") / 5 / 1048576).toFixed(2), "num");
    cell(row, requests ? (sum("latencyNs") / requests / 1e6).toFixed(3) + " ms" : "-", "num");
    cell(row, (sum("errors") / 5).toFixed(1), "num");
  }
}

function drawFaults() {
  const body = document.querySelector("#faults tbody");
  body.replaceChildren();
  for (const fault of state.faults) {
    const row = body.insertRow();
    row.dataset.offset = fault.offset;
    for (const value of [fault.seq, (fault.time_ns / 1e9).toFixed(3) + " s", fault.rule, fault.op, fault.offset, fault.length, fault.outcome, fault.errno || ""]) {
      cell(row, String(value));
    }
  }
}

// ---- the export's state: rules, triggers ---------------------------------------------------
async function refresh() {
  if (state.export === null) return;
  let view;
  try {
    view = await api("GET", `/v1/exports/${segment(state.export.name)}`);
  } catch (error) {
    return status(error.message);
  }
  state.export = view;
  document.getElementById("policy-origin").textContent = view.policy ? view.policy.origin : "none: every request passes";
  const rules = document.querySelector("#rules tbody");
  rules.replaceChildren();
  for (const rule of view.policy ? view.policy.rules : []) {
    const row = rules.insertRow();
    row.dataset.rule = rule.rule;
    cell(row, rule.rule);
    cell(row, String(rule.occurrences), "num occurrences");
    cell(row, String(rule.fired), "num fired");
  }
  const triggers = document.querySelector("#triggers tbody");
  triggers.replaceChildren();
  for (const trigger of view.triggers) {
    const row = triggers.insertRow();
    row.dataset.trigger = trigger.name;
    cell(row, trigger.name);
    cell(row, trigger.armed ? "armed" : "disarmed", trigger.armed ? "armed" : "");
    const button = document.createElement("button");
    button.textContent = trigger.armed ? "disarm" : "arm";
    button.className = trigger.armed ? "disarm" : "arm";
    button.onclick = async () => {
      button.disabled = true;
      try {
        await api(trigger.armed ? "DELETE" : "POST", `/v1/exports/${segment(view.name)}/triggers/${encodeURIComponent(trigger.name)}`);
      } catch (error) {
        status(error.message);
      }
      refresh();
    };
    row.insertCell().append(button);
  }
}

async function start() {
  loadToken();
  document.getElementById("window-s").textContent = WINDOW_NS / 1e9;
  let exports;
  try {
    exports = await api("GET", "/v1/exports");
    const health = await api("GET", "/v1/health");
    document.getElementById("version").textContent = health.version;
  } catch (error) {
    return status(error.message);
  }
  const select = document.getElementById("export");
  for (const view of exports) {
    const option = document.createElement("option");
    option.value = view.name;
    option.textContent = view.name === "" ? "(default)" : view.name;
    select.append(option);
  }
  const wanted = new URLSearchParams(location.search).get("export");
  const first = exports.find((view) => view.name === wanted) || exports[0];
  if (!first) return status("this server has no export");
  select.value = first.name;
  const watch = (view) => {
    state.export = view;
    refresh();
    stream(view.name).catch((error) => { if (error.name !== "AbortError") status(error.message); });
  };
  select.onchange = () => watch(exports.find((view) => view.name === select.value));
  watch(first);
  setInterval(refresh, 1000);
  requestAnimationFrame(frame);
}

// For tests and the curious: where the map draws an offset.
window.nbdfaultPage = {
  state,
  yOf(offset) {
    const canvas = document.getElementById("map");
    return state.hello ? Math.floor((offset / state.hello.size) * canvas.height) : null;
  },
};

start();
