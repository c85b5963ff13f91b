// FCP dashboard: polls /dashboard/data.json and redraws the tables and the SVG charts.
// No library and no network resource beyond this server (the charts are drawn here).
// Every value reaches the page through textContent or setAttribute, never as HTML, so names
// and reasons read from the database cannot inject markup.
"use strict";

(function () {
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
    "#e377c2", "#17becf"];
  // Check-in results: successes green/blue, expected drop-outs grey/orange, failures red.
  const RESULT_COLORS = {
    UPLOAD_COMPLETED: "#2ca02c", ASSIGNED: "#1f77b4", LOCAL_COMPLETED: "#17becf",
    CANCELED: "#7f7f7f", LOCAL_NOT_ELIGIBLE: "#bcbd22", LOCAL_TIMEOUT: "#ff7f0e",
    UPLOAD_TIMEOUT: "#8c564b",
  };
  const FAILURE_COLOR = "#d62728";
  const W = 360, H = 200, LEFT = 56, RIGHT = 12, TOP = 28, BOTTOM = 30;
  const MAX_MARKERS = 60;

  function node(ns, tag, attrs, children) {
    const e = ns ? document.createElementNS(ns, tag) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const c of children || []) {
      if (c === null || c === undefined) continue;
      e.append(typeof c === "string" || typeof c === "number" ? String(c) : c);
    }
    return e;
  }
  const el = (tag, attrs, children) => node(null, tag, attrs, children);
  const svg = (tag, attrs, children) => node(SVG_NS, tag, attrs, children);

  function fmt(v) {
    if (v === null || v === undefined || !Number.isFinite(v)) return "n/a";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }

  function clock(ms) {
    const d = new Date(ms);
    return d.toISOString().slice(11, 16);
  }

  function badge(status) {
    return el("span", {class: "badge status-" + String(status).toLowerCase()}, [status]);
  }

  // A line chart: series = [{label, color, points: [[x, y], ...]}]; y values may be null.
  function lineChart(title, fullTitle, series, formatX) {
    const pts = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p[1])));
    const root = svg("svg", {class: "chart", viewBox: `0 0 ${W} ${H}`, width: W, height: H,
      role: "img"}, [svg("title", {}, [fullTitle])]);
    root.append(svg("text", {x: LEFT, y: 16, class: "chart-title"}, [title]));
    if (pts.length === 0) {
      root.append(svg("text", {x: LEFT, y: H / 2, class: "chart-empty"}, ["no data"]));
      return root;
    }
    let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
    const sx = (x) => LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    const sy = (y) => H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM);
    for (const y of [y0, (y0 + y1) / 2, y1]) {
      root.append(svg("line", {x1: LEFT, x2: W - RIGHT, y1: sy(y), y2: sy(y), class: "grid"}));
      root.append(svg("text", {x: LEFT - 4, y: sy(y) + 4, class: "tick y"}, [fmt(y)]));
    }
    root.append(svg("line", {x1: LEFT, x2: LEFT, y1: TOP, y2: H - BOTTOM, class: "axis"}));
    root.append(svg("line", {x1: LEFT, x2: W - RIGHT, y1: H - BOTTOM, y2: H - BOTTOM,
      class: "axis"}));
    root.append(svg("text", {x: LEFT, y: H - 10, class: "tick x"}, [formatX(x0)]));
    root.append(svg("text", {x: W - RIGHT, y: H - 10, class: "tick x end"}, [formatX(x1)]));
    series.forEach((s, i) => {
      const good = s.points.filter((p) => Number.isFinite(p[1]));
      const coords = good.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
      root.append(svg("polyline", {points: coords.join(" "), fill: "none", stroke: s.color,
        "stroke-width": 2.5, class: "series"}));
      if (good.length <= MAX_MARKERS) {
        for (const p of good) {
          root.append(svg("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 3, fill: s.color}));
        }
      }
      if (series.length > 1) {
        const y = TOP + 4 + 12 * i;
        // Top left: the newest data, where a live chart changes, is on the right.
        root.append(svg("text", {x: LEFT + 6, y: y, fill: s.color, class: "legend"},
          [s.label]));
      }
    });
    return root;
  }

  function shortName(name) {
    const s = name.replace(/^server\//, "");
    return s.length > 46 ? "\u2026" + s.slice(-45) : s;
  }

  function metricCharts(task) {
    return el("div", {class: "charts", "data-chart": "metrics"}, task.metrics.map((m, i) =>
      lineChart(shortName(m.name), m.name,
        [{label: m.name, color: PALETTE[i % PALETTE.length], points: m.points}],
        (x) => "round " + x)));
  }

  // Every minute of the window is a point (0 when nobody checked in), so the x axis always
  // spans the whole window, however bursty the traffic.
  function operationsChart(ops) {
    if (ops.assignments_per_minute.length === 0) {
      return el("p", {class: "empty"}, ["No check-ins in this window."]);
    }
    const MINUTE = 60000;
    const first = Math.floor(Date.parse(ops.window_start) / MINUTE) * MINUTE;
    const last = Math.floor(Date.parse(ops.window_end) / MINUTE) * MINUTE;
    const minutes = [];
    for (let m = first; m <= last; m += MINUTE) minutes.push(m);
    const results = [...new Set(ops.assignments_per_minute.map((b) => b.result))].sort();
    const counts = new Map(ops.assignments_per_minute.map((b) =>
      [b.result + "|" + Date.parse(b.minute), b.count]));
    const series = results.map((r) => ({
      label: r,
      color: RESULT_COLORS[r] || FAILURE_COLOR,
      points: minutes.map((m) => [m, counts.get(r + "|" + m) || 0]),
    }));
    return lineChart("check-ins per minute (UTC)", "check-ins per minute by result", series,
      clock);
  }

  function populationsSection(data) {
    const rows = data.populations.map((p) => el("tr", {}, [
      el("td", {class: "population"}, [p.name]),
      el("td", {}, Object.entries(p.tasks_by_status).flatMap(([s, n]) =>
        [badge(s + " " + n), " "])),
    ]));
    return el("section", {id: "populations"}, [el("h2", {}, ["Populations"]),
      rows.length ? el("table", {}, [
        el("thead", {}, [el("tr", {}, [el("th", {}, ["Population"]),
          el("th", {}, ["Tasks by status"])])]),
        el("tbody", {}, rows)]) : el("p", {class: "empty"}, ["No tasks yet."])]);
  }

  function fact(label, value, cls) {
    return el("tr", {}, [el("th", {}, [label]), el("td", cls ? {class: cls} : {}, value)]);
  }

  function taskArticle(t) {
    const eps = fmt(t.epsilon_spent) + (t.target_epsilon !== null ? " of " +
      fmt(t.target_epsilon) : "");
    const facts = [
      fact("Rounds completed", [`${t.completed_iterations} / ${t.total_iterations}`], "rounds"),
      fact("Report goal", [String(t.report_goal)]),
      fact("Epsilon spent", [eps], "epsilon"),
    ];
    const r = t.current_round;
    if (r) {
      facts.push(fact("Round " + r.iteration_id + (r.attempt ? ` (attempt ${r.attempt})` : ""), [
        badge(r.status), ` assigned ${r.assigned}, reported ${r.reported} / ${r.goal} `,
        el("progress", {max: r.goal, value: r.reported}),
      ], "progress"));
    }
    return el("article", {class: "task"}, [
      el("h3", {}, [`${t.population} / task ${t.task_id} `, el("span", {class: "kind"},
        [t.kind]), " ", badge(t.status)]),
      t.status_reason ? el("p", {class: "reason"}, [t.status_reason]) : null,
      el("table", {class: "facts"}, facts),
      metricCharts(t),
    ]);
  }

  function render(data) {
    const tasks = data.tasks.map(taskArticle);
    document.getElementById("content").replaceChildren(
      populationsSection(data),
      el("section", {id: "operations"}, [el("h2", {}, ["Check-ins per minute by result"]),
        el("div", {class: "charts", "data-chart": "operations"},
          [operationsChart(data.operations)])]),
      el("section", {id: "tasks"}, [el("h2", {}, ["Tasks"]),
        ...(tasks.length ? tasks : [el("p", {class: "empty"}, ["No tasks yet."])])]));
  }

  function setStatus(text, isError) {
    const status = document.getElementById("status");
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  async function poll() {
    const body = document.body;
    const refresh = Math.max(1, Number(body.dataset.refresh) || 5);
    // The admin key, when the page was opened with ?key=, goes in the header as for the API.
    const key = new URLSearchParams(window.location.search).get("key");
    const headers = key ? {"x-api-key": key} : {};
    try {
      const response = await fetch(body.dataset.source, {headers, cache: "no-store",
        credentials: "same-origin"});
      if (!response.ok) throw new Error("HTTP " + response.status);
      const data = await response.json();
      render(data);
      setStatus(`Snapshot of ${data.generated_at}; refreshes every ${refresh} s.`, false);
    } catch (e) {
      setStatus("Refresh failed: " + e.message + " (retrying)", true);
    }
    window.setTimeout(poll, refresh * 1000);
  }

  poll();
})();
