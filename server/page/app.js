// nbdfault's live page: reads the control API (the same endpoints and token as every client)
// and draws what the server does. Events arrive over fetch-based Server-Sent Events (fetch, not
// EventSource, so the bearer token goes in a header); they are queued and drawn once per animation
// frame into a canvas, and every buffer is bounded, so fio at full speed cannot freeze the tab.
"use strict";

const MAX_MARKS = 20000;         // answered requests kept for drawing
const MAX_ALERTS = 5000;         // failed, stalled and delayed ones, kept apart so a flood cannot push them out
const MAX_QUEUE = 50000;         // events waiting for the next frame; beyond, the oldest go
const MAX_FAULTS = 20;           // rows of the fault table
const COLORS = { read: "#4ea1ff", write: "#3fcf6f", other: "#9aa5b1", failed: "#ff2020", pending: "#ffb020" };
// The disk map's plot inside the canvas, in CSS pixels: room for offset labels left, time below.
const MARGIN = { left: 74, right: 10, top: 8, bottom: 24 };
// Smallest marks, in CSS pixels: a 4 KiB write on a 1 TiB disk is still seen; failed ones larger.
const SIZE = { ok: 6, pending: 10, failed: 12 };

const state = {
  token: null,
  export: null,         // the export's view (GET /v1/exports/{name})
  hello: null,          // the stream's first event
  clockAt: 0,           // performance.now() when hello came
  windowNs: 30e9,       // the map shows this much time
  paused: null,         // the server time the map stands still at, or null: live
  view: null,           // the offsets shown: [from, to), or null: the whole export
  mouse: null,          // {x, y} over the canvas, CSS pixels
  drag: null,           // {y0, y1} while a range of offsets is being selected
  pinned: null,         // the mark whose request stays shown
  drawn: { offsets: [], times: [] },  // the axis labels last drawn, for tests and the curious
  marks: [],            // answered requests: {start, end, offset, length, op, failed, pending, ...}
  alerts: [],           // failed and held requests, the same shape
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
  Object.assign(state, { marks: [], alerts: [], bins: [], queue: [], faults: [], hello: null, view: null, pinned: null, paused: null });
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

function addMark(list, mark, limit) {
  list.push(mark);
  if (list.length > limit) list.splice(0, list.length - limit);
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
      const done = { end: data.end_ns, pending: false, failed, reply: data.reply, errno: data.errno, rule: data.rule, outcome: data.outcome, flags: data.flags };
      const waiting = state.pending.get(key);
      if (waiting) {
        state.pending.delete(key);
        Object.assign(waiting, done);
      } else {
        const mark = Object.assign({ start: data.start_ns, offset: data.offset, length: data.length, op: data.op, connection: data.connection, cookie: data.cookie }, done);
        if (failed) addMark(state.alerts, mark, MAX_ALERTS);
        else addMark(state.marks, mark, MAX_MARKS);
      }
      stat(data.op, 1, failed ? 0 : data.length, failed ? 1 : 0, data.end_ns - data.start_ns);
      break;
    }
    case "pending": {
      const mark = {
        start: data.start_ns, end: null, offset: data.offset, length: data.length, op: data.op, connection: data.connection,
        cookie: data.cookie, failed: false, pending: true, rule: data.rule, until: data.until, delayNs: data.delay_ns,
      };
      state.pending.set(`${data.connection}:${data.cookie}:${data.offset}`, mark);
      if (state.pending.size > MAX_ALERTS) state.pending.delete(state.pending.keys().next().value);
      addMark(state.alerts, mark, MAX_ALERTS);
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
  drawStats();
  requestAnimationFrame(frame);
}

// ---- the disk map's scales and axes --------------------------------------------------------
const UNITS = [["TiB", 2 ** 40], ["GiB", 2 ** 30], ["MiB", 2 ** 20], ["KiB", 2 ** 10]];

/// An offset or length the way a storage engineer says it: "256 MiB", "1.5 GiB", "4 KiB", "512 B".
function bytes(n) {
  if (n === 0) return "0";
  for (const [name, unit] of UNITS) if (n >= unit && n % unit === 0) return `${n / unit} ${name}`;
  for (const [name, unit] of UNITS) if (n >= unit) return `${+(n / unit).toFixed(2)} ${name}`;
  return `${n} B`;
}

/// Offsets to label between `from` and `to`: multiples of a power of two, one per `pixels / 40`.
function offsetTicks(from, to, pixels) {
  const most = Math.max(2, Math.floor(pixels / 40));
  let step = 512;
  while ((to - from) / step > most) step *= 2;
  const ticks = [];
  for (let offset = Math.ceil(from / step) * step; offset <= to; offset += step) ticks.push(offset);
  return ticks;
}

const TIME_STEPS_S = [0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600];

/// Server times (ns) to label between `from` and `to`: round seconds, one per `pixels / 80`.
function timeTicks(from, to, pixels) {
  const most = Math.max(2, Math.floor(pixels / 80));
  const step = (TIME_STEPS_S.find((s) => (to - from) / (s * 1e9) <= most) || 3600) * 1e9;
  const ticks = [];
  // None before the server started.
  for (let t = Math.max(0, Math.ceil(from / step) * step); t <= to; t += step) ticks.push(t);
  return ticks;
}

function seconds(ns) {
  const s = ns / 1e9;
  return (Number.isInteger(+s.toFixed(1)) ? s.toFixed(0) : s.toFixed(1)) + " s";
}

/// Where things are on the canvas now: plot rectangle, time and offset scales.
function geometry() {
  const canvas = document.getElementById("map");
  const width = canvas.clientWidth, height = canvas.clientHeight;
  const plot = { left: MARGIN.left, top: MARGIN.top, right: width - MARGIN.right, bottom: height - MARGIN.bottom };
  const size = (state.hello && state.hello.size) || 1;
  const [from, to] = state.view || [0, size];
  const right = state.paused ?? now(), left = right - state.windowNs;
  const x = (t) => plot.left + ((t - left) / state.windowNs) * (plot.right - plot.left);
  const y = (offset) => plot.top + ((offset - from) / (to - from)) * (plot.bottom - plot.top);
  const offsetAt = (py) => from + ((py - plot.top) / (plot.bottom - plot.top)) * (to - from);
  return { canvas, width, height, plot, size, from, to, left, right, x, y, offsetAt };
}

/// A mark's rectangle (CSS pixels), at least SIZE for its kind, or null when out of view.
function rect(g, mark) {
  const kind = mark.failed ? "failed" : mark.pending ? "pending" : "ok";
  const end = mark.end ?? g.right;
  if (end < g.left || mark.start > g.right) return null;
  if (mark.offset + (mark.length || 1) < g.from || mark.offset >= g.to) return null;
  const min = SIZE[kind];
  let x0 = g.x(mark.start), x1 = g.x(end), y0 = g.y(mark.offset), y1 = g.y(mark.offset + (mark.length || 1));
  // Too small to see: grown around its time, down from its offset, and kept inside the plot.
  if (x1 - x0 < min) { const c = (x0 + x1) / 2; x0 = c - min / 2; x1 = c + min / 2; }
  if (y1 - y0 < min) y1 = y0 + min;
  const shiftX = Math.min(0, g.plot.right - x1), shiftY = Math.min(0, g.plot.bottom - y1);
  return { kind, x: x0 + shiftX, y: Math.max(g.plot.top, y0 + shiftY), w: x1 - x0, h: y1 - y0 };
}

/// The mark under the pointer: failed first, then held, then the newest answered one.
function hit(g, px, py) {
  if (px < g.plot.left || px > g.plot.right || py < g.plot.top || py > g.plot.bottom) return null;
  const near = (r) => r && px >= r.x - 2 && px <= r.x + r.w + 2 && py >= r.y - 2 && py <= r.y + r.h + 2;
  for (const wanted of ["failed", "pending"]) {
    for (let i = state.alerts.length - 1; i >= 0; i--) {
      const mark = state.alerts[i], r = rect(g, mark);
      if (r && r.kind === wanted && near(r)) return mark;
    }
  }
  for (const list of [state.alerts, state.marks]) {
    for (let i = list.length - 1; i >= 0; i--) if (near(rect(g, list[i]))) return list[i];
  }
  return null;
}

function draw() {
  const g = geometry();
  const { canvas, width, height, plot } = g;
  const ratio = window.devicePixelRatio || 1;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.fillStyle = "#10161d";
  context.fillRect(0, 0, width, height);
  if (!state.hello) return;
  drawAxes(context, g);
  context.save();
  context.beginPath();
  context.rect(plot.left, plot.top, plot.right - plot.left, plot.bottom - plot.top);
  context.clip();
  for (const bin of state.bins) {
    if (bin.end < g.left) continue;
    const from = bin.bin * state.hello.bin_bytes, to = from + state.hello.bin_bytes;
    if (to < g.from || from > g.to) continue;
    context.globalAlpha = Math.min(1, 0.15 + bin.count / 50);
    context.fillStyle = COLORS[bin.op] || COLORS.other;
    context.fillRect(g.x(bin.start), g.y(from), Math.max(2, g.x(bin.end) - g.x(bin.start)), Math.max(2, g.y(to) - g.y(from)));
  }
  context.globalAlpha = 1;
  for (const mark of state.marks) {
    const r = rect(g, mark);
    if (!r) continue;
    context.fillStyle = COLORS[mark.op] || COLORS.other;
    context.fillRect(r.x, r.y, r.w, r.h);
  }
  // Held, then failed requests last: on top, larger, outlined so they stand out of a crowd.
  for (const pass of ["ok", "pending", "failed"]) {
    for (const mark of state.alerts) {
      const r = rect(g, mark);
      if (!r || r.kind !== pass) continue;
      context.fillStyle = pass === "ok" ? (COLORS[mark.op] || COLORS.other) : COLORS[pass];
      context.fillRect(r.x, r.y, r.w, r.h);
      if (pass !== "ok") {
        context.strokeStyle = "#10161d";
        context.lineWidth = 1.5;
        context.strokeRect(r.x, r.y, r.w, r.h);
      }
    }
  }
  const shown = state.pinned || (state.mouse && !state.drag ? hit(g, state.mouse.x, state.mouse.y) : null);
  const r = shown && rect(g, shown);
  if (r) {
    context.strokeStyle = "#ffffff";
    context.lineWidth = 2;
    context.strokeRect(r.x - 2, r.y - 2, r.w + 4, r.h + 4);
  }
  if (state.drag) {
    const top = Math.min(state.drag.y0, state.drag.y1), bottom = Math.max(state.drag.y0, state.drag.y1);
    context.fillStyle = "rgba(255,255,255,0.15)";
    context.fillRect(plot.left, top, plot.right - plot.left, bottom - top);
  }
  context.restore();
  drawDetail(shown, r);
}

function drawAxes(context, g) {
  const { plot } = g;
  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
  context.fillStyle = "#c6ccd2";
  context.strokeStyle = "rgba(198,204,210,0.12)";
  context.textAlign = "right";
  context.textBaseline = "middle";
  const offsets = offsetTicks(g.from, g.to, plot.bottom - plot.top);
  state.drawn.offsets = offsets.map(bytes);
  for (const offset of offsets) {
    const py = Math.round(g.y(offset)) + 0.5;
    context.beginPath();
    context.moveTo(plot.left - 4, py);
    context.lineTo(plot.right, py);
    context.stroke();
    context.fillText(bytes(offset), plot.left - 7, Math.min(Math.max(py, plot.top + 5), plot.bottom - 5));
  }
  context.textAlign = "center";
  context.textBaseline = "top";
  const times = timeTicks(g.left, g.right, plot.right - plot.left);
  state.drawn.times = times.map(seconds);
  for (const t of times) {
    const px = Math.round(g.x(t)) + 0.5;
    context.beginPath();
    context.moveTo(px, plot.top);
    context.lineTo(px, plot.bottom + 4);
    context.stroke();
    context.fillText(seconds(t), px, plot.bottom + 7);
  }
  context.strokeStyle = "rgba(198,204,210,0.5)";
  context.strokeRect(plot.left + 0.5, plot.top + 0.5, plot.right - plot.left - 1, plot.bottom - plot.top - 1);
}

// ---- a mark's request, shown when pointed at or pinned -----------------------------------------
let detailShown = "";

/// A position in the largest unit it reaches, to two decimals: "444.94 MiB", not "455620 KiB"
/// (the exact bytes are on the next line).
function position(n) {
  for (const [name, unit] of UNITS) if (n >= unit) return `${+(n / unit).toFixed(2)} ${name}`;
  return bytes(n);
}

function describeMark(mark) {
  const lines = [[`${mark.op} ${bytes(mark.length || 0)} at ${position(mark.offset)}`, ""], [`offset ${mark.offset}, length ${mark.length}`, ""]];
  if (mark.pending) {
    const held = mark.until ? `stalled until trigger ${mark.until}` : `delayed ${(mark.delayNs / 1e6).toFixed(1)} ms`;
    lines.push([`pending: ${held}`, "bad"]);
  } else {
    const reply = mark.reply === "ok" ? "ok" : `${mark.reply}${mark.errno ? " " + mark.errno : ""}`;
    lines.push([`reply ${reply}, ${((mark.end - mark.start) / 1e6).toFixed(3)} ms`, mark.failed ? "bad" : ""]);
  }
  if (mark.rule) lines.push([`rule ${mark.rule}${mark.outcome ? ", outcome " + mark.outcome : ""}`, ""]);
  if (mark.flags && mark.flags.length) lines.push([`flags ${mark.flags.join(" ")}`, ""]);
  lines.push([`started ${seconds(mark.start)}, connection ${mark.connection}, cookie ${mark.cookie}`, ""]);
  return lines;
}

function drawDetail(mark, r) {
  const box = document.getElementById("detail");
  if (!mark || !r) {
    box.hidden = true;
    detailShown = "";
    return;
  }
  const lines = describeMark(mark);
  const text = lines.map(([line]) => line).join("\n") + (mark === state.pinned ? "\npinned" : "");
  if (text !== detailShown) {
    detailShown = text;
    box.replaceChildren(...lines.map(([line, className]) => {
      const div = document.createElement("div");
      div.textContent = line;
      if (className) div.className = className;
      return div;
    }));
    box.classList.toggle("pinned", mark === state.pinned);
  }
  box.hidden = false;
  const canvas = document.getElementById("map");
  const left = r.x + r.w + 12 + box.offsetWidth > canvas.clientWidth ? r.x - 12 - box.offsetWidth : r.x + r.w + 12;
  box.style.left = Math.max(0, left) + "px";
  box.style.top = Math.max(0, Math.min(r.y - 8, canvas.clientHeight - box.offsetHeight)) + "px";
}

// ---- pointing, pinning, zooming ------------------------------------------------------------
function setView(view) {
  const size = (state.hello && state.hello.size) || 1;
  state.view = view && view[1] - view[0] < size ? view : null;
  const whole = document.getElementById("whole");
  whole.hidden = state.view === null;
  document.getElementById("range").textContent = state.view ? `offsets ${bytes(state.view[0])} to ${bytes(state.view[1])}` : "";
}

function controls() {
  const canvas = document.getElementById("map");
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return { x: event.clientX - box.left, y: event.clientY - box.top };
  };
  canvas.addEventListener("mousemove", (event) => {
    state.mouse = point(event);
    if (state.drag) state.drag.y1 = state.mouse.y;
  });
  canvas.addEventListener("mouseleave", () => { state.mouse = null; state.drag = null; });
  canvas.addEventListener("mousedown", (event) => {
    const at = point(event);
    state.drag = { y0: at.y, y1: at.y };
  });
  canvas.addEventListener("mouseup", (event) => {
    const at = point(event), drag = state.drag;
    state.drag = null;
    if (!drag || !state.hello) return;
    const g = geometry();
    if (Math.abs(at.y - drag.y0) > 5) {
      const clamp = (py) => Math.min(Math.max(py, g.plot.top), g.plot.bottom);
      const a = g.offsetAt(clamp(drag.y0)), b = g.offsetAt(clamp(at.y));
      // Outward to a power of two near a 32nd of the range: ends a person can read.
      let granule = 512;
      while (granule * 64 <= Math.abs(b - a)) granule *= 2;
      const from = Math.max(0, Math.floor(Math.min(a, b) / granule) * granule);
      const to = Math.min(g.size, Math.max(from + 4096, Math.ceil(Math.max(a, b) / granule) * granule));
      setView([from, to]);
    } else {
      const mark = hit(g, at.x, at.y);
      state.pinned = mark && mark !== state.pinned ? mark : null;
    }
  });
  canvas.addEventListener("dblclick", () => { setView(null); state.pinned = null; });
  document.getElementById("whole").onclick = () => setView(null);
  const windowSelect = document.getElementById("window");
  windowSelect.onchange = () => { state.windowNs = Number(windowSelect.value) * 1e9; };
  const pause = document.getElementById("pause");
  pause.onclick = () => {
    state.paused = state.paused === null ? now() : null;
    pause.textContent = state.paused === null ? "pause" : "resume";
  };
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
    const time = (fault.time_ns / 1e9).toFixed(3) + " s";
    // A power record (a cut through the API, a power-on) has an event and no request.
    const values = fault.event === undefined
      ? [fault.seq, time, fault.rule, fault.op, fault.offset, fault.length, fault.outcome, fault.errno || ""]
      : [fault.seq, time, fault.origin.replace("_", " "), fault.event.replace("_", " "), "", "", fault.event,
         fault.cut ? `${fault.cut.undone_writes} writes undone` : ""];
    if (fault.event === undefined) row.dataset.offset = fault.offset;
    for (const value of values) cell(row, String(value));
  }
}

