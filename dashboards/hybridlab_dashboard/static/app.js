"use strict";
// hybridlab's study views: plain DOM and inline SVG, fed by /hl/api/* and refreshed by polling.

// Often enough to follow a running search; each poll is a few short read-only queries.
const REFRESH_MS = 3000;
const SVG_NS = "http://www.w3.org/2000/svg";
// Layer types come from hybridlab's registry in each study's JSON (`layer_types`: type, symbol,
// label, colour, mixer), so a new type is drawn without touching this file.
function layerType(type) { return view.data.layer_types.find((t) => t.type === type); }
function typeColor(type) { return layerType(type)?.colour || "#444"; }
function typeName(type) { const t = layerType(type); return t ? `${t.label} (${t.symbol})` : type; }
const COMPARED_BY_DEFAULT = 3;
const TRIAL_COLORS = ["#dc2626", "#2563eb", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
// Properties of a trial's layer stack plotted against quality; metrics come from hybridlab's
// registry in each study's JSON (`metrics`: name -> kind, direction, unit, label, log_scale).
const STRUCTURE_AXES = {
  attention_fraction: { label: "attention share of mixer layers", log: false, format: percent },
  depth: { label: "depth (layers)", log: false, format: String, integer: true },
};
// How a value of each registry unit is written; other units are plain numbers.
const UNIT_FORMATS = { bytes, count, FLOPs: count, "tokens/s": count };

const view = {
  study: new URLSearchParams(location.search).get("study"),
  data: null,
  revision: null,
  quality: null,
  selected: new Set(),
  // Until the user picks trials, the comparison follows the study's best trials as they change.
  picked: false,
  curvesKey: null,
  promotion: null,
  calibration: null,
  timer: null,
};

function build(node, attrs, children) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}
const h = (tag, attrs = {}, ...children) => build(document.createElement(tag), attrs, children);
const s = (tag, attrs = {}, ...children) => build(document.createElementNS(SVG_NS, tag), attrs, children);

