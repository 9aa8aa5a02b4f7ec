// The cis490fleet dashboard: polls the JSON API, draws curves from the coordinator's metric history and ranks
// results, renders with DOM calls only (no innerHTML with data, so job names and error texts cannot inject markup).
"use strict";
(() => {
  const POLL_MS = 1500;
  const HISTORY_EVERY = 4;     // a held job's metric history is fetched again every this many polls
  const HISTORY_FETCHES = 8;   // at most this many history requests a poll
  const COMPARE_MAX = 12;      // curves on the shared chart
  const ARM_MS = 4000;
  const TOKEN_KEY = "cis490fleet.operatorToken";
  const STATUSES = ["pending", "claimed", "running", "completed", "failed", "cancelled", "stopped"];
  const CANCELLABLE = new Set(["pending", "claimed", "running"]);
  const REQUEUEABLE = new Set(["failed", "cancelled", "stopped"]);
  // Progress keys that count epochs, steps or shares, not how well a job does (as cis490fleet/results.py has it).
  const BOOKKEEPING = new Set(["epoch", "epochs", "epochs_done", "step", "steps", "fraction", "seed", "total", "done",
    "tree", "trees", "peak_vram_gib", "interrupted"]);

  const state = {
    status: "", model: "", host: "", limit: 50, offset: 0,
    sort: { key: null, dir: 1 },
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    armed: null, armedUntil: 0,
    locked: false,             // the coordinator wants a token for reads and this tab has none
    operator: false,           // the coordinator says this tab's token is an operator's
    data: null,
    skew: 0,                   // server clock minus this browser's clock, in seconds
    polls: 0,
    histories: new Map(),      // job id -> {attempts, poll, held}: the coordinator's history as last fetched
    historyLoads: new Map(),   // job id -> the request in flight
    started: new Map(),        // job id -> {attempts, started}
    compare: new Map(),        // job id -> label: the jobs on the shared chart, in the order picked
    compareMetric: "",
    detailMetric: "",
    results: { sweep: "", model: "", sort: "", order: "", sig: null, body: null, error: "" },
    sweeps: new Set(),
    timer: 0, busy: false, failures: 0, detailId: null,
  };

  const $ = (id) => document.getElementById(id);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k === "dataset") Object.assign(node.dataset, v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function setText(node, text) {
    text = String(text);
    if (node.textContent !== text) node.textContent = text;
  }

  // Children of `parent` kept in the order of `items`, one per key, reused across polls so that focus,
  // hover and half-done clicks survive a refresh.
  function keyed(parent, items, keyOf, build, update) {
    const old = new Map();
    for (const child of Array.from(parent.children)) old.set(child.dataset.key, child);
    let prev = null;
    for (const item of items) {
      const key = keyOf(item);
      let node = old.get(key);
      if (node) old.delete(key);
      else { node = build(item); node.dataset.key = key; }
      update(node, item);
      const want = prev ? prev.nextSibling : parent.firstChild;
      if (node !== want) parent.insertBefore(node, want);
      prev = node;
    }
    for (const node of old.values()) node.remove();
  }

  // -- formatting, as cis490fleet/progress.py does it ----------------------------------------------

  const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

  function fraction(p) {
    if (!p || typeof p !== "object") return null;
    let f = num(p.fraction);
    if (f === null) {
      for (const [d, t] of [["epoch", "epochs"], ["step", "steps"]]) {
        const a = num(p[d]), b = num(p[t]);
        if (a !== null && b) { f = a / b; break; }
      }
    }
    return f === null ? null : Math.max(0, Math.min(1, f));
  }

  function duration(s) {
    s = num(s);
    if (s === null || s < 0) return "-";
    s = Math.round(s);
    const pad = (n) => String(n).padStart(2, "0");
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h${pad(Math.floor(s % 3600 / 60))}m`;
    return `${Math.floor(s / 86400)}d${pad(Math.floor(s % 86400 / 3600))}h`;
  }

  function formatLoss(x) {
    return x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5) ? x.toExponential(3) : x.toFixed(4);
  }

  function describe(p, started, now) {
    if (!p || typeof p !== "object" || !Object.keys(p).length) return "starting";
    const parts = [];
    for (const [d, t] of [["epoch", "epochs"], ["step", "steps"]]) {
      if (p[d] !== undefined && p[d] !== null && typeof p[d] !== "object") {
        parts.push(`${d} ${p[d]}` + (p[t] !== undefined && p[t] !== null && typeof p[t] !== "object" ? `/${p[t]}` : ""));
        break;
      }
    }
    const loss = num(p.loss);
    if (loss !== null) parts.push(`loss ${formatLoss(loss)}`);
    const f = fraction(p);
    if (f !== null) parts.push(`${Math.round(100 * f)}%`);
    let eta = num(p.eta_s);
    if (eta === null && started && f !== null && f > 0 && f < 1 && now > started) eta = (now - started) * (1 - f) / f;
    if (eta !== null && (f === null || f < 1)) parts.push(`ETA ${duration(Math.max(0, eta))}`);
    return parts.join(" ") || "running";
  }

  const short = (id) => String(id || "-").slice(0, 12);
  const serverNow = () => Date.now() / 1000 + state.skew;
  const ago = (t) => (num(t) === null ? "-" : `${duration(Math.max(0, serverNow() - t))} ago`);
  const gib = (v) => (num(v) === null ? "-" : `${v >= 10 ? Math.round(v) : Math.round(v * 10) / 10} GiB`);

  // -- talking to the coordinator ---------------------------------------------------------------------

  function tokenHeaders(headers) {
    if (state.token) { headers["x-read-token"] = state.token; headers["x-operator-token"] = state.token; }
    return headers;
  }

  async function api(path, init) {
    const headers = tokenHeaders({ accept: "application/json" });
    const resp = await fetch(path, Object.assign({ cache: "no-store", headers }, init));
    const date = Date.parse(resp.headers.get("date") || "");
    if (!Number.isNaN(date)) state.skew = 0.8 * state.skew + 0.2 * ((date + 500) / 1000 - Date.now() / 1000);
    let body = null;
    try { body = await resp.json(); } catch (_) { /* not JSON */ }
    if (!resp.ok) {
      const err = new Error((body && body.detail) || `${resp.status} ${resp.statusText}`);
      err.status = resp.status;
      throw err;
    }
    return body;
  }

  function jobsQuery() {
    const q = new URLSearchParams({ limit: String(state.limit), offset: String(state.offset) });
    for (const k of ["status", "model", "host"]) if (state[k]) q.set(k, state[k]);
    return `/v1/jobs?${q}`;
  }

  async function poll() {
    const health = await api("/v1/health");
    // Reads need a token unless the coordinator says they are open: ask for one before asking for data.
    state.locked = !!(health.security && health.security.reads === "token") && !state.token;
    state.operator = health.access === "operator";
    if (state.locked) {
      return { health, workers: [], page: { jobs: [], total: 0 }, running: [], failures: [], failedTotal: 0,
        at: serverNow() };
    }
    const [workers, page, running, claimed, failures, failed] = await Promise.all([
      api("/v1/workers"), api(jobsQuery()),
      api("/v1/jobs?status=running&limit=200"), api("/v1/jobs?status=claimed&limit=200"),
      api("/v1/failures?limit=8"), api("/v1/jobs?status=failed&limit=1"),
    ]);
    if (page.total > 0 && state.offset >= page.total) {
      state.offset = Math.max(0, Math.floor((page.total - 1) / state.limit) * state.limit);
      return poll();
    }
    const data = { health, workers: workers.workers || [], page, running: [...running.jobs, ...claimed.jobs],
      failures: failures.failures || [], failedTotal: failed.total ?? 0, at: serverNow() };
    state.polls += 1;
    await Promise.all([learnStarts(data.running), loadHistories(data.running), loadResults(health)]);
    return data;
  }

  // When each running job's current attempt began, for its ETA: one detail request per new attempt.
  async function learnStarts(running) {
    const live = new Set(running.map((j) => j.id));
    for (const id of Array.from(state.started.keys())) if (!live.has(id)) state.started.delete(id);
    const wanted = running.filter((j) => {
      const known = state.started.get(j.id);
      return !known || known.attempts !== j.attempts;
    }).slice(0, 20);
    await Promise.all(wanted.map(async (j) => {
      try {
        const detail = (await api(`/v1/job/${j.id}`)).job;
        const attempts = detail.attempts || [];
        const startedAt = attempts.length ? attempts[attempts.length - 1].started : null;
        state.started.set(j.id, { attempts: j.attempts, started: num(startedAt) });
      } catch (_) { /* it finished meanwhile; the next poll drops it */ }
    }));
  }

  async function refresh() {
    clearTimeout(state.timer);
    if (document.hidden) { setConn("paused", "paused (tab hidden)"); return; }
    if (state.busy) return;
    state.busy = true;
    try {
      state.data = await poll();
      state.failures = 0;
      render();
      if (state.locked) setConn("paused", "enter a read token or the operator token to see the fleet");
      else setConn("ok", `live · updated ${new Date().toLocaleTimeString()}`);
    } catch (err) {
      if (err.status === 401 && state.token) {
        forgetToken();
        toast(`the coordinator refused the token: ${err.message}`, true);
      }
      state.failures += 1;
      setConn("error", `cannot reach the coordinator: ${err.message}`);
    } finally {
      state.busy = false;
      if (!document.hidden) state.timer = setTimeout(refresh, POLL_MS * Math.min(8, 2 ** Math.max(0, state.failures - 1)));
    }
  }

  function setConn(kind, text) {
    const c = $("conn");
    c.className = `conn ${kind}`;
    setText(c, text);
  }

  let toastTimer = 0;
  function toast(text, bad) {
    const t = $("toast");
    t.textContent = text;
    t.className = bad ? "toast bad" : "toast";
    t.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { t.hidden = true; }, bad ? 8000 : 4000);
  }

  // -- rendering --------------------------------------------------------------------------------------

  function render() {
    const d = state.data;
    if (!d) return;
    renderHeader(d.health);
    renderSummary(d.health, d.workers);
    renderRunning(d.running);
    renderWorkers(d.workers);
    renderPeers(d.health);
    renderFailures(d.failures, d.failedTotal);
    renderJobs(d.page);
    renderCompare();
    renderResults();
    renderDetailChart();
    renderOperator();
  }

  function renderHeader(h) {
    const bits = [h.node_id, h.role, h.term !== undefined ? `term ${h.term}` : null, h.version ? `v${h.version}` : null];
    setText($("node"), bits.filter(Boolean).join(" · "));
  }

  function renderSummary(h, workers) {
    const counts = h.jobs || {};
    const items = [{ key: "", label: "all", n: Object.values(counts).reduce((a, b) => a + b, 0) }]
      .concat(STATUSES.map((s) => ({ key: s, label: s, n: counts[s] || 0 })));
    keyed($("summary"), items, (i) => `s:${i.key}`,
      (i) => el("button", { type: "button", class: `chip s-${i.key || "all"}`, dataset: { status: i.key } },
        el("span", { class: "label", text: i.label }), el("b")),
      (node, i) => {
        setText(node.querySelector("b"), i.n.toLocaleString());
        node.classList.toggle("active", state.status === i.key);
        node.setAttribute("aria-pressed", String(state.status === i.key));
      });
    const live = workers.filter((w) => w.live).length;
    setText($("workers-count"), `${live} live of ${workers.length}`);
  }

  function runCard(job) {
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "loss");
    svg.setAttribute("viewBox", "0 0 320 70");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    return el("div", { class: "run", dataset: { id: job.id } },
      el("div", { class: "run-head" },
        el("button", { type: "button", class: "link", dataset: { detail: job.id }, text: short(job.id) }),
        el("b", { class: "name" }), el("span", { class: "spacer" }), el("span", { class: "acts actions" })),
      el("div", { class: "where muted" }),
      el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100" }, el("span")),
      el("div", { class: "run-text" }),
      svg,
      el("div", { class: "loss-caption" }, el("span"), el("span")));
  }

  function renderRunning(running) {
    const now = serverNow();
    setText($("running-count"), running.length ? String(running.length) : "");
    $("running-empty").hidden = running.length > 0;
    keyed($("running"), running, (j) => j.id, runCard, (node, job) => {
      setText(node.querySelector(".name"), job.name || `seed ${job.seed ?? "?"}`);
      setText(node.querySelector(".where"), `${job.model}/${job.mode} on ${job.host || "?"} · ${job.status}`);
      const f = fraction(job.progress);
      const bar = node.querySelector(".bar");
      bar.classList.toggle("unknown", f === null);
      bar.firstChild.style.width = f === null ? "" : `${(100 * f).toFixed(1)}%`;
      if (f === null) bar.removeAttribute("aria-valuenow"); else bar.setAttribute("aria-valuenow", String(Math.round(100 * f)));
      const known = state.started.get(job.id);
      setText(node.querySelector(".run-text"), describe(job.progress, known && known.started, now));
      drawSpark(node.querySelector("svg"), node.querySelector(".loss-caption"), currentPoints(job));
      renderActions(node.querySelector(".acts"), job);
    });
  }

  function gpuText(cap) {
    const gpus = Array.isArray(cap.gpus) ? cap.gpus : [];
    if (!gpus.length) return [cap.cuda ? "CUDA" : "none"];
    return gpus.map((g) => `${g.name || "GPU " + (g.index ?? "")}${num(g.vram_gib) !== null ? " · " + gib(g.vram_gib) : ""}`);
  }

  function renderWorkers(workers) {
    $("workers-empty").hidden = workers.length > 0;
    $("workers").hidden = workers.length === 0;
    keyed($("workers").tBodies[0], workers, (w) => w.host,
      () => el("tr", {}, el("td", {}, el("span", { class: "dot" }), el("b")), el("td", { class: "num" }),
        el("td", { class: "num" }), el("td"), el("td", { class: "opt" }), el("td", { class: "mono" }), el("td")),
      (tr, w) => {
        const cap = w.capability || {};
        const td = tr.children;
        td[0].firstChild.classList.toggle("live", !!w.live);
        td[0].title = w.live ? "live" : "not seen within the worker timeout";
        setText(td[0].lastChild, w.host);
        setText(td[1], cap.cores ?? "-");
        setText(td[2], gib(cap.ram_gib));
        const gpus = gpuText(cap).join("\n");
        if (td[3].dataset.v !== gpus) {
          td[3].dataset.v = gpus;
          td[3].replaceChildren(...gpus.split("\n").map((g) => el("span", { class: "gpu", text: g })));
        }
        setText(td[4], cap.torch || "-");
        const slots = num(w.slots) !== null ? `/${w.slots}` : "";
        const held = (w.running || []).map((id) => String(id).slice(0, 8));
        setText(td[5], held.length ? `${held.join(" ")} (${held.length}${slots})` : `idle${slots ? " (0" + slots + ")" : ""}`);
        setText(td[6], ago(w.last_seen));
      });
  }

  function renderPeers(h) {
    let peers = Array.isArray(h.peers) && h.peers.length ? h.peers : [{ id: h.node_id, url: h.url }];
    peers = peers.map((p) => {
      const me = p.id === h.node_id;
      const role = p.role || (p.id === h.leader ? "leader" : me ? h.role : null);
      return { ...p, role, me };
    });
    keyed($("peers"), peers, (p) => String(p.id),
      () => el("li", {}, el("span", { class: "star" }), el("b"), el("span", { class: "badge" }),
        el("span", { class: "url muted mono" }), el("span", { class: "me muted" })),
      (li, p) => {
        const [star, name, badge, url, me] = li.children;
        setText(star, p.role === "leader" ? "★" : "");
        star.title = p.role === "leader" ? "leader" : "";
        setText(name, p.id);
        badge.className = `badge s-${p.role || "unknown"}`;
        setText(badge, p.role || "unknown");
        setText(url, p.url || "");
        setText(me, p.me ? "(this peer)" : "");
        li.classList.toggle("leader", p.role === "leader");
      });
  }

  // The newest failed or stale attempts (the server's order), also of jobs still retrying or since completed;
  // the count is of jobs failed for good.
  function renderFailures(failures, total) {
    $("failures-empty").hidden = failures.length > 0;
    setText($("failures-count"), total ? String(total) : "");
    keyed($("failures"), failures, (f) => `${f.job_id}/${f.attempt}`,
      (f) => el("li", {}, el("div", { class: "meta" },
        el("button", { type: "button", class: "link", dataset: { detail: f.job_id }, text: short(f.job_id) }),
        el("b", { class: "name" }), el("span", { class: "where muted" }), el("span", { class: "attempt muted" }),
        el("span", { class: "badge now", title: "the job's status now" }), el("span", { class: "when muted" })),
        el("pre", { class: "err" })),
      (li, f) => {
        setText(li.querySelector(".name"), f.name || "");
        setText(li.querySelector(".where"), `${f.model}/${f.mode} on ${f.host}`);
        setText(li.querySelector(".attempt"), `attempt ${f.attempt} ${f.outcome}`);
        const now = li.querySelector(".now");
        now.className = `badge now s-${f.status}`;
        setText(now, f.status);
        setText(li.querySelector(".when"), ago(f.ended));
        setText(li.querySelector(".err"), f.error || "(no error text)");
      });
  }

  const SORTERS = {
    id: (j) => j.id, name: (j) => j.name || "", model: (j) => `${j.model}/${j.mode}`,
    status: (j) => STATUSES.indexOf(j.status), host: (j) => j.host || "",
    fraction: (j) => fraction(j.progress) ?? -1, attempts: (j) => j.attempts || 0, updated: (j) => j.updated || 0,
  };

  function renderJobs(page) {
    let jobs = page.jobs || [];
    const { key, dir } = state.sort;
    if (key) {
      const f = SORTERS[key];
      jobs = jobs.map((j, i) => [j, i]).sort((a, b) => {
        const x = f(a[0]), y = f(b[0]);
        return (x < y ? -dir : x > y ? dir : 0) || a[1] - b[1];
      }).map((p) => p[0]);
    }
    for (const th of document.querySelectorAll("#jobs th[data-sort]")) {
      if (th.dataset.sort === key) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    $("jobs-empty").hidden = jobs.length > 0;
    keyed($("jobs").tBodies[0], jobs, (j) => j.id,
      (j) => el("tr", {},
        el("td", { class: "id" }, el("input", { type: "checkbox", class: "pick", dataset: { id: j.id },
          title: "draw on the shared chart", "aria-label": `draw job ${short(j.id)} on the shared chart` }),
        el("button", { type: "button", class: "link", dataset: { detail: j.id }, text: short(j.id) })),
        el("td", { class: "name" }), el("td"), el("td", {}, el("span", { class: "badge" })),
        el("td", { class: "opt" }), el("td", {}, el("div", { class: "mini" }, el("div", { class: "bar" }, el("span")), el("small"))),
        el("td", { class: "opt num" }), el("td", { class: "opt muted" }), el("td", {}, el("span", { class: "actions" }))),
      (tr, j) => {
        const td = tr.children;
        const box = td[0].firstChild;
        box.checked = state.compare.has(j.id);
        box.dataset.label = j.name || short(j.id);
        setText(td[1], j.name || "");
        td[1].title = j.name || "";
        setText(td[2], `${j.model}/${j.mode}`);
        const badge = td[3].firstChild;
        badge.className = `badge s-${j.status}`;
        setText(badge, j.status);
        setText(td[4], j.host || "");
        const f = fraction(j.progress);
        const mini = td[5].firstChild;
        mini.hidden = f === null && !(j.status === "running" || j.status === "claimed");
        mini.firstChild.classList.toggle("unknown", f === null);
        mini.firstChild.firstChild.style.width = f === null ? "" : `${(100 * f).toFixed(1)}%`;
        setText(mini.lastChild, f === null ? "" : `${Math.round(100 * f)}%`);
        setText(td[6], j.attempts ?? 0);
        setText(td[7], ago(j.updated));
        renderActions(td[8].firstChild, j);
      });
    const total = page.total ?? jobs.length;
    const first = total ? state.offset + 1 : 0, last = Math.min(state.offset + (page.jobs || []).length, total);
    setText($("range"), `${first.toLocaleString()}–${last.toLocaleString()} of ${total.toLocaleString()}`);
    $("prev").disabled = state.offset === 0;
    $("next").disabled = state.offset + state.limit >= total;
    const models = new Set(jobs.map((j) => j.model).concat(state.data.running.map((j) => j.model)));
    fillDatalist($("models"), models);
    fillDatalist($("hosts"), new Set(state.data.workers.map((w) => w.host)));
  }

  function fillDatalist(list, values) {
    const sorted = Array.from(values).filter(Boolean).sort();
    const sig = sorted.join("\n");
    if (list.dataset.sig === sig) return;
    list.dataset.sig = sig;
    list.replaceChildren(...sorted.map((v) => el("option", { value: v })));
  }

  // -- metric history: the coordinator's, per attempt --------------------------------------------------

  const HELD = new Set(["claimed", "running"]);

  // The history of the jobs on screen (running cards, the shared chart, the open detail). A job nobody
  // holds gets no new points, so its history is fetched once; a held one's again every HISTORY_EVERY polls,
  // and once more when it is let go, for its last points.
  async function loadHistories(running) {
    const held = new Set(running.map((j) => j.id));
    const wanted = new Set([...held, ...state.compare.keys()]);
    if (state.detailId) wanted.add(state.detailId);
    for (const id of Array.from(state.histories.keys())) if (!wanted.has(id)) state.histories.delete(id);
    const due = [...wanted].filter((id) => {
      const h = state.histories.get(id);
      return !h || h.held !== held.has(id) || (h.held && state.polls - h.poll >= HISTORY_EVERY);
    }).sort((a, b) => state.histories.has(a) - state.histories.has(b));
    await Promise.all(due.slice(0, HISTORY_FETCHES).map((id) => loadHistory(id, held.has(id))));
  }

  function loadHistory(id, held) {
    if (!state.historyLoads.has(id)) {
      state.historyLoads.set(id, api(`/v1/job/${encodeURIComponent(id)}/metrics`)
        .then((body) => { state.histories.set(id, { attempts: body.attempts || [], poll: state.polls, held }); })
        .catch(() => { /* finished meanwhile or unreachable: the next poll asks again */ })
        .finally(() => state.historyLoads.delete(id)));
    }
    return state.historyLoads.get(id);
  }

  const METRIC_NAME = /^[A-Za-z0-9_.\-/]{1,64}$/;

  // A progress report's metrics as the coordinator keeps them: finite numbers that are not bookkeeping,
  // those of a nested `metrics` table winning.
  function numbersOf(p) {
    const out = {};
    if (!p || typeof p !== "object") return out;
    for (const table of [p, p.metrics && typeof p.metrics === "object" ? p.metrics : {}]) {
      for (const [k, v] of Object.entries(table)) {
        if (!BOOKKEEPING.has(k) && METRIC_NAME.test(k) && num(v) !== null) out[k] = v;
      }
    }
    return Object.fromEntries(Object.entries(out).sort());
  }

  const pointSig = (p) => JSON.stringify([p.epoch ?? null, p.step ?? null, Object.entries(p.metrics).sort()]);

  // The points of a running job's current attempt: its history, and its newest report when the history
  // (fetched every few polls) does not have it yet.
  function currentPoints(job) {
    const h = state.histories.get(job.id);
    const attempt = h && h.attempts.find((a) => a.attempt === job.attempts);
    const points = attempt ? attempt.points.slice() : [];
    const p = job.progress;
    const live = { t: serverNow(), epoch: num(p && p.epoch), step: num(p && p.step), metrics: numbersOf(p) };
    const last = points[points.length - 1];
    if (Object.keys(live.metrics).length && !(last && pointSig(last) === pointSig(live))) points.push(live);
    return points;
  }

  function metricNames(points) {
    const names = new Set();
    for (const p of points) for (const k of Object.keys(p.metrics || {})) names.add(k);
    return Array.from(names).sort();
  }

  // What to draw when nobody said, as GET /v1/results ranks: val_loss, a validation score, a loss, the first.
  function defaultMetric(names) {
    for (const pick of [names.filter((n) => n === "val_loss"), names.filter((n) => n.startsWith("val_")),
      names.filter((n) => n.includes("loss")), names]) if (pick.length) return pick[0];
    return "";
  }

  // What the curves run along: the epoch when every point has one, else the step, else seconds.
  function axisOf(points) {
    for (const key of ["epoch", "step"]) if (points.length && points.every((p) => num(p[key]) !== null)) return key;
    return "seconds";
  }

  function xy(points, metric, axis) {
    const t0 = points.length ? points[0].t : 0;
    return points.filter((p) => num((p.metrics || {})[metric]) !== null)
      .map((p) => ({ x: axis === "seconds" ? p.t - t0 : p[axis], y: p.metrics[metric] }));
  }

  function svgNode(tag, attrs) {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) n.setAttribute(k, v);
    return n;
  }

  // A running card's small curve: its loss, else the metric a ranking would use.
  function drawSpark(svg, caption, points) {
    const names = metricNames(points);
    const metric = names.includes("loss") ? "loss" : defaultMetric(names);
    const pts = xy(points, metric, axisOf(points));
    const sig = JSON.stringify([metric, pts]);
    if (svg.dataset.sig === sig) return;
    svg.dataset.sig = sig;
    const W = 320, H = 70, top = 4, bottom = H - 2, left = 1, right = W - 1;
    svg.replaceChildren(svgNode("line", { class: "axis", x1: left, y1: bottom, x2: right, y2: bottom }));
    const [lhs, rhs] = caption.children;
    if (pts.length < 2) {
      setText(lhs, pts.length ? `${metric} ${formatLoss(pts[0].y)}` : "no metric reported yet");
      setText(rhs, pts.length ? "curve from the next report" : "");
      svg.setAttribute("aria-label", "curve: not enough reports yet");
      return;
    }
    const xs = pts.map((p) => p.x), ys = pts.map((p) => p.y);
    const x0 = Math.min(...xs), x1 = Math.max(...xs), lo = Math.min(...ys), hi = Math.max(...ys);
    const sx = (x) => left + (right - left) * (x1 > x0 ? (x - x0) / (x1 - x0) : 1);
    const sy = (y) => bottom - (bottom - top) * (hi > lo ? (y - lo) / (hi - lo) : 0.5);
    const line = pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" ");
    svg.append(svgNode("polygon", { class: "area", points: `${sx(x0).toFixed(1)},${bottom} ${line} ${sx(x1).toFixed(1)},${bottom}` }),
      svgNode("polyline", { class: "curve", points: line, "vector-effect": "non-scaling-stroke" }));
    const first = formatLoss(ys[0]), lastY = formatLoss(ys[ys.length - 1]);
    setText(lhs, `${metric} ${first} → ${lastY}`);
    setText(rhs, `min ${formatLoss(lo)} · ${pts.length} reports`);
    svg.setAttribute("aria-label", `${metric} curve over ${pts.length} reports, from ${first} to ${lastY}`);
  }

  // -- charts of one metric, several curves ------------------------------------------------------------

  const CHART_W = 600, CHART_H = 200, COLOURS = 8;

  function makeChart(id, onMetric) {
    const select = el("select", { class: "metric", "aria-label": "metric to draw" });
    select.addEventListener("change", () => onMetric(select.value));
    return el("div", { class: "chart-block", id },
      el("div", { class: "chart-head" }, el("label", {}, "metric ", select), el("span", { class: "chart-note muted" })),
      el("div", { class: "plot" },
        el("div", { class: "y-axis muted" }, el("span"), el("span")),
        svgNode("svg", { class: "chart", viewBox: `0 0 ${CHART_W} ${CHART_H}`, preserveAspectRatio: "none", role: "img" })),
      el("div", { class: "x-axis muted" }, el("span"), el("span"), el("span")),
      el("ul", { class: "legend" }));
  }

  // Draws `series` ([{key, label, detail, points}]: history points) for `wanted`, else for the default
  // metric; returns the metric drawn.
  function drawChart(block, series, wanted) {
    const names = metricNames(series.flatMap((s) => s.points));
    const metric = names.includes(wanted) ? wanted : defaultMetric(names);
    const select = block.querySelector("select.metric");
    if (select.dataset.sig !== names.join("\n")) {
      select.dataset.sig = names.join("\n");
      select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
    }
    select.value = metric;
    select.disabled = names.length < 2;
    const axis = axisOf(series.flatMap((s) => s.points));
    const lines = series.map((s, i) => ({ ...s, cls: `c${i % COLOURS}`, pts: xy(s.points, metric, axis) }));
    const svg = block.querySelector("svg");
    const sig = JSON.stringify([metric, lines.map((l) => [l.key, l.label, l.pts])]);
    if (svg.dataset.sig !== sig) {
      svg.dataset.sig = sig;
      plot(block, svg, lines, metric, axis);
    }
    return metric;
  }

  function plot(block, svg, lines, metric, axis) {
    const all = lines.flatMap((l) => l.pts);
    const [yHi, yLo] = block.querySelector(".y-axis").children;
    const [xLo, xName, xHi] = block.querySelector(".x-axis").children;
    svg.replaceChildren(...[0.25, 0.5, 0.75].map((f) => svgNode("line", { class: "grid", x1: 0, x2: CHART_W,
      y1: CHART_H * f, y2: CHART_H * f, "vector-effect": "non-scaling-stroke" })));
    setText(block.querySelector(".chart-note"), all.length ? `${lines.length} curve${lines.length === 1 ? "" : "s"}`
      : "no metric reported yet");
    svg.setAttribute("aria-label", `${metric || "no metric"} by ${axis}: ${lines.length} curves`);
    const x0 = Math.min(...all.map((p) => p.x)), x1 = Math.max(...all.map((p) => p.x));
    const lo = Math.min(...all.map((p) => p.y)), hi = Math.max(...all.map((p) => p.y));
    const pad = hi > lo ? (hi - lo) * 0.06 : Math.abs(hi) * 0.1 || 1;
    const sx = (x) => (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * CHART_W;
    const sy = (y) => CHART_H - ((y - lo + pad) / (hi - lo + 2 * pad)) * CHART_H;
    for (const l of lines) {
      const pts = l.pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`);
      if (pts.length > 1) {
        svg.append(svgNode("polyline", { class: `curve ${l.cls}`, points: pts.join(" "), "vector-effect": "non-scaling-stroke" }));
      } else if (pts.length === 1) {
        const [x, y] = pts[0].split(",");
        svg.append(svgNode("line", { class: `point ${l.cls}`, x1: x, y1: y, x2: x, y2: y, "vector-effect": "non-scaling-stroke" }));
      }
    }
    setText(yHi, all.length ? formatLoss(hi) : "");
    setText(yLo, all.length ? formatLoss(lo) : "");
    setText(xLo, all.length ? `${axis === "seconds" ? duration(x0) : x0}` : "");
    setText(xName, metric ? `${metric} by ${axis}` : "");
    setText(xHi, all.length ? `${axis === "seconds" ? duration(x1) : x1}` : "");
    keyed(block.querySelector(".legend"), lines, (l) => l.key,
      (l) => el("li", {}, el("span", { class: "swatch" }),
        l.detail ? el("button", { type: "button", class: "link", dataset: { detail: l.detail } }) : el("span"),
        el("span", { class: "muted value" })),
      (li, l) => {
        const [swatch, label, value] = li.children;
        swatch.className = `swatch ${l.cls}`;
        setText(label, l.label);
        const last = l.pts[l.pts.length - 1];
        setText(value, last ? `${formatLoss(last.y)} at ${axis === "seconds" ? duration(last.x) : `${axis} ${last.x}`}`
          : "no points");
      });
  }

  // The shared chart: the jobs picked in the jobs table or from the results, each its latest attempt.
  function renderCompare() {
    const card = $("compare");
    card.hidden = state.compare.size === 0;
    if (card.hidden) return;
    setText($("compare-count"), String(state.compare.size));
    const series = Array.from(state.compare, ([id, label]) => {
      const h = state.histories.get(id);
      const attempts = h ? h.attempts.filter((a) => a.points.length) : [];
      const last = attempts[attempts.length - 1];
      return { key: id, detail: id, points: last ? last.points : [],
        label: last && last.attempt > 1 ? `${label} (attempt ${last.attempt})` : label };
    });
    state.compareMetric = drawChart($("compare-chart"), series, state.compareMetric);
  }

  function pick(id, label, on) {
    if (on && !state.compare.has(id) && state.compare.size >= COMPARE_MAX) {
      toast(`the chart holds ${COMPARE_MAX} curves: unpick one first`, true);
      return false;
    }
    if (on) state.compare.set(id, label); else state.compare.delete(id);
    renderCompare();
    if (on) loadHistory(id, false).then(renderCompare);
    return true;
  }

  function renderDetailChart() {
    const block = $("detail-chart");
    const h = state.detailId && state.histories.get(state.detailId);
    if (!block || !h) return;
    state.detailMetric = drawChart(block, h.attempts.map((a) => ({ key: String(a.attempt), label: `attempt ${a.attempt}`,
      points: a.points })), state.detailMetric);
  }

  // -- results: completed jobs ranked by GET /v1/results -------------------------------------------------

  function resultsQuery(format) {
    const r = state.results, q = new URLSearchParams();
    for (const k of ["sweep", "model", "sort", "order"]) if (r[k]) q.set(k, r[k]);
    if (format) q.set("format", format);
    return `/v1/results${String(q) ? "?" : ""}${q}`;
  }

  // Fetched again only when its query or the number of completed jobs changed.
  async function loadResults(health) {
    const r = state.results;
    const sig = JSON.stringify([resultsQuery(), (health.jobs || {}).completed || 0]);
    if (r.sig === sig) return;
    try {
      r.body = await api(resultsQuery());
      r.error = "";
    } catch (err) {
      if (err.status !== 400) throw err;
      if (r.sort) {  // the metric picked is one no job of these filters reported: rank by the default
        r.sort = "";
        r.order = "";
        return loadResults(health);
      }
      r.body = null;
      r.error = err.message;
    }
    r.sig = sig;
  }

  function cell(v) {
    if (typeof v === "number") return Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)));
    if (typeof v === "string") return v;
    return v === undefined || v === null ? "" : JSON.stringify(v);
  }

  function renderResults() {
    const r = state.results, body = r.body || {};
    const rows = body.results || [];
    for (const row of rows) if (row.sweep) state.sweeps.add(row.sweep);
    fillDatalist($("sweeps"), state.sweeps);
    const hypers = Array.from(new Set(rows.flatMap((row) => Object.keys(row.hyper || {}))));
    const metrics = body.metrics || [];
    const table = $("results-table");
    const head = JSON.stringify([hypers, metrics, body.sort, body.order]);
    if (table.dataset.head !== head) {
      table.dataset.head = head;
      const sorted = body.order === "min" ? "ascending" : "descending";
      table.tHead.replaceChildren(el("tr", {}, ...["name", "id", "model", "seed"].map((h) => el("th", { text: h })),
        ...hypers.map((h) => el("th", { class: "hyper", text: h, title: "hyper value" })),
        ...metrics.map((m) => el("th", { class: "num", dataset: { metric: m }, "aria-sort": m === body.sort ? sorted : null },
          el("button", { type: "button", text: m,
            title: m === body.sort ? `ranked by ${m}, ${body.order === "min" ? "lower" : "higher"} first: click to turn`
              : `rank by ${m}` })))));
    }
    keyed(table.tBodies[0], rows, (row) => `${row.id}\n${head}`,
      (row) => el("tr", {}, el("td", { class: "name", text: row.name || "" }),
        el("td", {}, el("button", { type: "button", class: "link", dataset: { detail: row.id }, text: short(row.id) })),
        el("td", { text: `${row.model}/${row.mode}` }), el("td", { class: "num", text: cell(row.seed) }),
        ...hypers.map((h) => el("td", { class: "mono", text: cell((row.hyper || {})[h]) })),
        ...metrics.map((m) => el("td", { class: m === body.sort ? "num ranked" : "num",
          text: num((row.metrics || {})[m]) === null ? "" : formatLoss(row.metrics[m]) }))),
      () => {});
    setText($("results-count"), rows.length ? String(rows.length) : "");
    const empty = $("results-empty");
    empty.hidden = rows.length > 0;
    setText(empty, r.error || "No completed job matches these filters.");
    $("r-csv").disabled = $("r-chart").disabled = rows.length === 0;
  }

  // Click a metric's column to rank by it (the API's order: lower first for a loss, else higher); again to turn.
  function rankBy(metric) {
    const r = state.results, body = r.body || {};
    r.order = body.sort === metric ? (body.order === "min" ? "max" : "min") : "";
    r.sort = metric;
    refresh();
  }

  // The CSV of the rows shown. A link cannot send the token reads need, so it is fetched and offered as a file.
  async function downloadResults() {
    let blob;
    try {
      const resp = await fetch(resultsQuery("csv"), { cache: "no-store", headers: tokenHeaders({ accept: "text/csv" }) });
      if (!resp.ok) {
        let detail = `${resp.status} ${resp.statusText}`;
        try { detail = (await resp.json()).detail || detail; } catch (_) { /* not JSON */ }
        throw new Error(detail);
      }
      blob = await resp.blob();
    } catch (err) {
      toast(`the CSV download failed: ${err.message}`, true);
      return;
    }
    const url = URL.createObjectURL(blob);
    const name = state.results.sweep ? `results-${state.results.sweep.replace(/[^A-Za-z0-9_.-]+/g, "_")}.csv` : "results.csv";
    const a = el("a", { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  // The rows shown, best first, on the shared chart.
  function chartResults() {
    const rows = (state.results.body || {}).results || [];
    state.compare.clear();
    for (const row of rows.slice(0, COMPARE_MAX)) pick(row.id, row.name || short(row.id), true);
    if (rows.length > COMPARE_MAX) toast(`the chart shows the best ${COMPARE_MAX} of ${rows.length}`);
    $("compare").scrollIntoView({ block: "nearest" });
  }

  // -- operator actions -------------------------------------------------------------------------------

  function armedKey(action, id) { return `${action}:${id}`; }
  function isArmed(key) { return state.armed === key && Date.now() < state.armedUntil; }

  function renderActions(box, job) {
    const wanted = [];
    if (state.operator) {
      if (CANCELLABLE.has(job.status)) wanted.push("cancel");
      if (REQUEUEABLE.has(job.status)) wanted.push("requeue");
    }
    const sig = wanted.map((a) => `${a}${isArmed(armedKey(a, job.id)) ? "!" : ""}`).join(",");
    if (box.dataset.sig === sig) return;
    box.dataset.sig = sig;
    box.replaceChildren(...wanted.map((a) => {
      const armed = isArmed(armedKey(a, job.id));
      return el("button", { type: "button", class: `act ${a}${armed ? " armed" : ""}`, dataset: { action: a, id: job.id },
        title: armed ? `click again to ${a} job ${short(job.id)}` : `${a} job ${short(job.id)}`,
        text: armed ? `confirm ${a}` : a });
    }));
  }

  function renderOperator() {
    const on = !!state.token;
    $("unlock").hidden = on;
    $("locked-actions").hidden = !on;
    const admin = $("admin");
    const armed = isArmed("reload:manifest");
    const sig = state.operator ? `reload${armed ? "!" : ""}` : "";
    if (admin.dataset.sig !== sig) {
      admin.dataset.sig = sig;
      admin.replaceChildren(...(state.operator ? [el("button", { type: "button", class: `act reload${armed ? " armed" : ""}`,
        dataset: { action: "reload", id: "manifest" }, title: "re-read the manifest file and sync the queue",
        text: armed ? "confirm reload" : "reload manifest" })] : []));
    }
  }

  async function act(action, id) {
    const path = action === "reload" ? "/v1/manifest/reload" : `/v1/job/${encodeURIComponent(id)}/${action}`;
    try {
      const body = await api(path, { method: "POST", headers: { "x-operator-token": state.token, accept: "application/json" } });
      if (action === "reload") toast(`manifest reloaded: ${body.added} added, ${body.kept} kept, ${body.removed} removed`);
      else toast(`${action === "cancel" ? "cancelled" : "requeued"} job ${short(id)}`);
    } catch (err) {
      if (err.status === 401) forgetToken();
      toast(`${action} failed: ${err.message}`, true);
    }
    refresh();
  }

  function forgetToken() {
    state.token = "";
    state.operator = false;
    sessionStorage.removeItem(TOKEN_KEY);
    render();
  }

  // -- job detail -------------------------------------------------------------------------------------

  function when(t) {
    if (num(t) === null) return "-";
    return `${new Date((t - state.skew) * 1000).toLocaleString()} (${ago(t)})`;
  }

  async function showDetail(id) {
    const dialog = $("detail");
    state.detailId = id;
    $("detail-body").replaceChildren(el("p", { class: "muted", text: "loading…" }));
    setText($("detail-title"), `Job ${short(id)}`);
    if (!dialog.open) dialog.showModal();
    let job;
    try {
      job = (await api(`/v1/job/${encodeURIComponent(id)}`)).job;
    } catch (err) {
      $("detail-body").replaceChildren(el("p", { class: "err", text: err.message }));
      return;
    }
    if (state.detailId !== id) return;
    setText($("detail-title"), `${job.name || short(job.id)} · ${job.model}/${job.mode}`);
    const kv = el("dl", { class: "kv" });
    const add = (k, v) => kv.append(el("dt", { text: k }), el("dd", {}, v));
    add("id", el("code", { text: job.id }));
    add("status", el("span", { class: `badge s-${job.status}`, text: job.status }));
    add("host", job.host || "-");
    if (job.progress && Object.keys(job.progress).length) add("progress", describe(job.progress, null, serverNow()));
    add("attempts", `${job.attempt_count ?? (job.attempts || []).length} of ${job.max_attempts ?? "?"}`);
    add("seed", String(job.seed ?? "-"));
    add("hyper", el("code", { text: JSON.stringify(job.hyper || {}) }));
    add("created", when(job.created));
    add("updated", when(job.updated));
    if (job.artifact_id) add("artifact", el("code", { text: job.artifact_id }));
    const parts = [kv];
    if ((job.why_pending || []).length) {
      parts.push(el("h2", { text: "Why pending" }), el("ul", {}, ...job.why_pending.map((r) => el("li", { text: r }))));
    }
    parts.push(el("h2", { text: "Curves" }), makeChart("detail-chart", (m) => { state.detailMetric = m; renderDetailChart(); }));
    if ((job.attempts || []).length) {
      // The checkpoint each attempt left; the next attempt resumes from the newest.
      const saved = new Map((job.checkpoints || []).map((c) => [c.attempt, c]));
      const checkpoint = (a) => {
        const c = saved.get(a.number);
        return c ? el("span", { text: c.epoch == null ? "saved" : `epoch ${c.epoch}`,
          title: `${c.size} bytes, ${when(c.created)}, sha256 ${c.sha256}` }) : "";
      };
      const rows = job.attempts.map((a) => el("tr", {}, el("td", { text: String(a.number) }), el("td", { text: a.host || "-" }),
        el("td", { text: when(a.started) }), el("td", { text: a.ended ? duration(a.ended - a.started) : "…" }),
        el("td", { text: a.outcome || "-" }), el("td", { text: a.class || "" }),
        el("td", {}, a.log_size ? el("button", { type: "button", class: "link", text: "log",
          title: `the whole log this attempt handed in (${a.log_size} bytes, gzip)`,
          dataset: { log: String(a.number), job: job.id } }) : ""),
        el("td", {}, checkpoint(a)), el("td", { class: "err", text: a.error || "" })));
      parts.push(el("h2", { text: "Attempts" }), el("div", { class: "scroll" }, el("table", { class: "table" },
        el("thead", {}, el("tr", {}, ...["#", "host", "started", "took", "outcome", "class", "log", "checkpoint", "error"].map((h) => el("th", { text: h })))),
        el("tbody", {}, ...rows))));
      parts.push(el("div", { id: "attempt-log" }));
    }
    if (job.last_error) parts.push(el("h2", { text: "Last error" }), el("pre", { class: "log err", text: job.last_error }));
    if (job.log_tail) parts.push(el("h2", { text: "Log tail" }), el("pre", { class: "log", text: job.log_tail }));
    $("detail-body").replaceChildren(...parts);
    state.histories.delete(id);
    await loadHistory(id, HELD.has(job.status));
    if (state.detailId === id) renderDetailChart();
  }

  // One attempt's whole log, below the attempts table (the server sends it gzip-encoded; fetch unpacks it).
  async function showAttemptLog(id, attempt) {
    const panel = $("attempt-log");
    if (!panel) return;
    panel.replaceChildren(el("p", { class: "muted", text: "loading…" }));
    let text;
    try {
      const resp = await fetch(`/v1/job/${encodeURIComponent(id)}/log?attempt=${encodeURIComponent(attempt)}`,
        { cache: "no-store", headers: tokenHeaders({}) });
      text = await resp.text();
      if (!resp.ok) {
        let detail = text;
        try { detail = JSON.parse(text).detail || text; } catch (_) { /* not JSON */ }
        throw new Error(detail);
      }
    } catch (err) {
      panel.replaceChildren(el("p", { class: "err", text: err.message }));
      return;
    }
    panel.replaceChildren(el("h2", { text: `Log of attempt ${attempt}` }), el("pre", { class: "log", text }));
  }

  // -- wiring -----------------------------------------------------------------------------------------

  function init() {
    const select = $("f-status");
    for (const s of STATUSES) select.append(el("option", { value: s, text: s }));

    document.addEventListener("click", (ev) => {
      const target = ev.target.closest("button");
      if (!target) return;
      if (target.dataset.detail) { showDetail(target.dataset.detail); return; }
      if (target.dataset.log) { showAttemptLog(target.dataset.job, target.dataset.log); return; }
      if (target.dataset.action) {
        const key = armedKey(target.dataset.action, target.dataset.id);
        if (isArmed(key)) {
          state.armed = null;
          render();
          act(target.dataset.action, target.dataset.id);
        } else {
          state.armed = key;
          state.armedUntil = Date.now() + ARM_MS;
          render();
          setTimeout(render, ARM_MS + 50);
        }
        return;
      }
      if (target.classList.contains("chip")) { setFilter("status", target.dataset.status || ""); return; }
      const metricTh = target.closest("th[data-metric]");
      if (metricTh) { rankBy(metricTh.dataset.metric); return; }
      const th = target.closest("th[data-sort]");
      if (th) {
        const key = th.dataset.sort;
        state.sort = state.sort.key === key ? (state.sort.dir > 0 ? { key, dir: -1 } : { key: null, dir: 1 }) : { key, dir: 1 };
        render();
      }
    });

    $("unlock").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const value = $("token").value.trim();
      if (!value) { toast("enter a read token or the operator token the coordinator was started with", true); return; }
      state.token = value;
      sessionStorage.setItem(TOKEN_KEY, value);
      $("token").value = "";
      render();
      renderOperator();
      refresh();
    });
    $("lock").addEventListener("click", forgetToken);

    let debounce = 0;
    const onFilter = () => {
      clearTimeout(debounce);
      debounce = setTimeout(() => {
        state.status = $("f-status").value;
        state.model = $("f-model").value.trim();
        state.host = $("f-host").value.trim();
        state.limit = Number($("f-limit").value) || 50;
        state.offset = 0;
        refresh();
      }, 250);
    };
    for (const id of ["f-status", "f-model", "f-host", "f-limit"]) {
      $(id).addEventListener("input", onFilter);
      $(id).addEventListener("change", onFilter);
    }
    $("filters").addEventListener("submit", (ev) => ev.preventDefault());
    $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); refresh(); });
    $("next").addEventListener("click", () => { state.offset += state.limit; refresh(); });
    $("detail-close").addEventListener("click", () => $("detail").close());
    document.addEventListener("change", (ev) => {
      const box = ev.target.closest("input.pick");
      if (box && !pick(box.dataset.id, box.dataset.label, box.checked)) box.checked = false;
    });
    $("compare").querySelector(".chart-slot").replaceWith(makeChart("compare-chart", (m) => { state.compareMetric = m; renderCompare(); }));
    $("compare-clear").addEventListener("click", () => {
      state.compare.clear();
      for (const box of document.querySelectorAll("input.pick")) box.checked = false;
      renderCompare();
    });
    let resultsDebounce = 0;
    const onResultsFilter = () => {
      clearTimeout(resultsDebounce);
      resultsDebounce = setTimeout(() => {
        state.results.sweep = $("r-sweep").value.trim();
        state.results.model = $("r-model").value.trim();
        refresh();
      }, 250);
    };
    for (const id of ["r-sweep", "r-model"]) $(id).addEventListener("input", onResultsFilter);
    $("r-filters").addEventListener("submit", (ev) => ev.preventDefault());
    $("r-csv").addEventListener("click", downloadResults);
    $("r-chart").addEventListener("click", chartResults);
    $("detail").addEventListener("close", () => { state.detailId = null; });
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) { clearTimeout(state.timer); setConn("paused", "paused (tab hidden)"); } else refresh();
    });
    renderOperator();
    refresh();
  }

  function setFilter(name, value) {
    state[name] = value;
    if (name === "status") $("f-status").value = value;
    state.offset = 0;
    if (state.data) render();
    refresh();
  }

  init();
})();
