/* iotref sandbox monitor: vanilla JavaScript, no dependencies, works offline.
 * Every value from the server goes into the page through textContent or SVG attributes,
 * never through innerHTML. */
"use strict";

(function () {
  const CSRF = document.querySelector('meta[name="csrf-token"]').getAttribute("content");
  const MAX_STREAM = 300;
  const MAX_POINTS = 300;

  const state = {
    devices: new Map(),
    selected: null,
    source: null,
    paused: false,
    invalidOnly: false,
    totalRate: [],
    deviceRate: [],
    series: [],
    shadow: null,
    editorDirty: false,
    onlineWindow: 30,
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

  function svgEl(tag, attrs, text) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /* lines: [{points: [[x, y]...], className, area?}] drawn on shared x and per-chart y. */
  function drawChart(svg, lines, opts) {
    const vb = svg.viewBox.baseVal;
    const W = vb.width;
    const H = vb.height;
    const left = 44;
    const right = 8;
    const top = 8;
    const bottom = 18;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const all = lines.flatMap((l) => l.points);
    if (!all.length) {
      svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, opts.emptyText || "no data yet"));
      return;
    }
    const xs = all.map((p) => p[0]);
    let x0 = opts.xMin !== undefined ? opts.xMin : Math.min(...xs);
    let x1 = opts.xMax !== undefined ? opts.xMax : Math.max(...xs);
    if (x1 <= x0) x1 = x0 + 1;
    const scales = lines.map((l) => {
      const ys = l.points.map((p) => p[1]);
      let y0 = l.zero ? 0 : Math.min(...ys);
      let y1 = Math.max(...ys, l.zero ? 1 : -Infinity);
      if (y1 <= y0) { y1 = y0 + 1; }
      return [y0, y1];
    });
    const sx = (x) => left + ((x - x0) / (x1 - x0)) * (W - left - right);
    const mk = (s) => (y) => top + (1 - (y - s[0]) / (s[1] - s[0])) * (H - top - bottom);
    for (let i = 0; i <= 2; i++) {
      const y = top + (i / 2) * (H - top - bottom);
      svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: y, y2: y, class: "grid" }));
    }
    svg.appendChild(svgEl("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
    svg.appendChild(svgEl("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    const main = scales[0];
    svg.appendChild(svgEl("text", { x: left - 4, y: top + 8, "text-anchor": "end" }, fmtCompact(main[1])));
    svg.appendChild(svgEl("text", { x: left - 4, y: H - bottom, "text-anchor": "end" }, fmtCompact(main[0])));
    svg.appendChild(svgEl("text", { x: left, y: H - 4 }, opts.xLabelLeft || ""));
    svg.appendChild(svgEl("text", { x: W - right, y: H - 4, "text-anchor": "end" }, opts.xLabelRight || ""));
    lines.forEach((line, index) => {
      if (!line.points.length) return;
      const sy = mk(scales[index]);
      const d = line.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      if (line.area) {
        const first = line.points[0];
        const last = line.points[line.points.length - 1];
        const area = `${d}L${sx(last[0]).toFixed(1)},${H - bottom}L${sx(first[0]).toFixed(1)},${H - bottom}Z`;
        svg.appendChild(svgEl("path", { d: area, class: `${line.className}-area` }));
      }
      svg.appendChild(svgEl("path", { d, class: line.className }));
    });
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
    const pts = state.totalRate.slice(-120);
    drawChart($("chart-total-rate"), [{ points: pts, className: "rate", area: true, zero: true }], {
      xLabelLeft: "2 min ago", xLabelRight: "now", emptyText: "no telemetry yet",
    });
  }

  function drawDeviceCharts() {
    drawChart($("chart-rate"), [{ points: state.deviceRate.slice(-300), className: "rate", area: true, zero: true }], {
      xLabelLeft: "5 min ago", xLabelRight: "now", emptyText: "no messages yet",
    });
    const s = state.series.slice(-MAX_POINTS);
    const pick = (key) => s.filter((p) => p[key] !== null && p[key] !== undefined).map((p) => [p.t, p[key]]);
    const first = s.length ? s[0].t : 0;
    const last = s.length ? s[s.length - 1].t : 0;
    drawChart($("chart-speed"), [
      { points: pick("speed"), className: "speed", zero: true },
      { points: pick("productioncounter"), className: "count" },
      { points: pick("totalproductioncounter"), className: "total" },
    ], {
      xMin: first, xMax: last, xLabelLeft: first ? fmtTime(first) : "", xLabelRight: last ? fmtTime(last) : "",
      emptyText: "no speed or counters yet",
    });
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
          el("div", { className: "sub", text: `${device.online ? "online" : "offline"} · ${fmtAgo(device.last_seen)}${device.revoked ? " · revoked" : ""}${device.known === false ? " · not provisioned" : ""}` })),
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
      $("online-hint").textContent = `online = sent telemetry within the last ${s.online_window} s`;
      state.devices = new Map(s.devices.map((d) => [d.client_id, d]));
      renderDevices();
      renderPending(s.pending_authorizations || []);
      setTotals(s.totals);
      if (!state.totalRate.length) {
        state.totalRate = s.rate.map(([sec, n]) => [sec, n]);
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
      el("div", null, el("b", { text: fmtNumber(d.duplicates) }), el("span", { text: "duplicates" })));
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

  function summaryText(m) {
    const parts = [];
    if (m.eventtype) parts.push(`${m.eventtype}/${m.eventsubtype || "?"} v${m.payloadversion === null || m.payloadversion === undefined ? "?" : m.payloadversion}`);
    if (m.assetid) parts.push(`asset ${m.assetid}`);
    if (m.status) parts.push(m.status);
    if (m.speed !== null && m.speed !== undefined) parts.push(`speed ${fmtNumber(m.speed)}`);
    if (m.productioncounter !== null && m.productioncounter !== undefined) parts.push(`count ${fmtNumber(m.productioncounter)}`);
    if (m.totalproductioncounter !== null && m.totalproductioncounter !== undefined) parts.push(`total ${fmtNumber(m.totalproductioncounter)}`);
    if (!parts.length) parts.push(m.valid ? "message" : "unreadable message");
    return parts.join(" · ");
  }

  function addMessage(m, initial) {
    if (state.invalidOnly && m.valid && !m.topic_problem) return;
    const classes = ["message", m.valid ? "valid" : "invalid"];
    if (m.duplicate) classes.push("duplicate");
    if (m.topic_problem) classes.push("topic-problem");
    const li = el("li", { className: classes.join(" "), "data-id": m.id });
    const line = el("div", { className: "line", title: "click for the JSON" },
      el("span", { className: "time", text: fmtTime(m.t) }),
      el("span", { className: "mark", text: m.valid ? "✓" : "✗", "aria-label": m.valid ? "valid" : "invalid" }),
      el("span", { className: "summary", text: (m.duplicate ? "duplicate · " : "") + summaryText(m) }),
      el("span", { className: "uuid", text: short(m.sendereventuuid || "") }));
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
      state.series.push({ t: m.t, speed: m.speed, productioncounter: m.productioncounter, totalproductioncounter: m.totalproductioncounter });
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
    else if (depth(value) > 6) problem = "JSON contains too many levels of nesting; maximum is 6";
    else if (new TextEncoder().encode(JSON.stringify(value)).length > 8192) problem = "desired is larger than 8 KB";
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