// Sizes as hybridlab writes them everywhere (units.js, with the rule the study's JSON carries).
function count(n) { return n === null || n === undefined ? "–" : formatScaled(n, view.data.units.count); }
function bytes(n) { return n === null || n === undefined ? "–" : formatScaled(n, view.data.units.bytes); }
function metricFormat(name) {
  return UNIT_FORMATS[view.data.metrics[name]?.unit] || num;
}
// Objectives may be costs (state bytes, parameters): those read better in their own units.
function formatMetric(name, value) {
  return metricFormat(name)(value ?? null);
}
function costMetrics() {
  return Object.entries(view.data.metrics).filter(([, m]) => m.kind === "cost").map(([name, m]) => ({ name, ...m }));
}
function axisOf(key) {
  const metric = view.data.metrics[key];
  if (!metric) return STRUCTURE_AXES[key];
  return { label: metric.label, log: metric.log_scale, base2: metric.unit === "bytes", format: metricFormat(key) };
}
function percent(x) { return x === null || x === undefined ? "–" : `${Math.round(100 * x)}%`; }
function num(x) {
  if (x === null || x === undefined) return "–";
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(3);
  let text = x.toPrecision(4);
  if (text.includes(".")) text = text.replace(/0+$/, "").replace(/\.$/, "");
  return text;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function stripScale(trials) {
  let width = 1;
  let state = 1;
  for (const t of trials) {
    for (const layer of t.layers) {
      width = Math.max(width, layer.width || 0);
      state = Math.max(state, layer.state_bytes || 0);
    }
  }
  return { width, state };
}

function describeLayer(layer, i) {
  const spec = Object.entries(layer.spec || {})
    .filter(([key]) => key !== "type")
    .map(([key, value]) => `${key}=${value}`)
    .join(" ");
  const sizes = layer.width ? `, width ${layer.width}, state ${bytes(layer.state_bytes)}, ${count(layer.params)} params` : "";
  return `layer ${i}: ${typeName(layer.type)}${sizes}${spec ? `\n${spec}` : ""}`;
}

// One cell per layer: colour is the type, width the layer's inner width, height its decoding
// state (log scale), both relative to the largest in the study so strips compare at a glance.
function strip(trial, scale, { height = 16, unit = 14 } = {}) {
  const cells = [];
  let x = 0;
  trial.layers.forEach((layer, i) => {
    const w = layer.width ? Math.max(3, Math.round(unit * (0.35 + 0.65 * layer.width / scale.width))) : unit;
    const frac = layer.state_bytes ? 0.35 + 0.65 * Math.log1p(layer.state_bytes) / Math.log1p(scale.state) : 0.2;
    const cellHeight = Math.max(2, Math.round(height * frac));
    cells.push(s("rect", {
      class: "cell", "data-type": layer.type, x, y: height - cellHeight, width: w, height: cellHeight,
      fill: typeColor(layer.type),
    }, s("title", {}, describeLayer(layer, i))));
    x += w + 1;
  });
  const width = Math.max(x - 1, 1);
  return s("svg", { class: "strip", "data-trial": trial.number, width, height, viewBox: `0 0 ${width} ${height}` }, cells);
}

function dominantType(trial) {
  const mixers = trial.layers.filter((l) => layerType(l.type)?.mixer);
  const tally = {};
  for (const l of mixers.length ? mixers : trial.layers) tally[l.type] = (tally[l.type] || 0) + 1;
  return Object.entries(tally).sort((a, b) => b[1] - a[1])[0]?.[0];
}

function niceStep(raw) {
  const power = 10 ** Math.floor(Math.log10(raw));
  const m = raw / power;
  return power * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
}
function linearTicks(lo, hi, integer) {
  let step = niceStep((hi - lo) / 5);
  if (integer) step = Math.max(1, Math.round(step));
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(+v.toPrecision(12));
  return ticks;
}
// lo and hi are log10 of the domain; byte axes tick at powers of two, others at 1, 2, 5 x 10^k.
function logTicks(lo, hi, base2) {
  if (base2) {
    const [first, last] = [Math.ceil(lo / Math.log10(2)), Math.floor(hi / Math.log10(2))];
    const stride = Math.max(1, Math.ceil((last - first + 1) / 6));
    const ticks = [];
    for (let k = first; k <= last; k += stride) ticks.push(2 ** k);
    if (ticks.length >= 2) return ticks;
  }
  const ticks = [];
  for (let e = Math.floor(lo); e <= Math.ceil(hi); e += 1) {
    for (const m of [1, 2, 5]) {
      const v = m * 10 ** e;
      if (Math.log10(v) >= lo && Math.log10(v) <= hi) ticks.push(v);
    }
  }
  if (ticks.length > 7) return ticks.filter((v) => Number.isInteger(Math.log10(v)));
  return ticks.length >= 2 ? ticks : linearTicks(10 ** lo, 10 ** hi, false);
}

function scale(values, range, { log = false, base2 = false, integer = false } = {}) {
  const t = log ? values.map(Math.log10) : values;
  let lo = Math.min(...t);
  let hi = Math.max(...t);
  if (hi - lo < 1e-12) { lo -= log ? 0.3 : 0.5; hi += log ? 0.3 : 0.5; }
  const pad = (hi - lo) * 0.08;
  lo -= pad;
  hi += pad;
  const f = (v) => range[0] + ((log ? Math.log10(v) : v) - lo) / (hi - lo) * (range[1] - range[0]);
  f.ticks = () => (log ? logTicks(lo, hi, base2) : linearTicks(lo, hi, integer));
  return f;
}

const FRAME = { width: 380, height: 250, left: 60, right: 14, top: 26, bottom: 40 };
// Proxy vs promoted: wider, with a second title line for the rank correlation and room on the
// right for the baselines' labels.
const PROMOTION_FRAME = { ...FRAME, width: 560, height: 300, top: 42, right: 100 };

function frame(title, xLabel, yLabel, xs, ys, xFormat, yFormat, f = FRAME) {
  const svg = s("svg", { class: "chart", width: f.width, height: f.height, viewBox: `0 0 ${f.width} ${f.height}` });
  svg.append(s("text", { class: "title", x: f.left, y: 16 }, title));
  for (const v of xs.ticks()) {
    svg.append(s("g", { class: "tick" },
      s("line", { x1: xs(v), x2: xs(v), y1: f.top, y2: f.height - f.bottom }),
      s("text", { x: xs(v), y: f.height - f.bottom + 14, "text-anchor": "middle" }, xFormat(v))));
  }
  for (const v of ys.ticks()) {
    svg.append(s("g", { class: "tick" },
      s("line", { x1: f.left, x2: f.width - f.right, y1: ys(v), y2: ys(v) }),
      s("text", { x: f.left - 6, y: ys(v) + 3, "text-anchor": "end" }, yFormat(v))));
  }
  svg.append(s("rect", { class: "frame", x: f.left, y: f.top, width: f.width - f.left - f.right, height: f.height - f.top - f.bottom }));
  svg.append(s("text", { class: "axis-label", x: (f.left + f.width - f.right) / 2, y: f.height - 6, "text-anchor": "middle" }, xLabel));
  svg.append(s("text", {
    class: "axis-label", x: 12, y: (f.top + f.height - f.bottom) / 2, "text-anchor": "middle",
    transform: `rotate(-90 12 ${(f.top + f.height - f.bottom) / 2})`,
  }, yLabel));
  return svg;
}

function emptyChart(title, message, f = FRAME) {
  return s("svg", { class: "chart", width: f.width, height: f.height, viewBox: `0 0 ${f.width} ${f.height}` },
    s("text", { class: "title", x: f.left, y: 16 }, title),
    s("text", { class: "empty", x: f.width / 2, y: f.height / 2, "text-anchor": "middle" }, message));
}

// The 2-D front as a staircase: the boundary of the region its points dominate. Between two
// neighbours (by x) the corner sits at the later x when smaller x is better, else at the earlier.
function frontPath(points, xs, ys, xMinimize) {
  const sorted = [...points].sort((a, b) => a.x - b.x);
  let d = `M${xs(sorted[0].x)},${ys(sorted[0].y)}`;
  for (let i = 1; i < sorted.length; i += 1) {
    const [p, q] = [sorted[i - 1], sorted[i]];
    d += xMinimize ? ` H${xs(q.x)} V${ys(q.y)}` : ` V${ys(q.y)} H${xs(q.x)}`;
  }
  return d;
}

function scatter({ id, title, axisKey, points, front, xMinimize, quality }) {
  const axis = axisOf(axisKey);
  const yLabel = `${quality.metric} (${quality.direction === "maximize" ? "higher" : "lower"} is better)`;
  if (!points.length) return emptyChart(title, "no finished trials yet");
  const f = FRAME;
  const xs = scale(points.map((p) => p.x), [f.left, f.width - f.right], axis);
  const ys = scale(points.map((p) => p.y), [f.height - f.bottom, f.top]);
  const svg = frame(title, axis.label, yLabel, xs, ys, axis.format, num);
  svg.id = id;
  const onFront = points.filter((p) => front.has(p.trial.number));
  if (onFront.length > 1) svg.append(s("path", { class: "front-line", d: frontPath(onFront, xs, ys, xMinimize) }));
  // Front points last, so they sit on top of the rest.
  const ordered = [...points].sort((a, b) => front.has(a.trial.number) - front.has(b.trial.number));
  for (const p of ordered) {
    const n = p.trial.number;
    const classes = ["pt", front.has(n) && "front", view.selected.has(n) && "selected"].filter(Boolean).join(" ");
    svg.append(s("circle", {
      class: classes, "data-trial": n, cx: xs(p.x), cy: ys(p.y), r: front.has(n) ? 6 : 4.5,
      fill: dominantType(p.trial) ? typeColor(dominantType(p.trial)) : "#6b7280",
      onmouseenter: (event) => showTooltip(event, p.trial),
      onmousemove: moveTooltip,
      onmouseleave: hideTooltip,
      onclick: () => toggle(n),
    }));
  }
  return svg;
}

function qualityOf(trial) {
  const value = trial.metrics[view.quality.metric];
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

function plotted(axisKey) {
  return view.data.trials
    .filter((t) => t.state === "complete" && qualityOf(t) !== null)
    .filter((t) => typeof t[axisKey] === "number" && (!axisOf(axisKey).log || t[axisKey] > 0))
    .map((t) => ({ trial: t, x: t[axisKey], y: qualityOf(t) }));
}

function renderFronts() {
  const box = document.getElementById("fronts");
  const fronts = view.data.fronts[view.quality.metric] || {};
  box.replaceChildren(...Object.entries(view.data.cost_axes).map(([axisKey, direction]) => scatter({
    id: `pareto-${axisKey}`,
    title: `${view.quality.metric} vs ${axisOf(axisKey).label.replace(/ \(.*\)$/, "")}`,
    axisKey,
    points: plotted(axisKey),
    front: new Set(fronts[axisKey] || []),
    xMinimize: direction === "minimize",
    quality: view.quality,
  })));
}

function renderStructure() {
  const box = document.getElementById("structure");
  box.replaceChildren(...Object.keys(STRUCTURE_AXES).map((axisKey) => scatter({
    id: `structure-${axisKey}`,
    title: `${view.quality.metric} vs ${axisOf(axisKey).label}`,
    axisKey,
    points: plotted(axisKey),
    front: new Set(),
    xMinimize: true,
    quality: view.quality,
  })));
}

function betterText(direction) {
  return { maximize: "higher is better", minimize: "lower is better" }[direction] || "direction unknown";
}

// A promotion rung: x the candidate's value at proxy scale, y the same metric after promotion.
// Baselines have no proxy value, so they are horizontal lines at their promoted value.
function promotionChart(rung) {
  const f = PROMOTION_FRAME;
  const format = metricFormat(rung.metric);
  const points = rung.runs.filter((r) => r.role === "candidate" && r.trained && r.proxy_value !== null);
  const baselines = rung.runs.filter((r) => r.role !== "candidate" && r.trained);
  let svg;
  if (!points.length) {
    svg = emptyChart(rung.heading, "no promoted candidate trained yet", f);
  } else {
    const xs = scale(points.map((r) => r.proxy_value), [f.left, f.width - f.right]);
    const ys = scale([...points, ...baselines].map((r) => r.value), [f.height - f.bottom, f.top]);
    svg = frame(rung.heading, `${rung.metric} at proxy scale`,
      `${rung.metric} promoted (${betterText(rung.direction)})`, xs, ys, format, format, f);
    for (const b of baselines) {
      const y = ys(b.value);
      svg.append(s("g", { class: `baseline ${b.role}`, "data-role": b.role },
        s("line", { x1: f.left, x2: f.width - f.right, y1: y, y2: y }),
        s("text", { x: f.width - f.right + 4, y: y + 3 }, `${b.role} ${format(b.value)}`),
        s("title", {}, `${b.role} baseline (${b.pattern}, ${count(b.params)} params): ${format(b.value)}`)));
    }
    for (const r of points) {
      const [x, y] = [xs(r.proxy_value), ys(r.value)];
      const winner = r.source_trial === rung.proxy_winner;
      svg.append(s("g", { class: "candidate", "data-trial": r.source_trial },
        s("circle", { class: ["pt", winner && "winner"].filter(Boolean).join(" "), cx: x, cy: y, r: winner ? 6 : 4.5 }),
        s("text", { class: "pt-label", x: x + 7, y: y - 6 }, `#${r.source_trial}`),
        s("title", {}, `#${r.source_trial} ${r.pattern}: proxy ${format(r.proxy_value)}, promoted `
          + `${format(r.value)} (${count(r.source_params)} -> ${count(r.params)} params)`)));
    }
  }
  svg.id = `promotion-rung-${rung.rung}`;
  svg.append(s("text", { class: "subtitle", x: f.left, y: 32 }, rung.correlation.text));
  const legend = h("div", { class: "series-legend" },
    h("span", {}, h("span", { class: "swatch candidate" }), " candidate, labelled by its proxy trial (ringed: proxy winner)"),
    [...new Set(rung.runs.filter((r) => r.role !== "candidate").map((r) => r.role))].map((role) =>
      h("span", {}, h("span", { class: `swatch line ${role}` }), ` ${role} baseline`)));
  return h("div", { class: "curve-chart promotion-chart" }, svg, legend,
    h("p", { class: "muted summary" }, rung.summary));
}

function verdictText(t) {
  if (t.held == null) return "–";
  const separated = t.separated == null ? "" : (t.separated ? ", separated" : ", not separated");
  return `${t.held ? "holds" : "does not hold"}${separated}`;
}

function renderCalibration() {
  const budgets = view.calibration?.budgets || [];
  document.getElementById("calibration-section").hidden = !budgets.length;
  document.getElementById("calibration").replaceChildren(...budgets.map((b) => {
    const refs = [...new Set(b.tasks.flatMap((t) => t.references.map((r) => r.reference)))];
    return h("div", { class: "scroll" }, h("h3", {}, `${b.scale}x the space's budget`),
      h("table", { class: "calibration", "data-scale": b.scale },
        h("thead", {}, h("tr", {}, ["task", "metric", ...refs, "expectation", "margin", "verdict",
          "each ahead by", "min / run"].map((c) => h("th", {}, c)))),
        h("tbody", {}, b.tasks.map((t) => {
          const byRef = new Map(t.references.map((r) => [r.reference, r]));
          const minutes = t.references.reduce((sum, r) => sum + r.seconds, 0) / t.references.length / 60;
          return h("tr", { "data-task": t.task },
            h("td", {}, t.task), h("td", {}, t.metric),
            refs.map((ref) => {
              const r = byRef.get(ref);
              return h("td", { class: "num" }, r ? `${num(r.mean)} ± ${num(r.spread)} (${r.n})` : "–");
            }),
            h("td", {}, t.expectation || "–"), h("td", { class: "num" }, t.margin ?? "–"),
            h("td", { class: t.held === false ? "bad" : "" }, verdictText(t)),
            h("td", { class: "ahead" }, Object.entries(t.ahead || {})
              .map(([ref, m]) => `${ref} ${m}`).join(", ") || "–"),
            h("td", { class: "num" }, num(minutes)));
        }))));
  }));
}

function renderPromotion() {
  const rungs = view.promotion?.rungs || [];
  document.getElementById("promotion-section").hidden = !rungs.length;
  document.getElementById("promotion").replaceChildren(...rungs.map(promotionChart));
}

function tooltipBody(trial) {
  const scaleAll = stripScale(view.data.trials);
  const rows = [
    ...view.data.objectives.map((o) => [o.metric, formatMetric(o.metric, trial.metrics[o.metric])]),
    ...costMetrics().map((m) => [m.label, formatMetric(m.name, trial[m.name])]),
    ["context L", `${count(view.data.state_context)} tokens`],
    ["depth / attention", `${trial.depth ?? "–"} / ${percent(trial.attention_fraction)}`],
  ];
  return [
    h("strong", {}, `#${trial.number} `), h("code", {}, trial.pattern || "–"), ` · ${trial.state}`,
    strip(trial, scaleAll, { height: 22, unit: 18 }),
    h("table", {}, rows.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", {}, v)))),
  ];
}
function showTooltip(event, trial) {
  const tip = document.getElementById("tooltip");
  tip.replaceChildren(...tooltipBody(trial));
  tip.dataset.trial = trial.number;
  tip.hidden = false;
  moveTooltip(event);
}
function moveTooltip(event) {
  const tip = document.getElementById("tooltip");
  const left = Math.min(event.pageX + 14, window.scrollX + document.documentElement.clientWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(0, left)}px`;
  tip.style.top = `${event.pageY + 14}px`;
}
function hideTooltip() { document.getElementById("tooltip").hidden = true; }

function toggle(number) {
  view.picked = true;
  if (view.selected.has(number)) view.selected.delete(number);
  else view.selected.add(number);
  renderStudy();
}

function trialColor(number, numbers) {
  return TRIAL_COLORS[Math.max(0, numbers.indexOf(number)) % TRIAL_COLORS.length];
}

function renderTrials() {
  const d = view.data;
  const scaleAll = stripScale(d.trials);
  const best = new Set(d.best);
  const metrics = d.objectives.map((o) => o.metric);
  const costs = costMetrics();
  const head = h("tr", {},
    ["", "#", "state", "architecture", "pattern", "layers", "attn", ...costs.map((m) => m.label),
      ...metrics, "note", "export"].map((name) => h("th", {}, name)));
  const rows = d.trials.map((t) => h("tr", {
    "data-trial": t.number,
    class: [t.state, best.has(t.number) && "best", view.selected.has(t.number) && "selected"].filter(Boolean).join(" "),
  },
  h("td", {}, h("input", {
    type: "checkbox", "aria-label": `compare trial ${t.number}`, checked: view.selected.has(t.number),
    onchange: () => toggle(t.number),
  })),
  h("td", { class: "num" }, t.number),
  h("td", {}, t.state, best.has(t.number) && h("span", { class: "badge" }, "best"),
    t.seed && h("span", { class: "badge seed", title: t.seed.rule || "" }, `seed: ${t.seed.name}`)),
  h("td", {}, t.layers.length ? strip(t, scaleAll, { height: 18, unit: 16 }) : "–"),
  h("td", {}, h("code", {}, t.pattern || "–")),
  h("td", { class: "num" }, t.depth ?? "–"),
  h("td", { class: "num" }, percent(t.attention_fraction)),
  ...costs.map((m) => h("td", { class: "num", "data-metric": m.name }, formatMetric(m.name, t[m.name]))),
  ...metrics.map((m) => h("td", { class: "num" }, formatMetric(m, t.metrics[m]))),
  h("td", { class: "note" }, t.note || ""),
  h("td", {}, h("details", {}, h("summary", {}, "command"), h("code", { class: "export-command" }, t.export_command)))));
  document.getElementById("trials").replaceChildren(h("thead", {}, head), h("tbody", {}, rows));
}

function renderCompare() {
  const d = view.data;
  const box = document.getElementById("compare");
  const numbers = [...view.selected].sort((a, b) => a - b);
  const chosen = numbers.map((n) => d.trials.find((t) => t.number === n)).filter(Boolean);
  if (!chosen.length) {
    box.replaceChildren(h("p", { class: "muted" }, "Tick trials in the table, or click points in a chart, to compare them here."));
    return;
  }
  const scaleAll = stripScale(d.trials);
  box.replaceChildren(...chosen.map((t) => {
    const facts = [
      ...d.objectives.map((o) => [`${o.metric} (${o.direction})`, formatMetric(o.metric, t.metrics[o.metric])]),
      ...costMetrics().map((m) => [m.label, formatMetric(m.name, t[m.name])]),
      ["context L", `${count(d.state_context)} tokens`],
      ["depth · attention share", `${t.depth ?? "–"} · ${percent(t.attention_fraction)}`],
      ["state", t.note ? `${t.state} (${t.note})` : t.state],
      ...(t.seed ? [["seeded from", `${t.seed.name} (${t.seed.source || "?"})`], ["sized by", t.seed.rule || "–"]] : []),
    ];
    const card = h("div", { class: "card", "data-trial": t.number },
      h("h3", {}, `#${t.number}`, h("code", {}, t.pattern || "–")),
      t.layers.length ? strip(t, scaleAll, { height: 28, unit: 24 }) : null,
      h("table", { class: "facts" }, facts.map(([k, v]) => h("tr", {}, h("td", {}, k), h("td", { class: "num" }, v)))),
      t.layers.length ? h("div", { class: "layers-box" }, h("table", { class: "layers" },
        h("tr", {}, ["#", "type", "width", "d_state", "state", "params"].map((c) => h("th", {}, c))),
        t.layers.map((l, i) => h("tr", {},
          h("td", { class: "num" }, i),
          h("td", {}, h("span", { class: "swatch", "data-type": l.type }), " ", l.type),
          h("td", { class: "num" }, l.width ?? "–"),
          h("td", { class: "num" }, l.d_state ?? "–"),
          h("td", { class: "num" }, bytes(l.state_bytes)),
          h("td", { class: "num" }, count(l.params)))))) : null,
      h("div", { class: "export" }, h("code", { class: "export-command" }, t.export_command)));
    card.style.borderTopColor = trialColor(t.number, numbers);
    for (const swatch of card.querySelectorAll(".swatch")) swatch.style.background = typeColor(swatch.dataset.type);
    return card;
  }));
}

