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
  const SCOPE_LIMIT = 20; // agents, and end users, read per open tenant row
  const PALETTE = ["#2f6fd6", "#2f9e61", "#e36b0a", "#9b4dca", "#d0312d", "#0f9bb0",
    "#b7791f", "#d6336c", "#5c7cfa", "#37b24d", "#868e96", "#f08c00"];

  const $ = (id) => document.getElementById(id);
  const state = {
    token: null,
    mode: null, // "admin" | "tenant"
    range: "hour",
    chartTenant: "",
    tenants: [],
    expanded: new Set(), // tenants whose agents, model caps and end users are shown
    scopes: new Map(), // open tenant -> { seen: /scopes, agents: [snapshot], users: [snapshot] }
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
    state.expanded = new Set();
    state.scopes = new Map();
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
      await refreshScopes(generation);
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

  // A window of any kind, as its bar shows it: money (a budget) or a count (a rate cap).
  function spendView(w) {
    return {
      window: w.window,
      unit: "usd",
      raw: w.current_spend_usd,
      spent: Number(w.current_spend_usd),
      held: Number(w.held_usd),
      hard: Number(w.hard_limit_usd),
      soft: w.soft_limit_usd === null ? null : Number(w.soft_limit_usd),
      pct: Number(w.utilization_pct),
      resets: w.resets_in_secs,
    };
  }

  function rateView(r) {
    return {
      window: r.window,
      unit: r.unit,
      raw: r.used,
      spent: Number(r.used),
      held: Number(r.held),
      hard: Number(r.limit),
      soft: null,
      pct: Number(r.utilization_pct),
      resets: r.resets_in_secs,
    };
  }

  function amount(value, unit) {
    return unit === "usd" ? usd(value) : Number(value).toLocaleString("en-US") + " " + unit;
  }

  function windowState(v) {
    if (v.spent >= v.hard) return "over";
    if (v.soft !== null && v.spent >= v.soft) return "soft";
    if (v.spent >= 0.8 * v.hard) return "warn";
    return "ok";
  }

  const RANK = { ok: 0, warn: 1, soft: 2, over: 3 };

  function windowRow(v, scope, label) {
    const scale = Math.max(v.hard, v.spent + v.held) || 1;
    const status = windowState(v);
    const bar = el("div", {
      class: "bar",
      role: "meter",
      "aria-valuemin": 0,
      "aria-valuemax": v.hard,
      "aria-valuenow": v.spent,
      "aria-label": label,
    });
    const fill = el("div", { class: "fill " + status });
    fill.style.width = (100 * Math.min(v.spent, scale)) / scale + "%";
    const hold = el("div", { class: "held" });
    hold.style.left = (100 * v.spent) / scale + "%";
    hold.style.width = (100 * v.held) / scale + "%";
    bar.append(hold, fill);
    if (v.soft !== null) {
      const mark = el("div", { class: "mark soft-mark", title: "soft limit " + amount(v.soft, v.unit) });
      mark.style.left = (100 * v.soft) / scale + "%";
      bar.append(mark);
    }
    if (scale > v.hard) {
      const mark = el("div", { class: "mark", title: "hard limit " + amount(v.hard, v.unit) });
      mark.style.left = (100 * v.hard) / scale + "%";
      bar.append(mark);
    }
    const pct = (v.pct > 0 && v.pct < 0.1 ? "< 0.1" : v.pct.toFixed(1)) + " %";
    const text = el("div", { class: "window-text" },
      el("b", { text: amount(v.spent, v.unit) }), " of " + amount(v.hard, v.unit) + " · " + pct,
      v.held > 0 ? " · " + amount(v.held, v.unit) + " held" : null,
      el("span", { class: "reset", "data-resets": v.resets }));
    return el("div", {
      class: "window",
      "data-state": status,
      "data-window": v.window,
      "data-scope": scope,
      "data-unit": v.unit,
      "data-amount": v.raw,
      "data-spend-usd": v.unit === "usd" ? v.raw : null,
    }, el("span", { class: "window-name", text: label }), bar, text);
  }

  function scopeLabel(window, scope) {
    return scope === "tenant" ? window : window + " · " + scope;
  }

  // The windows of one snapshot (/costs/current or an entry of /tenants), as bars.
  function snapshotRows(snap, { tenantWide }) {
    const rows = [];
    if (tenantWide) {
      for (const w of snap.tenant_windows) rows.push(windowRow(spendView(w), "tenant", w.window));
    }
    const agent = "agent " + snap.agent_id;
    for (const w of snap.windows) rows.push(windowRow(spendView(w), agent, scopeLabel(w.window, agent)));
    for (const r of snap.rate_windows || []) {
      if (!tenantWide && r.scope !== "agent") continue;
      const scope = r.scope === "tenant" ? "tenant" : r.scope + " " + r.scope_id;
      const label = r.window + " " + r.unit + (scope === "tenant" ? "" : " · " + scope);
      rows.push(windowRow(rateView(r), scope, label));
    }
    return rows;
  }

  function inFlight(snap) {
    const parts = [];
    for (const [scope, c] of Object.entries(snap.concurrency || {})) {
      if (c.limit !== null) parts.push(c.in_flight + " of " + c.limit + " in flight (" + scope + ")");
    }
    return parts.length ? el("p", { class: "hint in-flight", text: parts.join(" · ") }) : null;
  }

  function worstOf(rows) {
    return rows.reduce((acc, r) => (RANK[r.dataset.state] > RANK[acc] ? r.dataset.state : acc), "ok");
  }

  function userRows(snap) {
    const scope = "user " + snap.user_id;
    const rows = snap.user_windows.map((w) => windowRow(spendView(w), scope, scopeLabel(w.window, scope)));
    for (const r of snap.rate_windows || []) {
      if (r.scope === "user") rows.push(windowRow(rateView(r), scope, r.window + " " + r.unit + " · " + scope));
    }
    return rows;
  }

  function count(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  // "and 3 more agents": those of today's beyond the ones read (never negative).
  function andMore(kind, total, shown) {
    const n = total - shown;
    return n > 0 ? el("p", { class: "hint and-more", "data-kind": kind, text: "and " + count(n, "more " + kind, "more " + kind + "s") }) : null;
  }

  // What a tenant row opens to: its model caps' windows, then (read while it is open) the
  // windows of the agents and of the end users it named today.
  function moreFor(t) {
    const models = (t.model_cap_windows || []).map((w) => {
      const scope = "model " + w.model_cap;
      return windowRow(spendView(w), scope, scopeLabel(w.window, scope));
    });
    const open = state.expanded.has(t.tenant_id);
    const found = open ? state.scopes.get(t.tenant_id) : undefined;
    const details = el("details", { class: "more", open });
    const what = [];
    if (models.length) what.push(count(models.length, "model cap window", "model cap windows"));
    if (found) {
      what.push(count(found.seen.agents_total, "agent", "agents") + " and " +
        count(found.seen.users_total, "end user", "end users") + " today");
    }
    details.append(el("summary", { text: "Per agent, model cap and end user" + (what.length ? ": " + what.join(", ") : "") }));
    const parts = [...models];
    if (open && !found) parts.push(el("p", { class: "hint", text: "Reading today's agents and end users…" }));
    if (found) {
      // The row itself shows the agent its snapshot is of (_default).
      for (const snap of found.agents.filter((s) => s.agent_id !== t.agent_id)) {
        const rows = snapshotRows(snap, { tenantWide: false });
        if (!rows.length) rows.push(el("p", { class: "hint", text: "agent " + snap.agent_id + ": no caps" }));
        parts.push(el("div", { class: "agent", "data-agent": snap.agent_id }, ...rows));
      }
      parts.push(andMore("agent", found.seen.agents_total, found.seen.agents.length));
      for (const snap of found.users) {
        const rows = userRows(snap);
        if (!rows.length) rows.push(el("p", { class: "hint", text: "user " + snap.user_id + ": no caps" }));
        parts.push(el("div", { class: "user", "data-user": snap.user_id }, ...rows));
      }
      parts.push(andMore("end user", found.seen.users_total, found.seen.users.length));
      if (!found.seen.agents_total && !found.seen.users_total) {
        parts.push(el("p", { class: "hint", text: "No agents or end users named today." }));
      }
    }
    const body = el("div", { class: "windows" }, ...parts);
    details.append(body);
    details.addEventListener("toggle", () => {
      if (details.open === state.expanded.has(t.tenant_id)) return;
      if (details.open) {
        state.expanded.add(t.tenant_id);
        refreshScopes(state.generation).then(renderTenants, () => {});
      } else {
        state.expanded.delete(t.tenant_id);
        state.scopes.delete(t.tenant_id);
      }
      renderTenants();
    });
    return details;
  }

  function renderTenants() {
    const totals = new Map();
    for (const s of (state.history.day || { series: [] }).series) totals.set(s.tenant_id, s);
    const rows = state.tenants.map((t) => {
      const bars = snapshotRows(t, { tenantWide: true });
      const more = moreFor(t);
      const worst = worstOf([...bars, ...more.querySelectorAll(".window")]);
      const sums = totals.get(t.tenant_id);
      const name = el("div", {},
        el("div", { class: "tenant-name" }, el("span", { class: "state " + worst }), t.tenant_id),
        el("div", { class: "tenant-totals" },
          "today ", el("b", { class: "today", text: sums ? usd(sums.today_usd) : "–" }),
          " · month ", el("b", { class: "month", text: sums ? usd(sums.month_usd) : "–" })),
        inFlight(t));
      const windows = el("div", { class: "windows" }, ...bars);
      if (!bars.length) windows.append(el("p", { class: "hint", text: "No budget caps apply." }));
      windows.append(more);
      return el("div", { class: "tenant", "data-tenant": t.tenant_id, "data-state": worst }, name, windows);
    });
    $("tenants").replaceChildren(...rows);
    $("overview-title").textContent = state.mode === "admin" ? "Tenants" : "Tenant";
    tick();
  }

  // The agents and end users each open tenant row named today, with their windows
  // (at most SCOPE_LIMIT of each; a tenant key reads its own tenant, so names none).
  async function readScopes(tenant) {
    const q = state.mode === "admin" ? "tenant_id=" + encodeURIComponent(tenant) + "&" : "";
    const seen = await api("scopes?" + q + "limit=" + SCOPE_LIMIT);
    const read = (param, ids) => Promise.all(ids.map((id) => api("costs/current?" + q + param + "=" + encodeURIComponent(id))));
    const [agents, users] = await Promise.all([read("agent_id", seen.agents), read("user_id", seen.users)]);
    return { seen, agents, users };
  }

  async function refreshScopes(generation) {
    const wanted = [...state.expanded];
    const found = await Promise.all(wanted.map(readScopes));
    if (generation !== state.generation) return;
    wanted.forEach((tenant, i) => {
      if (state.expanded.has(tenant)) state.scopes.set(tenant, found[i]);
    });
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
