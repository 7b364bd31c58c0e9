// The gate page: chat with the model over the JSON API (replies streamed as server-sent events, read through
// fetch because EventSource cannot POST), and draw the LSTM's gates of every byte fed, for the layer picked.
// Everything it needs comes from the server that served it: no CDN, no build step (docs/GATES.md).

const PANELS = [ // drawn top to bottom; `scale` names a colour scale below
  { kind: "forget", title: "f  forget gate", scale: "gate" },
  { kind: "input", title: "i  input gate", scale: "gate" },
  { kind: "output", title: "o  output gate", scale: "gate" },
  { kind: "candidate", title: "C̃  candidate", scale: "signed" },
  { kind: "cell", title: "C  cell state", scale: "cell" },
];
const KINDS = ["forget", "input", "candidate", "cell", "output", "hidden"]; // a LayerGates message's fields
const COLUMN_PX = 10; // one byte's column: wide enough for its character
const LABEL_PX = 16; // the row of byte labels above the panels
const TITLE_PX = 15; // each panel's title row
const FACT_UNITS = 8;
const MAX_TOKENS = 120;
const CELL_SATURATES_AT = 100; // |C_t| at which the cell state's log colour scale reaches its ends
const TOKEN_KEY = "cellstream-token";
const FACT_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

const $ = (id) => document.getElementById(id);
const encoder = new TextEncoder();

// --- Colour scales: 256-entry RGB tables, fixed (never rescaled to the data) so colours compare across
// bytes, layers and conversations.

function table(stops) {
  const rgb = new Uint8ClampedArray(256 * 3);
  for (let i = 0; i < 256; i++) {
    const at = (i / 255) * (stops.length - 1);
    const lo = Math.min(Math.floor(at), stops.length - 2);
    const w = at - lo;
    for (let c = 0; c < 3; c++) rgb[i * 3 + c] = stops[lo][c] * (1 - w) + stops[lo + 1][c] * w;
  }
  return rgb;
}

const VIRIDIS = table([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]);
const RDBU = table([[33, 102, 172], [103, 169, 207], [247, 247, 247], [239, 138, 98], [178, 24, 43]]);
const LOG_CELL = Math.log10(1 + CELL_SATURATES_AT);

// Each scale maps a value to [0, 1] along its table. Gates are sigmoids in (0, 1); the candidate is a tanh
// in (-1, 1); the cell state is unbounded (tens, even past a hundred, in the shipped model), so its scale is
// logarithmic in |C|, signed, and saturates at CELL_SATURATES_AT.
const SCALES = {
  gate: { rgb: VIRIDIS, at: (v) => v, ticks: [[0, "0"], [0.5, "0.5"], [1, "1"]], name: "f, i, o: gates" },
  signed: { rgb: RDBU, at: (v) => (v + 1) / 2, ticks: [[-1, "−1"], [0, "0"], [1, "1"]], name: "C̃: candidate" },
  cell: {
    rgb: RDBU,
    at: (v) => (Math.sign(v) * Math.log10(1 + Math.abs(v))) / LOG_CELL / 2 + 0.5,
    ticks: [[-100, "−100"], [-10, "−10"], [0, "0"], [10, "10"], [100, "100"]],
    name: "C: cell state (log scale)",
  },
};
const MISSING = [200, 200, 200]; // a step the server sent no gates for

function colour(scale, value, out, offset) {
  if (!Number.isFinite(value)) {
    out.set(MISSING, offset);
    return;
  }
  const i = Math.round(Math.min(1, Math.max(0, scale.at(value))) * 255) * 3;
  out[offset] = scale.rgb[i];
  out[offset + 1] = scale.rgb[i + 1];
  out[offset + 2] = scale.rgb[i + 2];
}

// --- The conversation as the model saw it: one entry per step (token fed), the gates of every step per
// layer, and the messages as ranges of steps.

class Floats {
  constructor() {
    this.data = new Float32Array(4096);
    this.length = 0;
  }

  push(values) {
    if (this.length + values.length > this.data.length) {
      const grown = new Float32Array(Math.max(this.data.length * 2, this.length + values.length));
      grown.set(this.data.subarray(0, this.length));
      this.data = grown;
    }
    this.data.set(values, this.length);
    this.length += values.length;
  }
}