function lineChart(title, series, numbers) {
  const f = FRAME;
  const steps = series.flatMap((x) => x.steps);
  const values = series.flatMap((x) => x.values);
  const xs = scale(steps, [f.left, f.width - f.right], { integer: true });
  const ys = scale(values, [f.height - f.bottom, f.top]);
  const svg = frame(title, "step", title.split(" ").slice(1).join(" "), xs, ys, count, num);
  for (const x of series) {
    const d = x.steps.map((step, i) => `${i ? "L" : "M"}${xs(step)},${ys(x.values[i])}`).join(" ");
    svg.append(s("path", { class: "line", "data-trial": x.trial, d, stroke: trialColor(x.trial, numbers) }));
    x.steps.forEach((step, i) => svg.append(s("circle", {
      cx: xs(step), cy: ys(x.values[i]), r: 2.2, fill: trialColor(x.trial, numbers),
    }, s("title", {}, `#${x.trial} step ${step}: ${num(x.values[i])}`))));
  }
  return svg;
}

async function renderCurves() {
  const d = view.data;
  const numbers = view.selected.size ? [...view.selected].sort((a, b) => a - b) : d.best.slice(0, 5);
  const key = `${d.study}|${d.revision}|${numbers.join(",")}`;
  if (key === view.curvesKey) return;
  view.curvesKey = key;
  const box = document.getElementById("curves");
  if (!numbers.length) {
    box.replaceChildren(h("p", { class: "muted" }, "No trials chosen and none finished yet."));
    return;
  }
  const { series } = await getJSON(`/hl/api/curves?study=${encodeURIComponent(d.study)}&trials=${numbers.join(",")}`);
  if (key !== view.curvesKey) return;
  const groups = new Map();
  for (const x of series) {
    const name = `${x.split} ${x.metric}`;
    if (!groups.has(name)) groups.set(name, []);
    groups.get(name).push(x);
  }
  if (!groups.size) {
    box.replaceChildren(h("p", { class: "muted" }, "No learning curves recorded for these trials yet."));
    return;
  }
  const legend = () => h("div", { class: "series-legend" }, numbers.map((n) => {
    const t = d.trials.find((x) => x.number === n);
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = trialColor(n, numbers);
    return h("span", {}, swatch, ` #${n} `, h("code", {}, t?.pattern || ""));
  }));
  box.replaceChildren(...[...groups.entries()].map(([name, group]) =>
    h("div", { class: "curve-chart" }, lineChart(name, group, numbers), legend())));
}

