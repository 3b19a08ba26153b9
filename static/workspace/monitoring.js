/* Bias monitoring charts: SVG drawn here from the page's JSON (#mon-data), no external code.
 *
 * - #mon-chart: the chosen measure per segment (groups) and model version (bars), with the
 *   95% interval as a whisker; small-n cells pale, alerts outlined in red.
 * - #mon-trend: the weekly bad-rating rate per version, with its interval as a band.
 */
(function () {
  "use strict";
  var dataEl = document.getElementById("mon-data");
  if (!dataEl) return;
  var data = JSON.parse(dataEl.textContent);
  var NS = "http://www.w3.org/2000/svg";
  var COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"];

  function el(name, attrs, text) {
    var node = document.createElementNS(NS, name);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function metricInfo(name) {
    for (var i = 0; i < data.metrics.length; i++) if (data.metrics[i].name === name) return data.metrics[i];
    return data.metrics[0];
  }

  function fmt(value, unit) {
    if (value === null || value === undefined) return "–";
    if (unit === "rate") return (100 * value).toFixed(1) + "%";
    if (unit === "ms") return Math.round(value).toLocaleString();
    return value.toFixed(2);
  }

  function colour(version) {
    var i = data.versions.indexOf(version);
    return COLOURS[(i < 0 ? data.versions.length : i) % COLOURS.length];
  }

  function legend(svg, x, y) {
    data.versions.forEach(function (v, i) {
      svg.appendChild(el("rect", { x: x + i * 90, y: y, width: 10, height: 10, fill: colour(v), "class": "mon-legend" }));
      svg.appendChild(el("text", { x: x + i * 90 + 14, y: y + 9 }, v));
    });
  }

  function drawBars() {
    var box = document.getElementById("mon-chart");
    var metric = metricInfo(document.getElementById("mon-metric").value);
    var dimName = document.getElementById("mon-dimension").value;
    var dim = data.dimensions.filter(function (d) { return d.name === dimName; })[0];
    box.textContent = "";
    var cells = dim ? dim.cells.filter(function (c) { return c.metrics[metric.name].n > 0; }) : [];
    var width = 900, height = 300, left = 56, right = 12, top = 24, bottom = 58;
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height, "data-metric": metric.name, "data-dimension": dimName });
    if (!cells.length) {
      svg.appendChild(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", "class": "mon-empty" }, "No data for this measure."));
      box.appendChild(svg);
      return;
    }
    var segments = dim.segments.filter(function (s) { return cells.some(function (c) { return c.segment === s; }); });
    var top_value = 0;
    cells.forEach(function (c) {
      var f = c.metrics[metric.name];
      top_value = Math.max(top_value, f.high !== null ? f.high : f.value || 0, f.value || 0);
    });
    if (metric.unit === "rate") top_value = Math.min(1, Math.max(top_value * 1.1, 0.05));
    else top_value = top_value * 1.1 || 1;
    var plotH = height - top - bottom, plotW = width - left - right;
    var y = function (v) { return top + plotH - (v / top_value) * plotH; };
    svg.appendChild(el("line", { x1: left, y1: top + plotH, x2: width - right, y2: top + plotH, "class": "mon-axis" }));
    svg.appendChild(el("line", { x1: left, y1: top, x2: left, y2: top + plotH, "class": "mon-axis" }));
    [0, 0.5, 1].forEach(function (t) {
      svg.appendChild(el("text", { x: left - 4, y: y(t * top_value) + 4, "text-anchor": "end" }, fmt(t * top_value, metric.unit)));
    });
    var groupW = plotW / segments.length;
    var barW = Math.max(4, Math.min(40, (groupW - 10) / Math.max(1, data.versions.length)));
    segments.forEach(function (segment, gi) {
      var gx = left + gi * groupW + 5;
      svg.appendChild(el("text", { x: gx + (groupW - 10) / 2, y: top + plotH + 16, "text-anchor": "middle" }, segment));
      data.versions.forEach(function (version, vi) {
        var cell = cells.filter(function (c) { return c.segment === segment && c.version === version; })[0];
        if (!cell) return;
        var f = cell.metrics[metric.name];
        var x = gx + vi * barW;
        var small = f.n < data.min_n;
        var alert = cell.alerts.indexOf(metric.name) >= 0;
        var bar = el("rect", {
          x: x, y: y(f.value || 0), width: barW - 2, height: Math.max(0, top + plotH - y(f.value || 0)),
          fill: colour(version), "class": "mon-bar" + (small ? " mon-bar-small" : "") + (alert ? " mon-bar-alert" : ""),
          "data-segment": segment, "data-version": version
        });
        bar.appendChild(el("title", {}, segment + " · " + version + ": " + fmt(f.value, metric.unit) +
          " [" + fmt(f.low, metric.unit) + "–" + fmt(f.high, metric.unit) + "], n=" + f.n + (small ? " (too few to judge)" : "") + (alert ? " ALERT" : "")));
        svg.appendChild(bar);
        if (f.low !== null && f.high !== null) {
          var cx = x + (barW - 2) / 2;
          svg.appendChild(el("line", { x1: cx, x2: cx, y1: y(Math.min(f.high, top_value)), y2: y(Math.max(f.low, 0)), "class": "mon-whisker" }));
          svg.appendChild(el("line", { x1: cx - 3, x2: cx + 3, y1: y(Math.min(f.high, top_value)), y2: y(Math.min(f.high, top_value)), "class": "mon-whisker" }));
          svg.appendChild(el("line", { x1: cx - 3, x2: cx + 3, y1: y(Math.max(f.low, 0)), y2: y(Math.max(f.low, 0)), "class": "mon-whisker" }));
        }
      });
    });
    svg.appendChild(el("text", { x: left, y: 14 }, metric.label + " by " + (dim ? dim.label.toLowerCase() : "")));
    legend(svg, left, height - 18);
    box.appendChild(svg);
  }

  function drawTrend() {
    var box = document.getElementById("mon-trend");
    box.textContent = "";
    var weeks = data.trend.weeks;
    var series = data.trend.series.filter(function (s) { return s.metric === "bad"; });
    var width = 900, height = 240, left = 56, right = 12, top = 20, bottom = 48;
    var svg = el("svg", { viewBox: "0 0 " + width + " " + height, "data-chart": "trend" });
    if (!weeks.length || !series.length) {
      svg.appendChild(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", "class": "mon-empty" }, "No rated replies in this window."));
      box.appendChild(svg);
      return;
    }
    var maxV = 0.05;
    series.forEach(function (s) { s.points.forEach(function (p) { maxV = Math.max(maxV, p.high); }); });
    maxV = Math.min(1, maxV * 1.1);
    var plotW = width - left - right, plotH = height - top - bottom;
    var x = function (week) { return left + (weeks.length === 1 ? plotW / 2 : (weeks.indexOf(week) / (weeks.length - 1)) * plotW); };
    var y = function (v) { return top + plotH - (v / maxV) * plotH; };
    svg.appendChild(el("line", { x1: left, y1: top + plotH, x2: width - right, y2: top + plotH, "class": "mon-axis" }));
    [0, 0.5, 1].forEach(function (t) {
      svg.appendChild(el("text", { x: left - 4, y: y(t * maxV) + 4, "text-anchor": "end" }, fmt(t * maxV, "rate")));
    });
    var step = Math.ceil(weeks.length / 10);
    weeks.forEach(function (w, i) {
      if (i % step === 0) svg.appendChild(el("text", { x: x(w), y: top + plotH + 14, "text-anchor": "middle" }, w.slice(5)));
    });
    series.forEach(function (s) {
      var c = colour(s.version);
      var upper = s.points.map(function (p) { return x(p.week) + "," + y(p.high); });
      var lower = s.points.slice().reverse().map(function (p) { return x(p.week) + "," + y(p.low); });
      svg.appendChild(el("polygon", { points: upper.concat(lower).join(" "), fill: c, opacity: 0.12 }));
      svg.appendChild(el("polyline", { points: s.points.map(function (p) { return x(p.week) + "," + y(p.value); }).join(" "), fill: "none", stroke: c, "stroke-width": 2, "class": "mon-trend-line", "data-version": s.version }));
      s.points.forEach(function (p) {
        var dot = el("circle", { cx: x(p.week), cy: y(p.value), r: Math.min(6, 2 + Math.log10(p.n + 1)), fill: c });
        dot.appendChild(el("title", {}, s.version + ", week of " + p.week + ": " + fmt(p.value, "rate") + " [" + fmt(p.low, "rate") + "–" + fmt(p.high, "rate") + "], n=" + p.n));
        svg.appendChild(dot);
      });
    });
    legend(svg, left, height - 16);
    box.appendChild(svg);
  }

  document.getElementById("mon-metric").addEventListener("change", drawBars);
  document.getElementById("mon-dimension").addEventListener("change", drawBars);
  drawBars();
  drawTrend();
})();