const page = {
  model: null, // the ModelInfo chatted with
  sessionId: "",
  specials: new Map(), // special token id -> name, from the model's metadata
  layer: 0,
  busy: false,
  pickedMessage: null, // the fact view's message index; null: the first user message
};
let talk = newTalk(0);

function newTalk(layers) {
  return {
    ids: [], // the token fed at each step
    roles: [], // "user" or "bot": which message each step belongs to
    columns: 0, // steps whose gates are held (all of them, when the model serves gates)
    gates: Array.from({ length: layers }, () => Object.fromEntries(KINDS.map((k) => [k, new Floats()]))),
    messages: [], // {role, text, start, end, element}: steps [start, end)
  };
}

// --- The API, with the token the page was given (if the server asked for one).

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(new URL(path, document.baseURI), {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.ok) return response;
  let message = `${method} ${path}: HTTP ${response.status}`;
  try {
    message = (await response.json()).error ?? message;
  } catch {
    // Not the API's JSON error (a proxy's page): the status says enough.
  }
  throw new ApiError(message, response.status);
}

// Server-sent events of a streamed reply: yields {name, data} as each event completes.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      let data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      yield { name, data: JSON.parse(data) };
    }
  }
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function failed(error) {
  if (error instanceof ApiError && error.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
    setStatus(`This server needs a token: ${error.message}`, true);
  } else {
    setStatus(error.message, true);
  }
}

// --- Starting: the model, a session, the controls.

async function start() {
  setBusy(true);
  const models = await (await api("GET", "v1/models")).json();
  const chat = models.models.filter((m) => m.input_kind === "tokens");
  const model = chat.find((m) => m.name === models.default_model) ?? chat[0];
  if (!model) throw new Error("this server serves no tokens model to chat with");
  page.model = model;
  page.specials = specialTokens(model);
  page.layer = Math.min(page.layer, model.num_layers - 1);
  const layer = $("layer");
  layer.replaceChildren(...Array.from({ length: model.num_layers }, (_, l) => {
    const where = l === 0 ? " (bottom)" : l === model.num_layers - 1 ? " (top)" : "";
    return new Option(`${l}${where}`, String(l), false, l === page.layer);
  }));
  layer.disabled = false;
  const note = $("gates-note");
  note.hidden = model.gates;
  note.textContent = model.gates ? "" : `Model ${model.name} is served without its glass-box graph, so there are ` +
    `no gates to draw: \`cellstream gates ${model.name}.onnx\` makes one (docs/GATES.md).`;
  await openSession();
  setStatus(`Model ${model.name}: ${model.num_layers} layers × ${model.hidden_size} units` +
    (model.gates ? ", gates on." : ", no gates."));
  setBusy(false);
  $("message").focus();
}

function specialTokens(model) {
  try {
    const named = JSON.parse(model.metadata?.["cellstream.special_tokens"] ?? "{}");
    return new Map(Object.entries(named).map(([name, id]) => [Number(id), name]));
  } catch {
    return new Map(); // a model without the metadata: special tokens are shown by id
  }
}

async function openSession() {
  const session = await (await api("POST", "v1/sessions", { model: page.model.name })).json();
  page.sessionId = session.session_id;
  $("chat").dataset.sessionId = session.session_id;
  page.pickedMessage = null;
  talk = newTalk(page.model.num_layers);
  $("messages").replaceChildren();
  $("fact-message").replaceChildren();
  $("fact-message").disabled = true;
  $("heatmap-scroller").scrollLeft = 0;
  scheduleDraw();
}

function setBusy(busy) {
  page.busy = busy;
  $("messages").dataset.busy = String(busy);
  $("send").disabled = busy;
  $("restart").disabled = busy;
}

// --- A chat turn: the prompt in the format the model was trained on, the reply streamed with its gates.