function renderEvaluations() {
  const rows = view.data.evaluations;
  const table = document.getElementById("evaluations");
  if (!rows.length) {
    table.replaceChildren(h("tr", {}, h("td", { class: "muted" }, "No evaluations recorded yet.")));
    return;
  }
  const columns = [...new Map(rows.map((r) => [`${r.task} / ${r.metric}`, r.harness])).entries()]
    .sort((a, b) => a[0].localeCompare(b[0]));
  const byTrial = new Map();
  for (const r of rows) {
    if (!byTrial.has(r.trial)) byTrial.set(r.trial, {});
    byTrial.get(r.trial)[`${r.task} / ${r.metric}`] = r;
  }
  const patterns = new Map(view.data.trials.map((t) => [t.number, t.pattern]));
  table.replaceChildren(
    h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "pattern"),
      columns.map(([name, harness]) => h("th", { title: `harness: ${harness}` }, name)))),
    h("tbody", {}, [...byTrial.entries()].sort((a, b) => a[0] - b[0]).map(([trial, cells]) => h("tr", { "data-trial": trial },
      h("td", { class: "num" }, trial),
      h("td", {}, h("code", {}, patterns.get(trial) || "–")),
      columns.map(([name]) => {
        const r = cells[name];
        return h("td", { class: "num" }, r ? `${num(r.value)}${r.stderr != null ? ` ± ${num(r.stderr)}` : ""}` : "–");
      })))));
}

