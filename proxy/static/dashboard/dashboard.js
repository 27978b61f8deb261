// capproxy spend dashboard. Reads the spend API with the token kept in this tab's
// session storage; builds every element with the DOM (no HTML from data, no inline
// script or style: the page's Content-Security-Policy allows neither). Refreshes every
// few seconds (?refresh=<ms> to change it) and keeps the last figures when the store
// does not answer.
"use strict";

(function () {
  const TOKEN_KEY = "capproxy.dashboard.token";
  const SVG = "http://www.w3.org/2000/svg";
  const params = new URLSearchParams(window.location.search);
  const REFRESH_MS = Math.max(250, Number(params.get("refresh")) || 5000);
  const PALETTE = ["#2f6fd6", "#2f9e61", "#e36b0a", "#9b4dca", "#d0312d", "#0f9bb0",
    "#b7791f", "#d6336c", "#5c7cfa", "#37b24d", "#868e96", "#f08c00"];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    mode: null, // "admin" | "tenant"
    range: "hour",
    chartTenant: "",
    tenants: [],
    history: { hour: null, day: null },
    rejections: [],
    fetchedAt: 0, // performance.now() of the last good overview
    updated: null, // Date of the last good refresh
    timer: null,
    generation: 0, // bumped at sign-in/out: answers of an older session are dropped
  };

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  async function api(path) {
    const url = new URL("api/v1/" + path, document.baseURI);
    let resp;
    try {
      resp = await fetch(url, {
        headers: { Authorization: "Bearer " + state.token },
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, "unreachable", "The proxy did not answer.");
    }
    let body = null;
    try {
      body = await resp.json();
    } catch (err) {
      body = null;
    }
    if (!resp.ok) {
      const error = (body && body.error) || {};
      throw new ApiError(resp.status, error.code || "", error.message || resp.statusText);
    }
    return body;
  }

  // --- formatting ----------------------------------------------------------------------

  function usd(value) {
    const v = Number(value);
    if (v === 0) return "$0";
    if (Math.abs(v) >= 0.01) {
      return "$" + v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    }
    return "$" + v.toFixed(6).replace(/0+$/, "");
  }

  function duration(secs) {
    secs = Math.max(0, Math.round(secs));
    const d = Math.floor(secs / 86400);
    const h = Math.floor((secs % 86400) / 3600);
    const m = Math.floor((secs % 3600) / 60);
    const s = secs % 60;
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + s + "s";
    return s + "s";
  }

  function clock(date) {
    return date.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- sign-in -------------------------------------------------------------------------

  function showSignIn(message) {
    state.generation += 1;
    clearTimeout(state.timer);
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("board").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in").hidden = false;
    $("status").textContent = "";
    const error = $("sign-in-error");
    error.hidden = !message;
    error.textContent = message || "";
    $("token").focus();
  }

  function startBoard(token) {
    state.generation += 1;
    state.token = token;
    state.mode = null;
    state.tenants = [];
    state.history = { hour: null, day: null };
    state.rejections = [];
    state.updated = null;
    $("sign-in").hidden = true;
    $("sign-out").hidden = false;
    $("board").hidden = true;
    $("tenants").replaceChildren();
    refresh(state.generation);
  }

  // --- refresh -------------------------------------------------------------------------

  async function loadOverview() {
    if (state.mode !== "tenant") {
      try {
        const body = await api("tenants");
        state.mode = "admin";
        return body.tenants;
      } catch (err) {
        if (!(err instanceof ApiError && err.status === 403)) throw err;
        state.mode = "tenant"; // a tenant key: its own tenant only
      }
    }
    return [await api("costs/current")];
  }

  async function refresh(generation) {
    if (generation !== state.generation) return;
    try {
      const tenants = await loadOverview();
      const [hour, day, rejections] = await Promise.all([
        api("costs/history?granularity=hour"),
        api("costs/history?granularity=day"),
        api("rejections"),
      ]);
      if (generation !== state.generation) return;
      state.tenants = tenants;
      state.history = { hour, day };
      state.rejections = rejections.rejections;
      state.fetchedAt = performance.now();
      state.updated = new Date();
      setDown(null);
      render();
    } catch (err) {
      if (generation !== state.generation) return;
      if (err instanceof ApiError && err.status === 401) {
        showSignIn("That token was not accepted: check the admin token or tenant key.");
        return;
      }
      if (err instanceof ApiError && state.updated === null && err.status !== 503 && err.status !== 0) {
        showSignIn(err.message);
        return;
      }
      setDown(err);
    }
    state.timer = setTimeout(() => refresh(generation), REFRESH_MS);
  }

  function setDown(err) {
    const banner = $("store-down");
    const status = $("status");
    $("board").hidden = false;
    if (!err) {
      banner.hidden = true;
      status.classList.remove("down");
      status.textContent = "Live · updated " + clock(state.updated);
      document.body.dataset.store = "up";
      return;
    }
    const since = state.updated ? " Figures below are from " + clock(state.updated) + "." : "";
    const what = err.status === 503
      ? "The spend store is not answering (" + (err.code || "store_unavailable") + ")."
      : err.status === 0 ? "The proxy is not answering." : err.message;
    banner.textContent = what + since + " Retrying every " + duration(REFRESH_MS / 1000) + ".";
    banner.hidden = false;
    status.classList.add("down");
    status.textContent = err.status === 503 ? "Store down" : "Proxy unreachable";
    document.body.dataset.store = "down";
  }

  // --- tenants overview ------------------------------------------------------------------

  function windowState(w) {
    const spent = Number(w.current_spend_usd);
    const hard = Number(w.hard_limit_usd);
    const soft = w.soft_limit_usd === null ? null : Number(w.soft_limit_usd);
    if (spent >= hard) return "over";
    if (soft !== null && spent >= soft) return "soft";
    if (spent >= 0.8 * hard) return "warn";
    return "ok";
  }

  const RANK = { ok: 0, warn: 1, soft: 2, over: 3 };

  function windowRow(w, scope) {
    const spent = Number(w.current_spend_usd);
    const held = Number(w.held_usd);
    const hard = Number(w.hard_limit_usd);
    const scale = Math.max(hard, spent + held) || 1;
    const status = windowState(w);
    const bar = el("div", {
      class: "bar",
      role: "meter",
      "aria-valuemin": 0,
      "aria-valuemax": hard,
      "aria-valuenow": spent,
      "aria-label": scope + " " + w.window,
    });
    const fill = el("div", { class: "fill " + status });
    fill.style.width = (100 * Math.min(spent, scale)) / scale + "%";
    const hold = el("div", { class: "held" });
    hold.style.left = (100 * spent) / scale + "%";
    hold.style.width = (100 * held) / scale + "%";
    bar.append(hold, fill);
    if (w.soft_limit_usd !== null) {
      const mark = el("div", { class: "mark soft-mark", title: "soft limit " + usd(w.soft_limit_usd) });
      mark.style.left = (100 * Number(w.soft_limit_usd)) / scale + "%";
      bar.append(mark);
    }
    if (scale > hard) {
      const mark = el("div", { class: "mark", title: "hard limit " + usd(hard) });
      mark.style.left = (100 * hard) / scale + "%";
      bar.append(mark);
    }
    const used = Number(w.utilization_pct);
    const pct = (used > 0 && used < 0.1 ? "< 0.1" : used.toFixed(1)) + " %";
    const text = el("div", { class: "window-text" },
      el("b", { text: usd(spent) }), " of " + usd(hard) + " · " + pct,
      held > 0 ? " · " + usd(held) + " held" : null,
      el("span", { class: "reset", "data-resets": w.resets_in_secs }));
    return el("div", {
      class: "window",
      "data-state": status,
      "data-window": w.window,
      "data-scope": scope,
      "data-spend-usd": w.current_spend_usd,
    }, el("span", { class: "window-name", text: w.window + (scope === "tenant" ? "" : " · " + scope) }), bar, text);
  }

  function renderTenants() {
    const totals = new Map();
    for (const s of (state.history.day || { series: [] }).series) totals.set(s.tenant_id, s);
    const rows = state.tenants.map((t) => {
      const rows = [
        ...t.tenant_windows.map((w) => windowRow(w, "tenant")),
        ...t.windows.map((w) => windowRow(w, "agent " + t.agent_id)),
      ];
      const worst = rows.reduce((acc, r) => (RANK[r.dataset.state] > RANK[acc] ? r.dataset.state : acc), "ok");
      const sums = totals.get(t.tenant_id);
      const name = el("div", {},
        el("div", { class: "tenant-name" }, el("span", { class: "state " + worst }), t.tenant_id),
        el("div", { class: "tenant-totals" },
          "today ", el("b", { class: "today", text: sums ? usd(sums.today_usd) : "–" }),
          " · month ", el("b", { class: "month", text: sums ? usd(sums.month_usd) : "–" })));
      const windows = el("div", { class: "windows" }, ...rows);
      if (!rows.length) windows.append(el("p", { class: "hint", text: "No budget caps apply." }));
      return el("div", { class: "tenant", "data-tenant": t.tenant_id, "data-state": worst }, name, windows);
    });
    $("tenants").replaceChildren(...rows);
    $("overview-title").textContent = state.mode === "admin" ? "Tenants" : "Tenant";
    tick();
  }

  function tick() {
    const elapsed = (performance.now() - state.fetchedAt) / 1000;
    for (const node of document.querySelectorAll(".reset[data-resets]")) {
      node.textContent = "resets in " + duration(Number(node.dataset.resets) - elapsed);
    }
  }

  // --- history chart ---------------------------------------------------------------------

  function colourOf(tenantId) {
    const ids = state.tenants.map((t) => t.tenant_id).sort();
    const i = ids.indexOf(tenantId);
    return PALETTE[(i < 0 ? ids.length : i) % PALETTE.length];
  }

  function axisLabel(start, range) {
    const d = new Date(start * 1000);
    if (range === "hour") return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return d.toLocaleDateString([], { month: "short", day: "numeric" });
  }

  function niceMax(v) {
    if (v <= 0) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function renderChart() {
    const data = state.history[state.range];
    const select = $("chart-tenant");
    const ids = state.tenants.map((t) => t.tenant_id);
    const wanted = ["", ...ids];
    if (select.options.length !== wanted.length || [...select.options].some((o, i) => o.value !== wanted[i])) {
      select.replaceChildren(el("option", { value: "", text: "All tenants" }),
        ...ids.map((id) => el("option", { value: id, text: id })));
      if (!ids.includes(state.chartTenant)) state.chartTenant = "";
      select.value = state.chartTenant;
    }
    select.parentElement.hidden = ids.length < 2;
    if (!data) return;
    const series = data.series.filter((s) => !state.chartTenant || s.tenant_id === state.chartTenant);
    const starts = data.bucket_starts;
    // Drawn at the size it is shown, so that its text stays readable on a phone.
    const W = Math.max(320, Math.round($("chart").clientWidth) || 960);
    const H = W < 600 ? 200 : 260, L = 64, R = 12, T = 12, B = 28;
    const sums = starts.map((_, i) => series.reduce((a, s) => a + Number(s.spend_usd[i]), 0));
    const top = niceMax(Math.max(0, ...sums));
    const bw = (W - L - R) / starts.length;
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const root = svg("svg", {
      viewBox: "0 0 " + W + " " + H,
      role: "img",
      "aria-label": "Spend per " + state.range,
      "data-range": state.range,
    });
    for (let k = 0; k <= 4; k++) {
      const v = (top * k) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis", x: L - 6, y: y(v) + 4, "text-anchor": "end" }, usd(v)));
    }
    const every = (state.range === "hour" ? 6 : 15) * (W < 600 ? 2 : 1);
    starts.forEach((start, i) => {
      if ((starts.length - 1 - i) % every === 0) {
        const last = i === starts.length - 1;
        root.append(svg("text", {
          class: "axis",
          x: last ? W - R : L + bw * (i + 0.5),
          y: H - 8,
          "text-anchor": last ? "end" : "middle",
        }, axisLabel(start, state.range)));
      }
      let base = 0;
      for (const s of series) {
        const v = Number(s.spend_usd[i]);
        if (v <= 0) continue;
        const rect = svg("rect", {
          x: L + bw * i + 1,
          width: Math.max(1, bw - 2),
          y: y(base + v),
          height: Math.max(1, y(base) - y(base + v)),
          fill: colourOf(s.tenant_id),
          "data-tenant": s.tenant_id,
        });
        rect.append(svg("title", {}, s.tenant_id + " · " + axisLabel(start, state.range) + " · " + usd(v)));
        root.append(rect);
        base += v;
      }
    });
    $("chart").replaceChildren(root);
    $("chart-legend").replaceChildren(...series.map((s) => el("li", { "data-tenant": s.tenant_id, "data-total-usd": s.total_usd },
      el("span", { class: "swatch", "data-colour": colourOf(s.tenant_id) }),
      s.tenant_id + " ", el("b", { text: usd(s.total_usd) }),
      state.range === "hour" ? " in 48 hours" : " in 90 days")));
    for (const sw of document.querySelectorAll("#chart-legend .swatch")) sw.style.background = sw.dataset.colour;
  }

  // --- rejections ------------------------------------------------------------------------

  function renderRejections() {
    const today = new Date().toDateString();
    const rows = state.rejections.map((r) => {
      const when = new Date(r.time * 1000);
      const time = when.toDateString() === today ? clock(when) : when.toLocaleString();
      return el("tr", { "data-code": r.code },
        el("td", { text: time }),
        el("td", { class: "col-tenant", text: r.tenant_id }),
        el("td", { text: r.agent_id }),
        el("td", { text: r.model }),
        el("td", { class: "code", text: r.code }),
        el("td", { text: r.windows.join(", ") || "–" }));
    });
    document.querySelector("#rejections tbody").replaceChildren(...rows);
    $("no-rejections").hidden = rows.length > 0;
  }

  function render() {
    document.body.classList.toggle("tenant-mode", state.mode === "tenant");
    renderTenants();
    renderChart();
    renderRejections();
  }

  // --- wiring ------------------------------------------------------------------------------

  function setRange(range) {
    state.range = range;
    for (const r of ["hour", "day"]) {
      const b = $("range-" + r);
      b.classList.toggle("on", r === range);
      b.setAttribute("aria-pressed", String(r === range));
    }
    renderChart();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("sign-in-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      $("token").value = "";
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("sign-in-error").hidden = true;
      startBoard(token);
    });
    $("sign-out").addEventListener("click", () => showSignIn(null));
    $("range-hour").addEventListener("click", () => setRange("hour"));
    $("range-day").addEventListener("click", () => setRange("day"));
    $("chart-tenant").addEventListener("change", (event) => {
      state.chartTenant = event.target.value;
      renderChart();
    });
    setInterval(tick, 1000);
    let resized = null;
    window.addEventListener("resize", () => {
      clearTimeout(resized);
      resized = setTimeout(renderChart, 150);
    });
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) startBoard(saved);
    else showSignIn(null);
  });
})();
