// The status page: polls /status/data.json and draws the numbers, tables and SVG charts.
// No libraries. A token (when the admin API has one) comes from "#token=..." or a prompt, and
// stays in this tab's sessionStorage.
"use strict";
(function () {
  const POLL_MS = 2000;
  const $ = (id) => document.getElementById(id);
  const live = [];  // points added between server samples, so the charts move at each poll

  function token() {
    const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
    if (m) { sessionStorage.setItem("fastrelay-token", decodeURIComponent(m[1])); history.replaceState(null, "", location.pathname); }
    return sessionStorage.getItem("fastrelay-token");
  }

  async function api(method, path, body) {
    const headers = {};
    const t = token();
    if (t) headers["Authorization"] = "Bearer " + t;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => ({ error: { message: "HTTP " + r.status } }));
    if (r.status === 401) {
      const t2 = window.prompt("Admin token");
      if (t2) sessionStorage.setItem("fastrelay-token", t2);
    }
    if (!r.ok) throw new Error((data.error && data.error.message) || ("HTTP " + r.status));
    return data;
  }

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "onclick") e.addEventListener("click", v); else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }

  function fmtBytes(n) {
    const u = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return n.toFixed(i ? 1 : 0) + " " + u[i];
  }

  function svgChart(series, colors, width, height) {
    // series: arrays of [t, value]; a line per series, with a common scale and a max label.
    const NS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("width", width); svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const pts = series.flat();
    if (!pts.length) return svg;
    const t0 = Math.min(...pts.map((p) => p[0])), t1 = Math.max(...pts.map((p) => p[0]));
    const vmax = Math.max(1, ...pts.map((p) => p[1]));
    const x = (t) => 30 + (t1 > t0 ? (t - t0) / (t1 - t0) : 1) * (width - 40);
    const y = (v) => height - 15 - (v / vmax) * (height - 25);
    series.forEach((s, i) => {
      if (!s.length) return;
      const path = document.createElementNS(NS, "polyline");
      path.setAttribute("points", s.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" "));
      path.setAttribute("fill", "none"); path.setAttribute("stroke", colors[i]); path.setAttribute("stroke-width", "2");
      svg.append(path);
    });
    const label = document.createElementNS(NS, "text");
    label.setAttribute("x", 2); label.setAttribute("y", 12); label.setAttribute("font-size", "10");
    label.textContent = String(Math.round(vmax));
    svg.append(label);
    return svg;
  }

  function destName(s) {
    if (s.domain && s.binding) return s.binding + "::" + s.domain;
    return s.domain || ("binding " + s.binding);
  }

  async function resume(s) {
    const q = new URLSearchParams();
    if (s.domain) q.set("domain", s.domain);
    if (s.binding) q.set("binding", s.binding);
    await act(() => api("DELETE", "/api/v1/suspensions?" + q.toString()));
  }

  async function act(fn) {
    try { await fn(); $("problem").textContent = ""; } catch (e) { $("problem").textContent = e.message; }
    await refresh();
  }

  function render(d) {
    $("total").textContent = d.total;
    for (const k of ["ready", "deferred", "held", "in_delivery"]) $(k).textContent = d.by_state[k];
    $("conns").textContent = d.connections ? `${d.connections.inbound} / ${d.connections.outbound}` : "–";
    $("disk").textContent = d.disk ? `${fmtBytes(d.disk.spool_bytes)} used, ${fmtBytes(d.disk.free_bytes)} free` : "–";

    const tb = $("domains").tBodies[0];
    tb.replaceChildren(...d.top_domains.map((r) => el("tr", { "data-domain": r.domain },
      el("td", {}, r.domain), el("td", { class: "n" }, r.total), el("td", { class: "n" }, r.by_state.ready),
      el("td", { class: "n" }, r.by_state.deferred), el("td", { class: "n" }, r.by_state.held),
      el("td", { class: "n" }, r.by_state.in_delivery), el("td", { class: "err", title: r.last_error || "" }, r.last_error || ""),
      el("td", {}, el("button", { type: "button", class: "suspend-row", onclick: () => act(() => api("POST", "/api/v1/suspensions", { domain: r.domain })) }, "suspend")))));

    const sb = $("suspended").tBodies[0];
    sb.replaceChildren(...d.suspended.map((s) => el("tr", { "data-dest": destName(s) },
      el("td", {}, destName(s)), el("td", {}, s.until ? new Date(s.until * 1000).toLocaleString() : "until resumed"),
      el("td", {}, el("button", { type: "button", class: "resume", onclick: () => resume(s) }, "resume")))));

    const last = d.history.length ? d.history[d.history.length - 1] : null;
    const bb = $("bindings").tBodies[0];
    const per = last ? 60 / last.interval : 1;
    bb.replaceChildren(...Object.entries(last ? last.bindings : {}).map(([b, ev]) => el("tr", {},
      el("td", {}, b), ...["received", "delivered", "deferred", "bounced", "transferred"].map((k) => el("td", { class: "n" }, Math.round(ev[k] * per))))));

    live.push([d.time, d.total]);
    while (live.length > 300) live.shift();
    const since = d.history.length ? d.history[d.history.length - 1].t : 0;
    const qs = d.history.map((h) => [h.t, Object.values(h.queue).reduce((a, b) => a + b, 0)]).concat(live.filter((p) => p[0] > since));
    $("chart-queue").replaceChildren(svgChart([qs], ["#2563eb"], 420, 140));
    const rate = (k) => d.history.map((h) => [h.t, h.events[k] * 60 / h.interval]);
    $("chart-rate").replaceChildren(svgChart([rate("received"), rate("delivered"), rate("deferred")], ["#16a34a", "#2563eb", "#d97706"], 420, 140));
    $("updated").textContent = "updated " + new Date(d.time * 1000).toLocaleTimeString();
    document.body.dataset.loaded = "1";
  }

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try { render(await api("GET", "/status/data.json")); }
    catch (e) { $("problem").textContent = e.message; }
    timer = setTimeout(refresh, POLL_MS);
  }

  $("suspend-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = {};
    const dom = $("suspend-domain").value.trim(), bnd = $("suspend-binding").value.trim(), f = $("suspend-for").value.trim();
    if (dom) body.domain = dom;
    if (bnd) body.binding = bnd;
    if (f) body.for = /^\d+(\.\d+)?$/.test(f) ? Number(f) : f;
    act(async () => { await api("POST", "/api/v1/suspensions", body); $("suspend-domain").value = ""; });
  });
  refresh();
})();