function renderLegend() {
  const legend = document.getElementById("legend");
  legend.replaceChildren(...view.data.layer_types.map((t) => {
    const swatch = h("span", { class: "swatch" });
    swatch.style.background = t.colour;
    return h("span", {}, swatch, typeName(t.type));
  }));
}

function renderSummary() {
  const d = view.data;
  const counts = Object.entries(d.counts).map(([state, n]) => `${n} ${state}`).join(", ");
  const total = Object.values(d.counts).reduce((a, b) => a + b, 0);
  const goal = d.objectives.map((o) => `${o.direction} ${o.metric}`).join(", ");
  document.getElementById("summary").textContent =
    `${total} trials (${counts || "none yet"}) · ${goal} · best ${d.best.map((n) => `#${n}`).join(" ") || "–"}`;
}

// The best trials, topped up with the next best by quality so a comparison has a few columns.
function defaultSelection() {
  const chosen = view.data.best.slice(0, COMPARED_BY_DEFAULT);
  const sign = view.quality.direction === "maximize" ? -1 : 1;
  const ranked = view.data.trials.filter((t) => t.state === "complete" && qualityOf(t) !== null)
    .sort((a, b) => sign * (qualityOf(a) - qualityOf(b)) || a.number - b.number);
  for (const t of ranked) {
    if (chosen.length >= COMPARED_BY_DEFAULT) break;
    if (!chosen.includes(t.number)) chosen.push(t.number);
  }
  return new Set(chosen);
}

