/* batchpilot's presentation on the page: tables, breakdown bars, facts and curves from the view objects the
   server builds (batchpilot.report.present). Values are shown as the server formatted them; every text goes in
   through textContent (never as HTML). */
"use strict";
const bp = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#4477aa", "#66ccee", "#228833", "#ccbb44", "#ee6677", "#aa3377", "#bbbbbb", "#332288",
                  "#88ccee", "#44aa99", "#999933", "#882255", "#117733", "#dd7788", "#555555"];

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs = {}, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  /* A table of {columns: [{key, header, label, align}], rows: [[{text, value}]], caption}. */
  function table(data, {id = null, caption = null} = {}) {
    const head = el("tr", {}, data.columns.map(c => el("th", {scope: "col", class: c.align === "left" ? "l" : null,
                                                              title: c.header}, c.label)));
    const rows = data.rows.map((row, i) => el("tr", {"data-row": i}, row.map((cell, j) => {
      const c = data.columns[j];
      return el("td", {class: c.align === "left" ? "l" : null, "data-key": c.key,
                       "data-value": typeof cell.value === "number" ? String(cell.value) : cell.value}, cell.text);
    })));
    const text = caption ?? data.caption;
    return el("div", {class: "bp-table-wrap"},
              el("table", {class: "bp-table", id}, text ? el("caption", {}, text) : null,
                 el("thead", {}, head), el("tbody", {}, rows)));
  }

  /* Facts: [{label, text}] as a two-column table. */
  function facts(items) {
    return el("table", {class: "bp-facts"}, el("tbody", {}, items.map(f =>
      el("tr", {}, el("th", {scope: "row"}, f.label), el("td", {}, f.text)))));
  }

  /* One stacked bar of parts [{key, label, value, text}], with a legend that names each part and its share;
     `limit` (same unit as the values) draws a line (the usable memory). */
  function bars(parts, {title, total = null, limit = null, limitText = "", id = null}) {
    const sum = parts.reduce((a, p) => a + p.value, 0);
    const scale = Math.max(sum, limit ?? 0) || 1;
    const width = 1000, height = 44;
    const rects = [];
    let x = 0;
    parts.forEach((p, i) => {
      const w = p.value / scale * width;
      rects.push(svg("rect", {x: x.toFixed(2), y: 6, width: Math.max(w, 0).toFixed(2), height: 32,
                              fill: COLORS[i % COLORS.length], "data-key": p.key},
                     svg("title", {}, `${p.label}: ${p.text}`)));
      x += w;
    });
    if (limit) {
      const lx = (limit / scale * width).toFixed(2);
      rects.push(svg("line", {x1: lx, x2: lx, y1: 0, y2: height, stroke: "#000", "stroke-width": 3,
                              "stroke-dasharray": "6 4"}, svg("title", {}, limitText)));
    }
    const chart = svg("svg", {viewBox: `0 0 ${width} ${height}`, class: "bp-bar", role: "img",
                              "aria-label": `${title}${total ? ": " + total : ""}`, preserveAspectRatio: "none"},
                      rects);
    const legend = el("ul", {class: "bp-legend"}, parts.map((p, i) =>
      el("li", {"data-key": p.key, "data-value": String(p.value)},
         el("span", {class: "swatch", style: `background:${COLORS[i % COLORS.length]}`, "aria-hidden": "true"}),
         `${p.label}: ${p.text} (${(p.value / (sum || 1) * 100).toFixed(0)}%)`)));
    return el("figure", {class: "bp-chart", id},
              el("figcaption", {}, title, total ? el("span", {class: "total"}, ` — ${total}`) : null),
              chart, limitText ? el("p", {class: "hint"}, "dashed line: ", limitText) : null, legend);
  }

  function niceTicks(lo, hi, count = 5) {
    if (!(hi > lo)) { hi = lo + 1; }
    const step0 = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(step0)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= step0);
    const ticks = [];
    for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(+t.toPrecision(12));
    return ticks;
  }

  function tickText(v) {
    const a = Math.abs(v);
    if (a >= 1e9) return (v / 1e9).toPrecision(3).replace(/\.?0+$/, "") + "B";
    if (a >= 1e6) return (v / 1e6).toPrecision(3).replace(/\.?0+$/, "") + "M";
    if (a >= 1e4) return (v / 1e3).toPrecision(3).replace(/\.?0+$/, "") + "K";
    return String(+v.toPrecision(3));
  }

  /* A curve of [x, y] points with labelled axes; each point names its values when hovered or focused. */
  function line(points, {title, xLabel, yLabel, id = null}) {
    const W = 640, H = 300, L = 70, R = 16, T = 12, B = 48;
    const xs = points.map(p => p[0]), ys = points.map(p => p[1]);
    const xt = niceTicks(Math.min(...xs, 0), Math.max(...xs)), yt = niceTicks(Math.min(...ys, 0), Math.max(...ys));
    const x0 = xt[0], x1 = xt[xt.length - 1], y0 = yt[0], y1 = yt[yt.length - 1];
    const px = x => L + (x - x0) / ((x1 - x0) || 1) * (W - L - R);
    const py = y => H - B - (y - y0) / ((y1 - y0) || 1) * (H - T - B);
    const parts = [
      ...xt.map(t => svg("g", {}, svg("line", {x1: px(t), x2: px(t), y1: T, y2: H - B, class: "grid"}),
                         svg("text", {x: px(t), y: H - B + 18, "text-anchor": "middle"}, tickText(t)))),
      ...yt.map(t => svg("g", {}, svg("line", {x1: L, x2: W - R, y1: py(t), y2: py(t), class: "grid"}),
                         svg("text", {x: L - 6, y: py(t) + 4, "text-anchor": "end"}, tickText(t)))),
      svg("polyline", {points: points.map(p => `${px(p[0])},${py(p[1])}`).join(" "), class: "curve"}),
      ...points.map(p => svg("circle", {cx: px(p[0]), cy: py(p[1]), r: 4, class: "point", tabindex: 0},
                             svg("title", {}, `${xLabel} ${tickText(p[0])}: ${yLabel} ${tickText(p[1])}`))),
      svg("text", {x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", class: "axis"}, xLabel),
      svg("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle", class: "axis",
                   transform: `rotate(-90 14 ${(T + H - B) / 2})`}, yLabel),
    ];
    return el("figure", {class: "bp-chart", id}, el("figcaption", {}, title),
              svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "bp-line", role: "img", "aria-label": title}, parts));
  }

  function code(text, name) {
    return el("figure", {class: "bp-code"}, name ? el("figcaption", {}, name) : null, el("pre", {}, text));
  }

  return {el, table, facts, bars, line, code};
})();