async function turn(line) {
  const prompt = `user: ${line}\nbot: `;
  const start = talk.ids.length;
  const userEnd = start + encoder.encode(`user: ${line}\n`).length;
  const user = addMessage("user", line, start, userEnd);
  const bot = addMessage("bot", "", userEnd, userEnd);
  const shown = bot.element.querySelector(".text");
  try {
    const response = await api("POST", `v1/sessions/${encodeURIComponent(page.sessionId)}/generate`, {
      prompt,
      stop: ["\n"],
      max_tokens: MAX_TOKENS,
      gates: page.model.gates,
    });
    let fed = [...encoder.encode(prompt)]; // the first chunk's gates begin with the prompt's bytes
    let finished = false;
    for await (const { name, data } of events(response)) {
      if (name === "error") throw new ApiError(data.error, data.status);
      if (fed.length) talk.messages.push(user, bot); // their steps are in the state from now on
      takeSteps([...fed, ...data.tokens], data.gates, [user, bot], userEnd);
      fed = [];
      bot.text += data.text;
      shown.textContent = bot.text.replace(/\n$/, "");
      refreshFactChoices();
      if (Number(data.position) !== talk.ids.length) {
        setStatus(`the session is at step ${data.position} but the page counted ${talk.ids.length}`, true);
      }
      if (name === "done") {
        bot.element.dataset.finish = data.finish_reason;
        finished = true;
      }
      scheduleDraw();
    }
    if (!finished) throw new Error("the reply's stream ended before its last event: the connection was lost");
  } catch (error) {
    bot.element.classList.add("error");
    shown.textContent = `${bot.text}[${error.message}]`;
    throw error;
  } finally {
    bot.element.dataset.done = "true";
  }
}

// A message's list item, and its range of steps (registered in `talk` once the server has fed them).
function addMessage(role, text, start, end) {
  const element = document.createElement("li");
  element.className = role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "bot";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  element.append(who, body);
  $("messages").append(element);
  element.scrollIntoView({ block: "nearest" });
  return { role, text, start, end, element };
}

// Steps fed since the last chunk: their tokens, and their gates (one LayerGates per layer, step-major).
function takeSteps(ids, gates, [user, bot], userEnd) {
  const scroller = $("heatmap-scroller");
  const following = scroller.scrollLeft + scroller.clientWidth >= scroller.scrollWidth - COLUMN_PX;
  for (const id of ids) {
    talk.roles.push(talk.ids.length < userEnd ? "user" : "bot");
    talk.ids.push(id);
  }
  user.end = Math.min(userEnd, talk.ids.length);
  bot.end = Math.max(userEnd, talk.ids.length);
  if (!page.model.gates || ids.length === 0) return;
  const size = ids.length * page.model.hidden_size;
  const complete = gates?.length === page.model.num_layers && gates.every((g) => KINDS.every((k) => g[k]?.length === size));
  if (!complete) setStatus(`the server sent no gates, or not all of them, for ${ids.length} bytes: drawn grey`, true);
  talk.gates.forEach((layer, l) => {
    for (const kind of KINDS) layer[kind].push(complete ? gates[l][kind] : new Float32Array(size).fill(NaN));
  });
  talk.columns = talk.ids.length;
  $("heatmap-spacer").style.width = `${talk.columns * COLUMN_PX}px`;
  if (following) scroller.scrollLeft = scroller.scrollWidth;
}

// --- Drawing, at most once a frame.

let drawPending = false;

function scheduleDraw() {
  if (drawPending) return;
  drawPending = true;
  requestAnimationFrame(() => {
    drawPending = false;
    drawHeatmap();
    drawFact();
  });
}

function rowPx() {
  // About 192 px per panel whatever the layer's width, at most 4 px a unit.
  return Math.min(4, Math.max(1.5, 192 / page.model.hidden_size));
}

function fitCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

const cells = document.createElement("canvas"); // one panel's visible cells, a pixel each, scaled up when drawn