function renderStudy() {
  const d = view.data;
  if (!view.quality || !d.quality_metrics.some((q) => q.metric === view.quality.metric)) {
    view.quality = d.quality_metrics[0];
  }
  if (!view.picked) view.selected = defaultSelection();
  renderLegend();
  const quality = document.getElementById("quality");
  quality.replaceChildren(...d.quality_metrics.map((q) => h("option", { value: q.metric, selected: q.metric === view.quality.metric }, q.metric)));
  hideTooltip();
  // Which data the page shows, for anyone (or any test) checking it is current.
  document.body.dataset.revision = d.revision;
  document.getElementById("views").hidden = false;
  renderSummary();
  renderFronts();
  renderStructure();
  renderTrials();
  renderCompare();
  renderEvaluations();
  renderCurves().catch((err) => stamp(`curves: ${err.message}`, true));
}

function stamp(text, failed = false) {
  const node = document.getElementById("refreshed");
  node.textContent = text;
  node.classList.toggle("error", failed);
}

function showDatabase(index) {
  const banner = document.getElementById("database");
  banner.dataset.state = index.database.state;
  banner.textContent = index.database.message;
  const picker = document.getElementById("study");
  const names = index.studies.map((x) => x.name);
  if (!names.includes(view.study)) view.study = index.default;
  if ([...picker.options].map((o) => o.value).join("\n") !== names.join("\n")) {
    picker.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  }
  picker.value = view.study ?? "";
  if (index.database.state !== "ready" || !view.study) {
    document.getElementById("views").hidden = true;
    document.getElementById("summary").textContent = "";
  }
}

