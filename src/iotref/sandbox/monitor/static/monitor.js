/* iotref sandbox monitor: vanilla JavaScript, no dependencies, works offline.
 * Every value from the server goes into the page through textContent or SVG attributes,
 * never through innerHTML. */
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  const MAX_STREAM = 300;
  const MAX_POINTS = 900; /* speed/counter readings kept for the machine chart */

  const state = {
    devices: new Map(),
    selected: null,
    source: null,
    paused: false,
    invalidOnly: false,
    totalRate: [],
    totalRateLoaded: false,
    deviceRate: [],
    series: [],
    assets: new Map(),
    metric: "speed",
    shadow: null,
    editorDirty: false,
    onlineWindow: 30,
    limits: { shadow_depth: 6, shadow_state_bytes: 8192 }, /* until the summary says */
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    if (attrs) {
      for (const [key, value] of Object.entries(attrs)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === "className") node.className = value;
        else if (key === "text") node.textContent = value;
        else node.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function fmtNumber(n) {
    if (n === null || n === undefined) return "–";
    return Number(n).toLocaleString("en-US", { maximumFractionDigits: 2 });
  }

  function fmtTime(t) {
    if (!t) return "–";
    const d = new Date(t * 1000);
    const pad = (v, w) => String(v).padStart(w || 2, "0");
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
  }

  function fmtAgo(t) {
    if (!t) return "never";
    const s = Math.max(0, Date.now() / 1000 - t);
    if (s < 2) return "just now";
    if (s < 90) return `${Math.round(s)} s ago`;
    if (s < 5400) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  function short(id) {
    return id && id.length > 24 ? `${id.slice(0, 12)}…${id.slice(-8)}` : id || "";
  }

  async function api(path, options) {
    const opts = Object.assign({ headers: {}, credentials: "same-origin" }, options || {});
    if (opts.method && opts.method !== "GET") {
      opts.headers["X-CSRF-Token"] = CSRF;
      opts.headers["Content-Type"] = "application/json";
    }
    const res = await fetch(path, opts);
    let body = null;
    try {
      body = await res.json();
    } catch (e) {
      body = null;
    }
    if (res.status === 401) {
      setConnection("error", "signed out: open the token link again");
    }
    if (!res.ok) {
      const message = (body && (body.message || body.error_description || body.error)) || `HTTP ${res.status}`;
      const err = new Error(message);
      err.status = res.status;
      err.body = body;
      throw err;
    }
    return body;
  }

  function setConnection(kind, text) {
    const node = $("connection");
    node.dataset.state = kind;
    node.textContent = text;
  }

  /* ---------------------------------------------------------------- charts (SVG) */

  const SVGNS = "http://www.w3.org/2000/svg";
  const PALETTE_SIZE = 8; /* colours .asset-c0 ... .asset-c7 in monitor.css */
  /* A gap in an asset's line: no reading for longer than GAP_INTERVALS of its usual
   * interval between readings, and never less than MIN_GAP_S (arrival jitter is no gap). */
  const GAP_INTERVALS = 5;
  const MIN_GAP_S = 2;
  const METRICS = {
    speed: { hint: "speed, sheets/h, per asset" },
    productioncounter: { hint: "job counter (productioncounter), per asset" },
    totalproductioncounter: { hint: "total counter, increase within each run of readings, per asset", change: true },
  };

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /* Clears the chart and draws its grid, axes and labels; returns the x and y scales. */
  function chartFrame(svg, x0, x1, y0, y1, opts) {
    const vb = svg.viewBox.baseVal;
    const W = vb.width;
    const H = vb.height;
    const left = 44;
    const right = 8;
    const top = 8;
    const bottom = 18;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (x1 <= x0) x1 = x0 + 1;
    if (y1 <= y0) y1 = y0 + 1;
    for (let i = 0; i <= 2; i++) {
      const y = top + (i / 2) * (H - top - bottom);
      svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
    }
    svg.appendChild(svgEl("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
    svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    svg.appendChild(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, fmtCompact(y1)));
    svg.appendChild(svgEl("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, fmtCompact(y0)));
    svg.appendChild(svgEl("text", { x: left, y: H - 4 }, opts.xLabelLeft || ""));
    svg.appendChild(svgEl("text", { x: W - right, y: H - 4, "text-anchor": "end" }, opts.xLabelRight || ""));
    return {
      sx: (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right),
      sy: (y) => top + (1 - (y - y0) / (y1 - y0)) * (H - top - bottom),
      floor: H - bottom,
    };
  }

  function chartEmpty(svg, text) {
    const vb = svg.viewBox.baseVal;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    svg.appendChild(svgEl("text", { x: vb.width / 2, y: vb.height / 2, "text-anchor": "middle" }, text));
  }

  function pathOf(points, f) {
    return points.map((p, i) => `${i ? "L" : "M"}${f.sx(p[0]).toFixed(1)},${f.sy(p[1]).toFixed(1)}`).join("");
  }

  /* A message-rate chart: one line with its area, from zero. */
  function drawRate(svg, points, opts) {
    if (!points.length) { chartEmpty(svg, opts.emptyText); return; }
    const xs = points.map((p) => p[0]);
    const f = chartFrame(svg, Math.min(...xs), Math.max(...xs), 0, Math.max(1, ...points.map((p) => p[1])), opts);
    const d = pathOf(points, f);
    const first = points[0];
    const last = points[points.length - 1];
    svg.appendChild(svgEl("path", { d: `${d}L${f.sx(last[0]).toFixed(1)},${f.floor}L${f.sx(first[0]).toFixed(1)},${f.floor}Z`, class: "rate-area" }));
    svg.appendChild(svgEl("path", { d, class: "rate" }));
  }

  /* An asset's readings split where it was silent (see GAP_INTERVALS), oldest first. */
  function runsOf(points) {
    const steps = [];
    for (let i = 1; i < points.length; i++) {
      const step = points[i][0] - points[i - 1][0];
      if (step > 0) steps.push(step);
    }
    steps.sort((a, b) => a - b);
    const usual = steps.length ? steps[Math.floor(steps.length / 2)] : 0;
    const gap = Math.max(GAP_INTERVALS * usual, MIN_GAP_S);
    const runs = [];
    let run = [];
    points.forEach((p, i) => {
      if (i && p[0] - points[i - 1][0] > gap) { runs.push(run); run = []; }
      run.push(p);
    });
    if (run.length) runs.push(run);
    return runs;
  }

  /* The machine chart: one line per asset for the chosen metric, on one scale. */
  function drawMachine(svg, series, metric) {
    const spec = METRICS[metric];
    const byAsset = new Map();
    for (const p of series) {
      const v = p[metric];
      if (v === null || v === undefined) continue;
      const key = p.assetid || "";
      if (!byAsset.has(key)) byAsset.set(key, []);
      byAsset.get(key).push([p.t, v]);
    }
    const lines = [];
    for (const [asset, points] of byAsset) {
      points.sort((a, b) => a[0] - b[0]);
      const runs = runsOf(points);
      if (spec.change) {
        /* A life counter is millions; what it shows is how much it went up. */
        for (const run of runs) {
          const base = run[0][1];
          for (const p of run) p[1] -= base;
        }
      }
      lines.push({ asset, runs, count: points.length });
    }
    lines.sort((a, b) => a.asset.localeCompare(b.asset));
    renderLegend(lines.map((l) => l.asset));
    if (!lines.length) { chartEmpty(svg, "no speed or counters yet"); return; }
    const all = lines.flatMap((l) => l.runs.flat());
    const xs = all.map((p) => p[0]);
    const x0 = Math.min(...xs);
    const x1 = Math.max(...xs);
    const f = chartFrame(svg, x0, x1, Math.min(0, ...all.map((p) => p[1])), Math.max(...all.map((p) => p[1])), {
      xLabelLeft: fmtTime(x0).slice(0, 8), xLabelRight: fmtTime(x1).slice(0, 8),
    });
    for (const line of lines) {
      const info = assetInfo(line.asset);
      const group = svgEl("g", { class: `series asset-c${info.color}`, "data-asset": line.asset, "data-runs": line.runs.length, "data-points": line.count });
      group.appendChild(svgEl("title", null, line.asset || "(no asset id)"));
      const d = line.runs.map((run) => pathOf(run, f)).join("");
      group.appendChild(svgEl("path", { d, class: "line" }));
      for (const run of line.runs) {
        if (run.length === 1) group.appendChild(svgEl("circle", { cx: f.sx(run[0][0]).toFixed(1), cy: f.sy(run[0][1]).toFixed(1), r: 2, class: "dot" }));
      }
      svg.appendChild(group);
    }
  }

  function fmtCompact(n) {
    if (!isFinite(n)) return "";
    const a = Math.abs(n);
    if (a >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
    if (a >= 1e4) return `${(n / 1e3).toFixed(0)}k`;
    if (a >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
    return String(Math.round(n * 10) / 10);
  }

  function drawTotalRate() {
    drawRate($("chart-total-rate"), state.totalRate.slice(-120), {
      xLabelLeft: "2 min ago", xLabelRight: "now", emptyText: "no telemetry yet",
    });
  }

  function drawDeviceCharts() {
    drawRate($("chart-rate"), state.deviceRate.slice(-300), {
      xLabelLeft: "5 min ago", xLabelRight: "now", emptyText: "no messages yet",
    });
    drawMachine($("chart-speed"), state.series, state.metric);
  }

  /* ---------------------------------------------------------------- assets */

  /* Each asset of the selected device keeps its colour while the device is shown; its
   * label drops the prefix all the device's asset ids share (the full id is the title). */
  function assetInfo(id) {
    const key = id || "";
    if (!state.assets.has(key)) {
      state.assets.set(key, { color: state.assets.size % PALETTE_SIZE, label: "" });
      relabelAssets();
    }
    return state.assets.get(key);
  }

  function relabelAssets() {
    const ids = Array.from(state.assets.keys()).filter(Boolean);
    const cut = sharedPrefix(ids);
    for (const [id, info] of state.assets) {
      info.label = !id ? "(no asset id)" : cut ? `…${middle(id.slice(cut), 28)}` : middle(id, 32);
    }
    for (const chip of document.querySelectorAll("#device-panel .asset[data-asset]")) {
      const info = state.assets.get(chip.dataset.asset);
      if (info) chip.textContent = info.label;
    }
  }

  /* Length of the prefix (ending at a separator) that every id has, if worth cutting. */
  function sharedPrefix(ids) {
    if (ids.length < 2) return 0;
    let n = Math.min(...ids.map((id) => id.length));
    for (const id of ids) {
      let i = 0;
      while (i < n && id[i] === ids[0][i]) i++;
      n = i;
    }
    const separator = /[-_.:/ ]/;
    while (n > 0 && !separator.test(ids[0][n - 1])) n--;
    if (ids.some((id) => id.length === n)) return 0;
    /* Keep the shared word before a short distinct tail: "…press-1", not "…1". */
    if (Math.min(...ids.map((id) => id.length - n)) < 4) {
      n--;
      while (n > 0 && !separator.test(ids[0][n - 1])) n--;
    }
    return n >= 8 ? n : 0;
  }

  function middle(text, max) {
    if (text.length <= max) return text;
    const head = Math.ceil((max - 1) / 2);
    return `${text.slice(0, head)}…${text.slice(text.length - (max - 1 - head))}`;
  }

  function assetChip(id) {
    const info = assetInfo(id);
    return el("span", { className: `asset asset-c${info.color}`, title: id || "no asset id", "data-asset": id || "", text: info.label });
  }

  function renderLegend(ids) {
    $("asset-legend").replaceChildren(...ids.map((id) => el("li", null, assetChip(id))));
  }

  function selectMetric(metric) {
    if (!METRICS[metric]) return;
    state.metric = metric;
    for (const b of $("metric").querySelectorAll("button")) b.setAttribute("aria-pressed", String(b.dataset.metric === metric));
    $("machine-hint").textContent = METRICS[metric].hint;
    if (state.selected) drawMachine($("chart-speed"), state.series, metric);
  }

  /* ---------------------------------------------------------------- devices */

  function permissionBadge(perm) {
    if (!perm) return el("span", { className: "badge warn", text: "unknown device" });
    if (!perm.shadow) return el("span", { className: "badge", text: "no shadow" });
    const d = perm.desired;
    const r = perm.reported;
    const text = `${d === true ? "on" : d === false ? "off" : "–"} / ${r === true ? "on" : r === false ? "off" : "–"}`;
    const cls = d === true && r === true ? "badge on" : d === false ? "badge off" : "badge warn";
    return el("span", { className: cls, title: "desired / reported sendTelemetryData", text });
  }

  function renderDevices() {
    const tbody = $("devices").querySelector("tbody");
    const rows = [];
    for (const device of state.devices.values()) {
      const tr = el("tr", { "data-client-id": device.client_id, className: device.client_id === state.selected ? "selected" : null },
        el("td", null, el("span", { className: device.online ? "dot online" : "dot", title: device.online ? "online" : "offline" })),
        el("td", null,
          el("div", { className: "id", text: device.client_id }),
          el("div", { className: "sub", text: `${device.online ? "online" : "offline"} · ${fmtAgo(device.last_seen)}${device.revoked ? " · revoked" : ""}${device.known === false ? " · not provisioned" : ""}${device.quota && device.quota.throttled ? ` · ${fmtNumber(device.quota.throttled)} over quota` : ""}` })),
        el("td", { className: "num", text: fmtNumber(device.received) }),
        el("td", { className: "num", text: fmtNumber(device.valid) }),
        el("td", { className: device.invalid ? "num bad" : "num", text: fmtNumber(device.invalid) }),
        el("td", null, permissionBadge(device.send_telemetry)));
      tr.addEventListener("click", () => selectDevice(device.client_id));
      rows.push(tr);
    }
    tbody.replaceChildren(...rows);
    $("no-devices").hidden = rows.length > 0;
  }

  function renderPending(list) {
    const ul = $("pending");
    ul.replaceChildren(...list.map((p) => el("li", null,
      el("span", { className: "code", text: p.user_code }), " ",
      el("span", { className: "hint", text: `expires ${new Date(p.expires_at).toLocaleTimeString()}` }), " ",
      el("a", { href: safeUrl(p.verification_uri_complete), target: "_blank", rel: "noopener noreferrer", text: "approve…" }))));
    $("no-pending").hidden = list.length > 0;
  }

  function safeUrl(url) {
    try {
      const u = new URL(url, window.location.href);
      return u.protocol === "http:" || u.protocol === "https:" ? u.href : "#";
    } catch (e) {
      return "#";
    }
  }

  function setTotals(t, rate) {
    $("total-received").textContent = fmtNumber(t.received);
    $("total-valid").textContent = fmtNumber(t.valid);
    $("total-invalid").textContent = fmtNumber(t.invalid);
    $("total-duplicates").textContent = fmtNumber(t.duplicates);
    if (rate !== undefined) $("total-rate").textContent = fmtNumber(rate);
  }

  async function loadSummary() {
    try {
      const s = await api("/monitor/api/summary");
      state.onlineWindow = s.online_window;
      if (s.limits) state.limits = s.limits;
      $("online-hint").textContent = `online = sent telemetry within the last ${s.online_window} s`;
      state.devices = new Map(s.devices.map((d) => [d.client_id, d]));
      renderDevices();
      renderPending(s.pending_authorizations || []);
      setTotals(s.totals);
      if (!state.totalRateLoaded) {
        /* Seconds the live stream already reported (it may open first) come after. */
        const last = s.rate.length ? s.rate[s.rate.length - 1][0] : -Infinity;
        state.totalRate = s.rate.map(([sec, n]) => [sec, n]).concat(state.totalRate.filter((p) => p[0] > last));
        state.totalRateLoaded = true;
        drawTotalRate();
      }
      const ing = s.ingestion || {};
      $("ingestion-state").textContent = ing.subscribed
        ? `ingesting ${ing.topic_filter} over ${ing.connections} connection(s)`
        : "ingestion is not connected to the broker";
      if (state.selected && state.devices.has(state.selected)) renderDeviceHead(state.devices.get(state.selected));
    } catch (e) {
      if (e.status !== 401) setConnection("error", `summary failed: ${e.message}`);
    }
  }

  /* ---------------------------------------------------------------- one device */

  function renderDeviceHead(d) {
    $("device-title").textContent = d.client_id;
    const parts = [d.online ? "online" : "offline", `last seen ${fmtAgo(d.last_seen)}`];
    if (d.org_id) parts.push(`org ${d.org_id}`);
    if (d.site_id) parts.push(`site ${d.site_id}`);
    if (d.last_status) parts.push(`status ${d.last_status}`);
    $("device-meta").textContent = parts.join(" · ");
    const warn = $("device-warning");
    const problems = [];
    if (d.known === false) problems.push("This client id is not a provisioned device.");
    if (d.revoked) problems.push("Its certificate is revoked.");
    if (d.topic_problem) problems.push(`Topic: ${d.topic_problem}`);
    warn.textContent = problems.join(" ");
    warn.hidden = problems.length === 0;
    const counters = $("device-counters");
    counters.replaceChildren(
      el("div", null, el("b", { text: fmtNumber(d.received) }), el("span", { text: "received" })),
      el("div", { className: "ok" }, el("b", { text: fmtNumber(d.valid) }), el("span", { text: "valid" })),
      el("div", { className: "bad" }, el("b", { text: fmtNumber(d.invalid) }), el("span", { text: "invalid" })),
      el("div", null, el("b", { text: fmtNumber(d.duplicates) }), el("span", { text: "duplicates" })),
      ...quotaCounters(d.quota));
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    if (n >= 1048576) return `${(n / 1048576).toFixed(1)} MiB`;
    if (n >= 1024) return `${(n / 1024).toFixed(n >= 10240 ? 0 : 1)} KiB`;
    return `${n} B`;
  }

  /* The connection against AWS IoT Core's per-connection quotas (measured by the
   * platform; nothing is refused): last second's rate and bytes, and how many publishes
   * AWS would have throttled. */
  function quotaCounters(q) {
    if (!q) return [];
    const over = (value, limit) => (limit && value > limit ? "quota bad" : "quota");
    const rateTitle = `publishes in the last complete second; busiest second ${fmtNumber(q.peak_rate)}; ${fmtNumber(q.seconds_over)} second(s) over the quota`;
    const items = [];
    if (q.publish_limit) {
      items.push(el("div", { className: over(q.rate, q.publish_limit), id: "device-quota-rate", title: rateTitle },
        el("b", { text: `${fmtNumber(q.rate)} / ${fmtNumber(q.publish_limit)}` }), el("span", { text: `msg/s of quota · peak ${fmtNumber(q.peak_rate)}` })));
    }
    if (q.throughput_limit) {
      items.push(el("div", { className: over(q.bytes_rate, q.throughput_limit), id: "device-quota-throughput", title: `busiest second ${fmtBytes(q.peak_bytes_rate)}` },
        el("b", { text: `${fmtBytes(q.bytes_rate)} / ${fmtBytes(q.throughput_limit)}` }), el("span", { text: `per second of quota · peak ${fmtBytes(q.peak_bytes_rate)}` })));
    }
    items.push(el("div", { className: q.throttled ? "quota bad" : "quota", id: "device-quota-throttled", title: `${fmtBytes(q.throttled_bytes)} in all; AWS IoT Core throttles a connection above its quota` },
      el("b", { text: fmtNumber(q.throttled) }), el("span", { text: "would be throttled" })));
    return items;
  }

  function pretty(value) {
    return value === null || value === undefined ? "—" : JSON.stringify(value, null, 2);
  }

  function renderShadow(shadow) {
    state.shadow = shadow;
    const toggle = $("send-telemetry");
    $("shadow-error").hidden = true;
    if (!shadow) {
      $("shadow-version").textContent = "no shadow";
      ["shadow-desired", "shadow-reported", "shadow-delta"].forEach((id) => { $(id).textContent = "—"; });
      toggle.checked = false;
      toggle.disabled = true;
      $("send-telemetry-state").textContent = "";
      return;
    }
    $("shadow-version").textContent = `version ${shadow.version}`;
    $("shadow-desired").textContent = pretty(shadow.desired);
    $("shadow-reported").textContent = pretty(shadow.reported);
    $("shadow-delta").textContent = pretty(shadow.delta);
    const desired = shadow.desired || {};
    const reported = shadow.reported || {};
    toggle.disabled = false;
    toggle.checked = desired.sendTelemetryData === true;
    const r = reported.sendTelemetryData;
    $("send-telemetry-state").textContent = `(device reports ${r === true ? "on" : r === false ? "off" : "nothing"})`;
    if (!state.editorDirty) {
      $("desired-editor").value = JSON.stringify(desired, null, 2);
      checkEditor();
    }
  }

  async function selectDevice(clientId) {
    state.selected = clientId;
    state.editorDirty = false;
    state.series = [];
    state.assets = new Map();
    $("no-selection").hidden = true;
    $("device-panel").hidden = false;
    $("stream").replaceChildren();
    $("stream-empty").hidden = false;
    $("dropped").textContent = "";
    renderDevices();
    try {
      const d = await api(`/monitor/api/devices/${encodeURIComponent(clientId)}`);
      if (state.selected !== clientId) return;
      renderDeviceHead(d);
      renderShadow(d.shadow);
      state.deviceRate = d.rate.map(([sec, n]) => [sec, n]);
      state.series = d.series;
      const known = new Set([...d.series, ...d.messages].map((m) => m.assetid).filter(Boolean));
      Array.from(known).sort().forEach(assetInfo);
      drawDeviceCharts();
      const messages = d.messages.slice().reverse();
      for (const m of messages) addMessage(Object.assign({ duplicate: false }, m, { t: m.received_at }), true);
    } catch (e) {
      setConnection("error", `device failed: ${e.message}`);
    }
    openStream();
  }

  async function refreshShadow() {
    if (!state.selected) return;
    const id = state.selected;
    try {
      const d = await api(`/monitor/api/devices/${encodeURIComponent(id)}/shadow`);
      if (state.selected === id) renderShadow(d);
    } catch (e) {
      if (e.status === 404 && state.selected === id) renderShadow(null);
    }
  }

  /* ---------------------------------------------------------------- live stream */

  function kindText(m) {
    if (!m.eventtype) return null;
    const version = m.payloadversion === null || m.payloadversion === undefined ? "?" : m.payloadversion;
    return `${m.eventtype}/${m.eventsubtype || "?"} v${version}`;
  }

  function valuesText(m) {
    const parts = [];
    if (m.status) parts.push(m.status);
    if (m.speed !== null && m.speed !== undefined) parts.push(`speed ${fmtNumber(m.speed)}`);
    if (m.productioncounter !== null && m.productioncounter !== undefined) parts.push(`count ${fmtNumber(m.productioncounter)}`);
    if (m.totalproductioncounter !== null && m.totalproductioncounter !== undefined) parts.push(`total ${fmtNumber(m.totalproductioncounter)}`);
    return parts.length ? parts.join(" · ") : null;
  }

  /* One row: time, mark, then what it is, the asset and its values (these wrap on a
   * narrow page; a long asset id is shortened, its full id is the chip's title). */
  function messageLine(m) {
    const kind = kindText(m);
    const values = valuesText(m);
    const summary = el("span", { className: "summary" },
      m.duplicate ? el("span", { className: "flag", text: "duplicate" }) : null,
      kind ? el("span", { className: "kind", text: kind }) : null,
      m.assetid ? assetChip(m.assetid) : null,
      values ? el("span", { className: "values", text: values }) : null,
      !kind && !m.assetid && !values ? el("span", { text: m.valid ? "message" : "unreadable message" }) : null);
    return el("div", { className: "line", title: "click for the JSON" },
      el("span", { className: "time", text: fmtTime(m.t) }),
      el("span", { className: "mark", text: m.valid ? "✓" : "✗", "aria-label": m.valid ? "valid" : "invalid" }),
      summary,
      el("span", { className: "uuid", title: m.sendereventuuid || "", text: short(m.sendereventuuid || "") }));
  }

  function addMessage(m, initial) {
    if (state.invalidOnly && m.valid && !m.topic_problem) return;
    const classes = ["message", m.valid ? "valid" : "invalid"];
    if (m.duplicate) classes.push("duplicate");
    if (m.topic_problem) classes.push("topic-problem");
    const li = el("li", { className: classes.join(" "), "data-id": m.id });
    const line = messageLine(m);
    li.appendChild(line);
    const problems = (m.errors || []).map((e) => el("li", null, el("span", { className: "path", text: e.path }), el("span", { className: "reason", text: e.reason })));
    if (m.topic_problem) problems.push(el("li", null, el("span", { className: "path", text: "topic" }), el("span", { className: "reason", text: m.topic_problem })));
    if (problems.length) li.appendChild(el("ul", { className: "errors" }, ...problems));
    line.addEventListener("click", () => toggleJson(li, m.id));
    const list = $("stream");
    list.insertBefore(li, list.firstChild);
    while (list.childElementCount > MAX_STREAM) list.removeChild(list.lastChild);
    $("stream-empty").hidden = true;
    if (!initial && (m.speed !== null || m.productioncounter !== null || m.totalproductioncounter !== null) && !m.duplicate) {
      state.series.push({ t: m.t, assetid: m.assetid, speed: m.speed, productioncounter: m.productioncounter, totalproductioncounter: m.totalproductioncounter });
      if (state.series.length > MAX_POINTS) state.series.splice(0, state.series.length - MAX_POINTS);
    }
  }

  async function toggleJson(li, id) {
    const open = li.querySelector("pre.json");
    if (open) { open.remove(); return; }
    const pre = el("pre", { className: "json", text: "loading…" });
    li.appendChild(pre);
    if (id === null || id === undefined) { pre.textContent = "not stored"; return; }
    try {
      const m = await api(`/monitor/api/messages/${encodeURIComponent(id)}`);
      let text;
      if (m.body !== undefined) {
        try { text = JSON.stringify(JSON.parse(m.body), null, 2); } catch (e) { text = m.body; }
      } else {
        text = `(not UTF-8; base64) ${m.body_base64}`;
      }
      pre.textContent = text;
    } catch (e) {
      pre.textContent = `could not load: ${e.message}`;
    }
  }

  function openStream() {
    if (state.source) state.source.close();
    const params = new URLSearchParams();
    if (state.selected) params.set("device", state.selected);
    const source = new EventSource(`/monitor/api/stream?${params}`);
    state.source = source;
    let chartDirty = false;
    source.onopen = () => setConnection("live", "live");
    source.onerror = () => setConnection("error", "stream interrupted; retrying…");
    source.addEventListener("message", (ev) => {
      if (state.paused) return;
      const m = JSON.parse(ev.data);
      if (state.selected && m.client_id !== state.selected) return;
      addMessage(m, false);
      chartDirty = true;
    });
    source.addEventListener("dropped", (ev) => {
      const d = JSON.parse(ev.data);
      $("dropped").textContent = `${fmtNumber(d.dropped)} messages skipped in this view (too fast to show; all are stored)`;
    });
    source.addEventListener("stats", (ev) => {
      const s = JSON.parse(ev.data);
      setTotals(s.totals, s.rate);
      const sec = Math.floor(s.now) - 1;
      pushPoint(state.totalRate, [sec, s.rate], 120);
      drawTotalRate();
      for (const [id, c] of Object.entries(s.devices)) {
        const d = state.devices.get(id);
        if (d) Object.assign(d, c);
      }
      renderDevices();
      if (state.selected) {
        const d = state.devices.get(state.selected);
        if (d) renderDeviceHead(d);
        if (s.device_rate !== undefined) pushPoint(state.deviceRate, [sec, s.device_rate], 300);
        chartDirty = true;
      }
      if (chartDirty && state.selected) { drawDeviceCharts(); chartDirty = false; }
    });
  }

  function pushPoint(series, point, keep) {
    if (series.length && series[series.length - 1][0] === point[0]) series[series.length - 1] = point;
    else series.push(point);
    if (series.length > keep) series.splice(0, series.length - keep);
  }

  /* ---------------------------------------------------------------- shadow actions */

  async function sendTelemetry(enabled) {
    const id = state.selected;
    const toggle = $("send-telemetry");
    toggle.disabled = true;
    try {
      const res = await api(`/monitor/api/devices/${encodeURIComponent(id)}/send-telemetry`, {
        method: "POST", body: JSON.stringify({ enabled }),
      });
      if (state.selected === id) renderShadow(res.shadow);
      loadSummary();
    } catch (e) {
      showShadowError(`update rejected: ${e.message}`);
      toggle.checked = !enabled;
    } finally {
      toggle.disabled = false;
    }
  }

  function showShadowError(text) {
    const node = $("shadow-error");
    node.textContent = text;
    node.hidden = false;
  }

  function depth(value) {
    if (value === null || typeof value !== "object") return 0;
    const inner = Object.values(value).map(depth);
    return 1 + (inner.length ? Math.max(...inner) : 0);
  }

  /* Local checks first (JSON, object, nesting, size); the server applies the shadow
   * service's own rules on /validate and again on the update. */
  function checkEditor() {
    const area = $("desired-editor");
    const out = $("desired-validity");
    const save = $("desired-save");
    let value;
    try {
      value = JSON.parse(area.value);
    } catch (e) {
      out.textContent = `not JSON: ${e.message}`;
      out.className = "validity bad";
      area.classList.add("invalid");
      save.disabled = true;
      return null;
    }
    let problem = null;
    if (value === null || typeof value !== "object" || Array.isArray(value)) problem = "desired must be a JSON object";
    else if (depth(value) > state.limits.shadow_depth) problem = `JSON contains too many levels of nesting; maximum is ${state.limits.shadow_depth}`;
    else if (new TextEncoder().encode(JSON.stringify(value)).length > state.limits.shadow_state_bytes) problem = `desired is larger than ${fmtBytes(state.limits.shadow_state_bytes)}`;
    if (problem) {
      out.textContent = problem;
      out.className = "validity bad";
      area.classList.add("invalid");
      save.disabled = true;
      return null;
    }
    out.textContent = "valid JSON";
    out.className = "validity ok";
    area.classList.remove("invalid");
    save.disabled = false;
    return value;
  }

  let validateTimer = null;
  function onEditorInput() {
    state.editorDirty = true;
    const value = checkEditor();
    clearTimeout(validateTimer);
    if (value === null || !state.selected) return;
    const id = state.selected;
    validateTimer = setTimeout(async () => {
      try {
        await api(`/monitor/api/devices/${encodeURIComponent(id)}/shadow/validate`, {
          method: "POST", body: JSON.stringify({ desired: value }),
        });
        if ($("desired-validity").className === "validity ok") $("desired-validity").textContent = "valid shadow update";
      } catch (e) {
        $("desired-validity").textContent = `shadow would reject it: ${e.message}`;
        $("desired-validity").className = "validity bad";
        $("desired-save").disabled = true;
      }
    }, 300);
  }

  async function saveDesired() {
    const value = checkEditor();
    if (value === null) return;
    const id = state.selected;
    // No "version": the device's own reports bump it all the time, and an update only
    // merges the keys it names, so a conflict check would mostly refuse harmless edits.
    const body = { desired: value };
    $("desired-save").disabled = true;
    try {
      const res = await api(`/monitor/api/devices/${encodeURIComponent(id)}/shadow`, {
        method: "POST", body: JSON.stringify(body),
      });
      state.editorDirty = false;
      if (state.selected === id) renderShadow(res.shadow);
      $("desired-validity").textContent = `sent; shadow version ${res.shadow ? res.shadow.version : "?"}`;
    } catch (e) {
      showShadowError(`update rejected: ${e.message}`);
    } finally {
      $("desired-save").disabled = false;
    }
  }

  /* ---------------------------------------------------------------- wiring */

  function init() {
    $("send-telemetry").addEventListener("change", (ev) => sendTelemetry(ev.target.checked));
    for (const b of $("metric").querySelectorAll("button")) b.addEventListener("click", () => selectMetric(b.dataset.metric));
    selectMetric(state.metric);
    $("desired-editor").addEventListener("input", onEditorInput);
    $("desired-save").addEventListener("click", saveDesired);
    $("desired-reset").addEventListener("click", () => {
      state.editorDirty = false;
      renderShadow(state.shadow);
    });
    $("pause").addEventListener("click", (ev) => {
      state.paused = !state.paused;
      ev.target.textContent = state.paused ? "Resume" : "Pause";
    });
    $("clear").addEventListener("click", () => {
      $("stream").replaceChildren();
      $("stream-empty").hidden = false;
    });
    $("invalid-only").addEventListener("change", (ev) => {
      state.invalidOnly = ev.target.checked;
      for (const li of Array.from($("stream").children)) {
        li.hidden = state.invalidOnly && li.classList.contains("valid") && !li.classList.contains("topic-problem");
      }
    });
    loadSummary();
    openStream();
    setInterval(loadSummary, 5000);
    setInterval(refreshShadow, 2000);
  }

  document.addEventListener("DOMContentLoaded", init);
})();