// Only the columns in view are drawn: a conversation of thousands of bytes is wider than a canvas may be.
function drawHeatmap() {
  const canvas = $("heatmap");
  if (!page.model) return;
  const scroller = $("heatmap-scroller");
  const hidden = page.model.hidden_size;
  const rows = hidden * rowPx();
  const width = scroller.clientWidth;
  const context = fitCanvas(canvas, width, LABEL_PX + PANELS.length * (TITLE_PX + rows));
  context.font = "11px ui-monospace, 'DejaVu Sans Mono', monospace";
  context.textAlign = "center";
  context.textBaseline = "middle";
  const first = Math.floor(scroller.scrollLeft / COLUMN_PX);
  const shift = scroller.scrollLeft - first * COLUMN_PX;
  const count = Math.max(0, Math.min(talk.columns - first, Math.ceil(width / COLUMN_PX) + 1));
  for (let c = 0; c < count; c++) {
    const t = first + c;
    const x = c * COLUMN_PX - shift;
    context.fillStyle = talk.roles[t] === "user" ? "#e6f0fb" : "#eef2ef";
    context.fillRect(x, 0, COLUMN_PX, LABEL_PX);
    context.fillStyle = "#1d232b";
    context.fillText(label(t), x + COLUMN_PX / 2, LABEL_PX / 2 + 1);
  }
  const layer = talk.gates[page.layer];
  context.font = "11px system-ui, sans-serif"; // the titles' C̃ needs a font with combining marks
  PANELS.forEach((panel, p) => {
    const top = LABEL_PX + p * (TITLE_PX + rows);
    context.textAlign = "left";
    context.fillStyle = "#5d6875";
    context.fillText(panel.title, 4, top + TITLE_PX / 2 + 1);
    if (count === 0) return;
    cells.width = count;
    cells.height = hidden;
    const cellContext = cells.getContext("2d");
    const image = cellContext.createImageData(count, hidden);
    const values = layer[panel.kind].data;
    for (let c = 0; c < count; c++) {
      for (let k = 0; k < hidden; k++) {
        const pixel = (k * count + c) * 4; // unit k is row k, byte first + c is column c
        colour(SCALES[panel.scale], values[(first + c) * hidden + k], image.data, pixel);
        image.data[pixel + 3] = 255;
      }
    }
    cellContext.putImageData(image, 0, 0);
    context.imageSmoothingEnabled = false;
    context.drawImage(cells, -shift, top + TITLE_PX, count * COLUMN_PX, rows);
  });
  // The geometry and what was drawn, for tests and anyone scripting the page.
  Object.assign(canvas.dataset, { columnPx: COLUMN_PX, rowPx: rowPx(), cellsTop: LABEL_PX + TITLE_PX,
    panelPx: TITLE_PX + rows });
  canvas.dataset.columns = String(talk.columns);
  canvas.dataset.layer = String(page.layer);
  canvas.dataset.drawnFrom = String(first);
  canvas.dataset.drawnTo = String(first + count);
  canvas.dataset.draws = String(Number(canvas.dataset.draws) + 1);
}

// A column's label: the byte's character (a multi-byte character on its first byte), a sign otherwise.
function label(t) {
  const id = talk.ids[t];
  if (id >= 256) return "◆";
  if (id === 10) return "↵";
  if (id === 32) return "␣";
  if (id < 32 || id === 127 || (id >= 0x80 && id < 0xc0)) return "·";
  if (id < 0x80) return String.fromCharCode(id);
  return character(t);
}

function character(t) {
  const length = talk.ids[t] >= 0xf0 ? 4 : talk.ids[t] >= 0xe0 ? 3 : 2;
  return new TextDecoder().decode(Uint8Array.from(talk.ids.slice(t, t + length).filter((id) => id < 256)));
}

function describe(t) {
  const id = talk.ids[t];
  const hex = `0x${id.toString(16).padStart(2, "0")}`;
  if (id >= 256) return `⟨${page.specials.get(id) ?? "special"}⟩ token ${id}`;
  if (id === 10) return `'\\n' ${hex}`;
  if (id >= 0x80 && id < 0xc0) return `${hex} (inside a character)`;
  if (id < 32 || id === 127) return `control ${hex}`;
  return `'${label(t)}' ${hex}`;
}

// --- Hover: the values of the cell under the pointer (a tap on a touch screen).

function hover(event) {
  const tooltip = $("tooltip");
  if (!page.model) return;
  const hidden = page.model.hidden_size;
  const rows = hidden * rowPx();
  const t = Math.floor((event.offsetX + $("heatmap-scroller").scrollLeft) / COLUMN_PX);
  const y = event.offsetY - LABEL_PX;
  const inPanel = y - Math.floor(y / (TITLE_PX + rows)) * (TITLE_PX + rows) - TITLE_PX;
  if (t < 0 || t >= talk.columns || y < 0 || inPanel < 0 || y >= PANELS.length * (TITLE_PX + rows)) {
    tooltip.hidden = true;
    return;
  }
  const k = Math.min(hidden - 1, Math.floor(inPanel / rowPx()));
  const layer = talk.gates[page.layer];
  const v = (kind, digits = 3) => {
    const value = layer[kind].data[t * hidden + k];
    return Number.isFinite(value) ? value.toFixed(Math.abs(value) >= 10 ? 1 : digits) : "–";
  };
  tooltip.textContent = `${describe(t)}  step ${t}  unit ${k}  layer ${page.layer}\n` +
    `f ${v("forget")}  i ${v("input")}  o ${v("output")}\n` +
    `C̃ ${v("candidate")}  C ${v("cell")}  h ${v("hidden")}`;
  tooltip.dataset.step = String(t);
  tooltip.dataset.unit = String(k);
  tooltip.hidden = false;
  const box = $("gates").getBoundingClientRect();
  const left = Math.min(event.clientX - box.left + 12, box.width - tooltip.offsetWidth - 4);
  tooltip.style.left = `${Math.max(4, left)}px`;
  tooltip.style.top = `${event.clientY - box.top + 16}px`;
}

