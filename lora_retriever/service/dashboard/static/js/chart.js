// Hand-written SVG charts: horizontal bars, lines over steps, a scatter map, grouped bars. No library.
import { h, s } from "./dom.js";

export const PALETTE = [
  "#1f5fbf", "#d9480f", "#2b8a3e", "#ae3ec9", "#e67700", "#0c8599", "#c2255c", "#5c940d",
  "#364fc7", "#862e9c", "#a61e4d", "#087f5b", "#495057", "#f08c00", "#1864ab", "#66a80f",
];

function niceTicks(min, max, count = 5) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const step = 10 ** Math.floor(Math.log10(raw));
  const nice = [1, 2, 2.5, 5, 10].map((m) => m * step).find((v) => v >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(min / nice) * nice; t <= max + nice * 1e-9; t += nice) ticks.push(+t.toPrecision(12));
  return ticks;
}

const fmt = (v) => (Math.abs(v) >= 100 || Number.isInteger(v) ? String(+v.toFixed(1)) : (+v.toPrecision(3)).toString());

/**
 * Horizontal bars: items [{label, value, note?, color?}], one row each (a long list makes a tall chart: put it
 * in a scrolling box). Values may be negative (cosine similarity); the axis spans [min(0, …), max(…)].
 */
export function barChart(items, { title, format = (v) => v.toFixed(3), labelWidth = 170 } = {}) {
  const row = 22;
  const width = 640;
  const plot = width - labelWidth - 70;
  const values = items.map((i) => (i.value === null ? 0 : i.value));
  const lo = Math.min(0, ...values);
  const hi = Math.max(1e-9, ...values);
  const x = (v) => labelWidth + ((v - lo) / (hi - lo)) * plot;
  const height = items.length * row + 24;
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || "bar chart" });
  if (title) svg.append(s("title", {}, title));
  items.forEach((item, i) => {
    const y = i * row + 4;
    const v = item.value === null ? null : item.value;
    const label = item.label.length > 26 ? `${item.label.slice(0, 25)}…` : item.label;
    svg.append(s("text", { x: labelWidth - 6, y: y + 14, "text-anchor": "end" }, s("title", {}, item.label), label));
    if (v !== null) {
      const x0 = x(Math.min(0, v));
      const w = Math.max(1, Math.abs(x(v) - x(0)));
      svg.append(s("rect", { x: x0, y, width: w, height: row - 6, fill: item.color || PALETTE[0], rx: 2 },
        s("title", {}, `${item.label}: ${format(v)}${item.note ? ` (${item.note})` : ""}`)));
    }
    svg.append(s("text", { x: x(Math.max(0, v ?? 0)) + 4, y: y + 14, fill: "#5b6473" }, v === null ? "no key" : format(v)));
  });
  svg.append(s("line", { class: "axis", x1: x(0), x2: x(0), y1: 0, y2: height - 20 }));
  for (const t of niceTicks(lo, hi, 4)) {
    svg.append(s("text", { x: x(t), y: height - 6, "text-anchor": "middle", fill: "#5b6473" }, fmt(t)));
  }
  return svg;
}

/**
 * Lines over steps: series [{name, points: [[x, y], ...], color?, dots?}] on shared axes, with a legend.
 */