// ---- the export's state: rules, triggers ---------------------------------------------------
let tablesShown = "";

async function refresh() {
  if (state.export === null) return;
  let view;
  try {
    view = await api("GET", `/v1/exports/${segment(state.export.name)}`);
  } catch (error) {
    return status(error.message);
  }
  state.export = view;
  // Rebuilt only when something changed: a button under the pointer stays the same button.
  const shown = JSON.stringify([view.name, view.policy && [view.policy.origin, view.policy.rules], view.triggers]);
  if (shown === tablesShown) return;
  tablesShown = shown;
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
  controls();
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

// For tests and the curious: where the map draws things, and the axis labels it drew.
window.nbdfaultPage = {
  state,
  /// The canvas row (device pixels, for getImageData) where `offset` is drawn.
  yOf(offset) {
    return state.hello ? Math.floor(geometry().y(offset) * (window.devicePixelRatio || 1)) : null;
  },
  /// The middle of the newest mark at `offset` (CSS pixels from the canvas' corner), or null.
  pointOf(offset) {
    if (!state.hello) return null;
    const g = geometry();
    for (const list of [state.alerts, state.marks]) {
      for (let i = list.length - 1; i >= 0; i--) {
        const r = list[i].offset === offset && rect(g, list[i]);
        if (r) return { x: r.x + r.w / 2, y: r.y + r.h / 2 };
      }
    }
    return null;
  },
  labels() {
    return state.drawn;
  },
};

start();