// --- The remembered fact: the units whose C_t moved most over one message (beyond their usual drift),
// traced over the conversation.

function factMessage() {
  const held = talk.messages.filter((m) => m.end <= talk.columns && m.end > m.start);
  if (page.pickedMessage !== null) return talk.messages[page.pickedMessage];
  return held.find((m) => m.role === "user");
}

// Per unit: |C at the message's end − C before its first step| (C before step 0 is the new session's zero),
// less what the unit drifts anyway over that many bytes (its median |C_t − C_{t-1}| outside the message).
// Without the discount, the top units are counters whose C grows by ~1 every byte whatever is said; with it,
// the units that moved for this message, and that the forget gate then holds still, come first.
function factUnits(message) {
  const hidden = page.model.hidden_size;
  const cell = talk.gates[page.layer].cell.data;
  const length = message.end - message.start;
  const changes = Array.from({ length: hidden }, (_, k) => {
    const at = (t) => (t < 0 ? 0 : cell[t * hidden + k]);
    const steps = [];
    for (let t = 0; t < talk.columns; t++) {
      if (t < message.start || t >= message.end) steps.push(Math.abs(at(t) - at(t - 1)));
    }
    const change = Math.abs(at(message.end - 1) - at(message.start - 1));
    return { unit: k, change, score: change - length * median(steps) };
  });
  return changes.filter((c) => Number.isFinite(c.score)).sort((a, b) => b.score - a.score).slice(0, FACT_UNITS);
}

function median(values) {
  if (values.length === 0) return 0;
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

// The fact view's choices, kept in place (a reply's option grows with its text while it streams).
function refreshFactChoices() {
  const select = $("fact-message");
  const choices = talk.messages.filter((m) => m.end > m.start && m.end <= talk.columns);
  const picked = factMessage();
  while (select.options.length < choices.length) select.add(new Option());
  choices.forEach((m, n) => {
    const index = talk.messages.indexOf(m);
    const option = select.options[n];
    option.value = String(index);
    option.text = `${index + 1}. ${m.role === "user" ? "you" : "bot"}: ${(m.text.trim() || "…").slice(0, 40)}`;
    option.selected = m === picked;
  });
  select.disabled = choices.length === 0;
}

function drawFact() {
  const canvas = $("fact-chart");
  const box = { width: $("fact-box").clientWidth, height: $("fact-box").clientHeight };
  const context = fitCanvas(canvas, box.width, box.height);
  const message = page.model?.gates ? factMessage() : undefined;
  const legend = $("fact-legend");
  if (!message || talk.columns === 0) {
    canvas.dataset.units = "";
    legend.replaceChildren();
    return;
  }
  const units = factUnits(message);
  const hidden = page.model.hidden_size;
  const cell = talk.gates[page.layer].cell.data;
  let peak = 1e-6;
  for (const { unit } of units) {
    for (let t = 0; t < talk.columns; t++) peak = Math.max(peak, Math.abs(cell[t * hidden + unit]) || 0);
  }
  const left = 44;
  const plot = { width: box.width - left - 8, top: 8, height: box.height - 28 };
  const x = (t) => left + ((t + 0.5) * plot.width) / talk.columns;
  const y = (v) => plot.top + plot.height / 2 - (v / peak) * (plot.height / 2);
  context.fillStyle = "#fdf3c4"; // the picked message
  context.fillRect(x(message.start - 0.5), plot.top, x(message.end - 0.5) - x(message.start - 0.5), plot.height);
  context.strokeStyle = "#d9dee4"; // where each message of the user begins
  context.lineWidth = 1;
  for (const m of talk.messages.filter((m) => m.role === "user" && m.start < talk.columns)) {
    context.beginPath();
    context.moveTo(x(m.start - 0.5), plot.top);
    context.lineTo(x(m.start - 0.5), plot.top + plot.height);
    context.stroke();
  }
  context.strokeStyle = "#8a949e";
  context.beginPath();
  context.moveTo(left, y(0));
  context.lineTo(left + plot.width, y(0));
  context.stroke();
  context.fillStyle = "#5d6875";
  context.font = "11px system-ui, sans-serif";
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (const v of [peak, 0, -peak]) context.fillText(v ? v.toFixed(Math.abs(v) >= 10 ? 0 : 1) : "0", left - 4, y(v));
  context.textAlign = "center";
  context.fillText(`C_t of layer ${page.layer}, step 0 … ${talk.columns - 1}`, left + plot.width / 2,
    plot.top + plot.height + 12);
  units.forEach(({ unit }, n) => {
    context.strokeStyle = FACT_COLOURS[n];
    context.lineWidth = 1.5;
    context.beginPath();
    for (let t = 0; t < talk.columns; t++) context.lineTo(x(t), y(cell[t * hidden + unit]));
    context.stroke();
  });
  canvas.dataset.units = units.map((u) => u.unit).join(",");
  legend.replaceChildren(...units.map(({ unit, change }, n) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = FACT_COLOURS[n];
    item.append(swatch, `unit ${unit}: ΔC ${change.toFixed(1)}`);
    return item;
  }));
}