export function lineChart(series, { title, xLabel = "step", yLabel = "", height = 260 } = {}) {
  const width = 640;
  const m = { l: 56, r: 16, t: 12, b: 38 };
  const all = series.flatMap((sr) => sr.points).filter((p) => p[1] !== null);
  const wrap = h("figure", { class: "chart-figure", style: "margin:0" });
  if (!all.length) {
    wrap.append(h("p", { class: "muted small" }, "No points yet."));
    return wrap;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const pad = (y1 - y0) * 0.06;
  [y0, y1] = [y0 - pad, y1 + pad];
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (v) => height - m.b - ((v - y0) / (y1 - y0)) * (height - m.t - m.b);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || yLabel });
  if (title) svg.append(s("title", {}, title));
  for (const t of niceTicks(y0, y1, 5)) {
    svg.append(s("line", { class: "grid", x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t) }));
    svg.append(s("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end", fill: "#5b6473" }, fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    svg.append(s("text", { x: X(t), y: height - m.b + 16, "text-anchor": "middle", fill: "#5b6473" }, fmt(t)));
  }
  svg.append(s("line", { class: "axis", x1: m.l, x2: m.l, y1: m.t, y2: height - m.b }));
  svg.append(s("line", { class: "axis", x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b }));
  svg.append(s("text", { x: (m.l + width - m.r) / 2, y: height - 4, "text-anchor": "middle" }, xLabel));
  if (yLabel) svg.append(s("text", { x: 12, y: m.t + (height - m.t - m.b) / 2, transform: `rotate(-90 12 ${m.t + (height - m.t - m.b) / 2})`, "text-anchor": "middle" }, yLabel));
  series.forEach((sr, i) => {
    const color = sr.color || PALETTE[i % PALETTE.length];
    const pts = sr.points.filter((p) => p[1] !== null);
    if (pts.length > 1 && !sr.dotsOnly) {
      svg.append(s("polyline", { points: pts.map((p) => `${X(p[0])},${Y(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
    }
    if (sr.dots || sr.dotsOnly || pts.length === 1) {
      for (const p of pts) svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 4, fill: color }, s("title", {}, `${sr.name} @ ${p[0]}: ${fmt(p[1])}`)));
    }
  });
  wrap.append(svg, legend(series.map((sr, i) => [sr.name, sr.color || PALETTE[i % PALETTE.length]])));
  return wrap;
}

/** A legend: [[name, color], ...]. */
export function legend(entries) {
  return h("div", { class: "legend" }, entries.map(([name, color]) => h("span", { style: `--c:${color}` }, name)));
}

/**
 * A 2-D scatter map: points [{x, y, label, group}], coloured by group; `onPick(label)` when a point is clicked.
 * Returns {figure, select(label)}.
 */
export function scatter(points, { title, xLabel = "PC 1", yLabel = "PC 2", onPick } = {}) {
  const width = 640;
  const height = 380;
  const m = { l: 40, r: 14, t: 12, b: 34 };
  const groups = [...new Set(points.map((p) => p.group))];
  const color = (g) => PALETTE[groups.indexOf(g) % PALETTE.length];
  const xs = points.map((p) => p.x ?? 0);
  const ys = points.map((p) => p.y ?? 0);
  let [x0, x1, y0, y1] = [Math.min(0, ...xs), Math.max(0, ...xs), Math.min(0, ...ys), Math.max(0, ...ys)];
  const px = (x1 - x0 || 1) * 0.08;
  const py = (y1 - y0 || 1) * 0.08;
  [x0, x1, y0, y1] = [x0 - px, x1 + px, y0 - py, y1 + py];
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (width - m.l - m.r);
  const Y = (v) => height - m.b - ((v - y0) / (y1 - y0)) * (height - m.t - m.b);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || "map" });
  if (title) svg.append(s("title", {}, title));
  svg.append(s("line", { class: "grid", x1: X(0), x2: X(0), y1: m.t, y2: height - m.b }));
  svg.append(s("line", { class: "grid", x1: m.l, x2: width - m.r, y1: Y(0), y2: Y(0) }));
  svg.append(s("rect", { x: m.l, y: m.t, width: width - m.l - m.r, height: height - m.t - m.b, fill: "none", class: "axis" }));
  svg.append(s("text", { x: (m.l + width - m.r) / 2, y: height - 8, "text-anchor": "middle" }, xLabel));
  svg.append(s("text", { x: 14, y: height / 2, transform: `rotate(-90 14 ${height / 2})`, "text-anchor": "middle" }, yLabel));
  const dots = new Map();
  const r = points.length > 60 ? 4 : 6;
  for (const p of points) {
    const dot = s("circle", { cx: X(p.x ?? 0), cy: Y(p.y ?? 0), r, fill: color(p.group), "fill-opacity": 0.8, "data-name": p.label },
      s("title", {}, `${p.label} (${p.group})`));
    if (onPick) {
      dot.style.cursor = "pointer";
      dot.addEventListener("click", () => onPick(p.label));
    }
    dots.set(p.label, dot);
    svg.append(dot);
  }
  if (points.length <= 12) {
    for (const p of points) svg.append(s("text", { x: X(p.x ?? 0) + 8, y: Y(p.y ?? 0) + 4, fill: "#5b6473" }, p.label));
  }
  const figure = h("figure", { style: "margin:0" }, svg, legend(groups.map((g) => [g, color(g)])));
  return {
    figure,
    select(label) {
      for (const [name, dot] of dots) dot.classList.toggle("selected", name === label);
    },
  };
}

/** Grouped vertical bars: groups [{label, values: {series: value}}], series names in order. */
export function groupedBars(groups, seriesNames, { title, yLabel = "", max = 1 } = {}) {
  const width = 640;
  const height = 280;
  const m = { l: 48, r: 10, t: 12, b: 56 };
  const top = Math.max(max, ...groups.flatMap((g) => Object.values(g.values).filter((v) => v !== null)));
  const Y = (v) => height - m.b - (v / top) * (height - m.t - m.b);
  const band = (width - m.l - m.r) / Math.max(groups.length, 1);
  const bar = (band * 0.8) / Math.max(seriesNames.length, 1);
  const svg = s("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title || yLabel });
  if (title) svg.append(s("title", {}, title));
  for (const t of niceTicks(0, top, 5)) {
    svg.append(s("line", { class: "grid", x1: m.l, x2: width - m.r, y1: Y(t), y2: Y(t) }));
    svg.append(s("text", { x: m.l - 6, y: Y(t) + 4, "text-anchor": "end", fill: "#5b6473" }, fmt(t)));
  }
  groups.forEach((g, i) => {
    const x = m.l + i * band + band * 0.1;
    seriesNames.forEach((name, j) => {
      const v = g.values[name];
      if (v === null || v === undefined) return;
      svg.append(s("rect", { x: x + j * bar, y: Y(v), width: bar - 2, height: Y(0) - Y(v), fill: PALETTE[j % PALETTE.length] },
        s("title", {}, `${g.label} ${name}: ${v.toFixed(3)}`)));
    });
    const cx = m.l + i * band + band / 2;
    svg.append(s("text", { x: cx, y: height - m.b + 14, "text-anchor": "end", transform: `rotate(-25 ${cx} ${height - m.b + 14})` }, g.label));
  });
  svg.append(s("line", { class: "axis", x1: m.l, x2: width - m.r, y1: Y(0), y2: Y(0) }));
  if (yLabel) svg.append(s("text", { x: 12, y: height / 2 - 20, transform: `rotate(-90 12 ${height / 2 - 20})`, "text-anchor": "middle" }, yLabel));
  return h("figure", { style: "margin:0" }, svg, legend(seriesNames.map((n, j) => [n, PALETTE[j % PALETTE.length]])));
}