async function refresh() {
  try {
    const index = await getJSON("/hl/api/studies");
    showDatabase(index);
    if (index.database.state === "ready" && view.study) {
      const data = await getJSON(`/hl/api/study?name=${encodeURIComponent(view.study)}`);
      if (data.revision !== view.revision) {
        view.data = data;
        view.revision = data.revision;
        renderStudy();
      }
      // Promoted runs finish in the rung studies, so this has a revision of its own.
      const promotion = await getJSON(`/hl/api/promotion?study=${encodeURIComponent(view.study)}`);
      if (promotion.revision !== view.promotion?.revision) {
        view.promotion = promotion;
        renderPromotion();
      }
      const calibration = await getJSON(`/hl/api/calibration?study=${encodeURIComponent(view.study)}`);
      if (calibration.revision !== view.calibration?.revision) {
        view.calibration = calibration;
        renderCalibration();
      }
    }
    stamp(`updated ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    stamp(`refresh failed (${err.message}); retrying`, true);
  } finally {
    // A refresh started by a study change may overlap a polled one: keep a single pending timer.
    clearTimeout(view.timer);
    view.timer = setTimeout(refresh, REFRESH_MS);
  }
}

document.getElementById("study").addEventListener("change", (event) => {
  view.study = event.target.value;
  Object.assign(view, { data: null, revision: null, selected: new Set(), picked: false, curvesKey: null, promotion: null, calibration: null });
  history.replaceState(null, "", `?study=${encodeURIComponent(view.study)}`);
  refresh();
});
document.getElementById("quality").addEventListener("change", (event) => {
  view.quality = view.data.quality_metrics.find((q) => q.metric === event.target.value);
  renderStudy();
});
refresh();