// --- Legends of the colour scales, drawn with the same tables as the cells.

function drawLegends() {
  $("legends").replaceChildren(...Object.values(SCALES).map((scale) => {
    const figure = document.createElement("div");
    figure.className = "legend";
    const name = document.createElement("span");
    name.textContent = scale.name;
    const canvas = document.createElement("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `${scale.name}: colours from ${scale.ticks[0][1]} to ${scale.ticks.at(-1)[1]}`);
    const width = 170;
    const margin = 12; // room for the end ticks' labels
    const bar = width - 2 * margin;
    const context = fitCanvas(canvas, width, 26);
    for (let i = 0; i < 256; i++) {
      const [r, g, b] = scale.rgb.subarray(i * 3, i * 3 + 3);
      context.fillStyle = `rgb(${r} ${g} ${b})`;
      context.fillRect(margin + (i / 256) * bar, 0, bar / 256 + 0.5, 10);
    }
    context.fillStyle = "#5d6875";
    context.font = "10px system-ui, sans-serif";
    context.textAlign = "center";
    context.textBaseline = "top";
    for (const [value, text] of scale.ticks) context.fillText(text, margin + scale.at(value) * bar, 13);
    figure.append(name, canvas);
    return figure;
  }));
}

// --- Wiring.

function guarded(action) {
  return (...args) => action(...args).catch(failed);
}

$("chat-form").addEventListener("submit", guarded(async (event) => {
  event.preventDefault();
  const input = $("message");
  const line = input.value.trim();
  if (!line || page.busy || !page.sessionId) return;
  input.value = "";
  setBusy(true);
  try {
    await turn(line);
  } finally {
    setBusy(false);
    input.focus();
  }
}));

$("restart").addEventListener("click", guarded(async () => {
  setBusy(true);
  try {
    const old = page.sessionId;
    page.sessionId = "";
    await openSession();
    // The old conversation's state is freed; a session that expired meanwhile is no loss.
    await api("DELETE", `v1/sessions/${encodeURIComponent(old)}`).catch(() => {});
  } finally {
    setBusy(false);
  }
}));

$("token-form").addEventListener("submit", guarded(async (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("token-form").hidden = true;
  if (page.sessionId) {
    setStatus("Token set: send your message again.");
  } else {
    await start();
  }
}));

$("layer").addEventListener("change", (event) => {
  page.layer = Number(event.target.value);
  scheduleDraw();
});

$("fact-message").addEventListener("change", (event) => {
  page.pickedMessage = Number(event.target.value);
  scheduleDraw();
});

$("heatmap-scroller").addEventListener("scroll", scheduleDraw, { passive: true });
$("heatmap").addEventListener("pointermove", hover);
$("heatmap").addEventListener("pointerdown", hover);
$("heatmap").addEventListener("pointerleave", (event) => {
  // A finger leaves the screen after every tap: its tooltip stays until the next tap.
  if (event.pointerType !== "touch") $("tooltip").hidden = true;
});
const resized = new ResizeObserver(scheduleDraw);
resized.observe($("heatmap-scroller"));
resized.observe($("fact-box"));

drawLegends();
guarded(start)();
