// TokenFlow dashboard. It reads only the public HTTP API of the gateway:
// GET /v1/stats every 2 s, the /v1/activity:watch event stream, and
// POST /v1/generate and /v1/simulate for the two forms.
"use strict";

const POLL_MS = 2000;
const REQUEST_TIMEOUT_MS = 5000;
const TREND_POINTS = 90; // three minutes at one point per poll
const FEED_ITEMS = 100;
const UNREACHABLE_STATUSES = [502, 503, 504];
const RECONNECT_MIN_MS = 1000;
const RECONNECT_MAX_MS = 5000;
// With no event to resume from, the feed requests events from this long before
// the page started by the server's clock, so a small clock difference between
// the server and Valkey loses none; the feed skips events it already shows.
const START_MARGIN_MS = 5000;

const EVENT_TYPES = {
  ACTIVITY_TYPE_REQUEST: { label: "request", css: "type-request" },
  ACTIVITY_TYPE_CACHE_HIT: { label: "cache hit", css: "type-hit" },
  ACTIVITY_TYPE_CACHE_MISS: { label: "cache miss", css: "type-miss" },
  ACTIVITY_TYPE_RATE_LIMITED: { label: "rate limited", css: "type-limited" },
};
const RATE_LIMIT_HEADERS = [
  "X-RateLimit-Limit",
  "X-RateLimit-Remaining",
  "X-RateLimit-Reset",
  "RateLimit-Policy",
  "RateLimit",
  "Retry-After",
];
const PALETTE = ["#5fa8ff", "#46c98b", "#f2b84b", "#ff6b6b", "#b48cff", "#4dd0e1", "#ff9f6b", "#9aa4bf"];

const $ = (id) => document.getElementById(id);
const numberFormat = new Intl.NumberFormat("en-US");

// --- formatting ---------------------------------------------------------

function formatCount(value) {
  return numberFormat.format(Number(value || 0));
}

function formatRatio(percent) {
  return `${Number(percent || 0).toFixed(1)} %`;
}

function formatClock(isoTime) {
  const date = new Date(isoTime);
  return Number.isNaN(date.getTime()) ? "" : date.toLocaleTimeString("en-GB", { hour12: false });
}

// Gateway error responses carry a google.rpc.Status in JSON.
async function statusMessage(response) {
  try {
    const status = await response.json();
    if (status && status.message) return `${response.status}: ${status.message}`;
  } catch (error) {
    // Not JSON: fall back to the HTTP status line.
  }
  return `${response.status} ${response.statusText}`;
}

async function fetchWithTimeout(url, options = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    return await fetch(url, { ...options, signal: controller.signal, cache: "no-store" });
  } finally {
    clearTimeout(timer);
  }
}

// --- charts -------------------------------------------------------------

function makeCharts() {
  if (typeof Chart === "undefined") return null;
  Chart.defaults.color = "#9aa4bf";
  Chart.defaults.borderColor = "#2a3450";
  Chart.defaults.animation = false;
  Chart.defaults.maintainAspectRatio = false;

  const trend = new Chart($("chart-trend"), {
    type: "line",
    data: {
      labels: [],
      datasets: [
        { label: "Hit ratio (%)", data: [], borderColor: PALETTE[1], yAxisID: "ratio", pointRadius: 2, tension: 0.25 },
        { label: "Requests per minute", data: [], borderColor: PALETTE[0], yAxisID: "rpm", pointRadius: 2, tension: 0.25 },
      ],
    },
    options: {
      interaction: { mode: "index", intersect: false },
      scales: {
        ratio: { position: "left", min: 0, max: 100, title: { display: true, text: "%" } },
        rpm: { position: "right", beginAtZero: true, ticks: { precision: 0 }, grid: { drawOnChartArea: false }, title: { display: true, text: "req/min" } },
        x: { ticks: { maxTicksLimit: 6 } },
      },
    },
  });
  const keys = new Chart($("chart-keys"), {
    type: "doughnut",
    data: { labels: [], datasets: [{ data: [], backgroundColor: PALETTE, borderWidth: 0 }] },
    options: { plugins: { legend: { position: "right" } } },
  });
  const consumers = new Chart($("chart-consumers"), {
    type: "bar",
    data: { labels: [], datasets: [{ label: "Requests in window", data: [], backgroundColor: PALETTE[0] }] },
    options: { indexAxis: "y", plugins: { legend: { display: false } }, scales: { x: { beginAtZero: true, ticks: { precision: 0 } } } },
  });
  return { trend, keys, consumers };
}

// A null point leaves a gap in the trend for a poll without figures.
function addTrendPoint(trend, label, ratio, rpm) {
  trend.data.labels.push(label);
  trend.data.datasets[0].data.push(ratio);
  trend.data.datasets[1].data.push(rpm);
  if (trend.data.labels.length > TREND_POINTS) {
    trend.data.labels.shift();
    trend.data.datasets.forEach((dataset) => dataset.data.shift());
  }
  trend.update();
}

function updateCharts(charts, stats) {
  addTrendPoint(
    charts.trend,
    formatClock(stats.timestamp),
    Number(stats.cache.hitRatio || 0),
    Number(stats.rateLimit.requestsPerMinute || 0),
  );

  const kinds = Object.entries(stats.keyDistribution || {}).sort((a, b) => a[0].localeCompare(b[0]));
  charts.keys.data.labels = kinds.map(([kind]) => kind);
  charts.keys.data.datasets[0].data = kinds.map(([, count]) => Number(count));
  charts.keys.update();

  const top = stats.rateLimit.topConsumers || [];
  charts.consumers.data.labels = top.map((consumer) => consumer.client);
  charts.consumers.data.datasets[0].data = top.map((consumer) => Number(consumer.requests));
  charts.consumers.update();
}

// Text beside each chart, so the figures are readable without the canvas.
function updateLists(stats) {
  const kinds = Object.entries(stats.keyDistribution || {}).sort((a, b) => a[0].localeCompare(b[0]));
  $("keys-list").replaceChildren(
    ...kinds.map(([kind, count]) => listItem(`${kind}: ${formatCount(count)}`)),
  );
  const top = stats.rateLimit.topConsumers || [];
  $("consumers-list").replaceChildren(
    ...top.map((consumer) => listItem(`${consumer.client}: ${formatCount(consumer.requests)}`)),
  );
}

function listItem(text) {
  const item = document.createElement("li");
  item.textContent = text;
  return item;
}

// --- figures ------------------------------------------------------------

const TILES = {
  "stat-requests-per-minute": (stats) => formatCount(stats.rateLimit.requestsPerMinute),
  "stat-blocked-requests": (stats) => formatCount(stats.rateLimit.blockedRequests),
  "stat-cache-hits": (stats) => formatCount(stats.cache.hits),
  "stat-cache-misses": (stats) => formatCount(stats.cache.misses),
  "stat-hit-ratio": (stats) => formatRatio(stats.cache.hitRatio),
  "stat-cached-keys": (stats) => formatCount(stats.cache.cachedKeys),
  "stat-total-keys": (stats) => formatCount(stats.totalKeys),
};

function showFigures(stats) {
  for (const [id, format] of Object.entries(TILES)) $(id).textContent = format(stats);
  document.querySelector(".tiles").classList.remove("stale");
}

// Never show figures that were not read: blank every tile, list and chart instead.
function blankFigures(charts) {
  for (const id of Object.keys(TILES)) $(id).textContent = "—";
  document.querySelector(".tiles").classList.add("stale");
  $("keys-list").replaceChildren();
  $("consumers-list").replaceChildren();
  if (!charts) return;
  addTrendPoint(charts.trend, formatClock(new Date().toISOString()), null, null);
  for (const chart of [charts.keys, charts.consumers]) {
    chart.data.labels = [];
    chart.data.datasets[0].data = [];
    chart.update();
  }
}

// detail, when given, is the error as received; it shows as the banner's tooltip.
function setConnection(state, text, bannerText, detail) {
  const pill = $("connection");
  pill.textContent = text;
  pill.className = `pill pill-${state}`;
  const banner = $("banner");
  banner.hidden = !bannerText;
  banner.textContent = bannerText || "";
  banner.title = detail || "";
}

class StatsPoller {
  constructor(charts, onFirstReply) {
    this.charts = charts;
    this.onFirstReply = onFirstReply;
    this.updates = 0;
  }

  start() {
    this.poll();
  }

  async poll() {
    try {
      await this.refresh();
    } finally {
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.poll(), POLL_MS);
    }
  }

  // Polls at once, e.g. after a load test, instead of waiting for the timer.
  now() {
    clearTimeout(this.timer);
    this.poll();
  }

  async refresh() {
    let stats = null;
    try {
      const response = await fetchWithTimeout("/v1/stats");
      if (!response.ok) {
        blankFigures(this.charts);
        const detail = await statusMessage(response);
        if (UNREACHABLE_STATUSES.includes(response.status)) {
          setConnection("down", "Server unreachable", `The gateway cannot reach the TokenFlow server (HTTP ${response.status}). Figures return when it is back.`, detail);
        } else {
          setConnection("down", "No figures", `The server could not read its figures: ${detail}`);
        }
      } else {
        stats = await response.json();
      }
    } catch (error) {
      blankFigures(this.charts);
      setConnection("down", "Gateway unreachable", "No response from the gateway. Figures return when it is back.");
    }
    if (stats !== null) this.apply(stats);
    this.updates += 1;
    const stamp = $("updated-at");
    stamp.dataset.updates = String(this.updates);
    if (this.onFirstReply) {
      const first = this.onFirstReply;
      this.onFirstReply = null;
      first(stats);
    }
  }

  apply(stats) {
    const stamp = $("updated-at");
    stamp.dateTime = stats.timestamp;
    stamp.textContent = formatClock(stats.timestamp);
    if (!stats.connected) {
      blankFigures(this.charts);
      setConnection("down", "Valkey down", "Valkey cannot be reached: the server is running but has no figures to show. They return when Valkey does.");
      return;
    }
    setConnection("ok", "Connected", "");
    showFigures(stats);
    updateLists(stats);
    if (this.charts) updateCharts(this.charts, stats);
  }
}

// --- activity feed ------------------------------------------------------

class ActivityFeed {
  constructor() {
    this.lastId = "";
    this.seen = new Set();
    this.source = null;
    this.delay = RECONNECT_MIN_MS;
    this.missed = 0;
  }

  // Fill the feed from GetStats' latest events (newest first), then follow the
  // stream from the newest of them so that no event falls in between.
  start(recent, serverTime) {
    for (const event of (recent || []).slice().reverse()) this.add(event);
    if (!this.lastId) {
      // Stream ids are "<milliseconds>-<sequence>", so a time is a valid place to start.
      const started = Date.parse(serverTime || "") || Date.now();
      this.lastId = `${started - START_MARGIN_MS}-0`;
    }
    this.connect();
  }

  connect() {
    const query = this.lastId ? `?sinceId=${encodeURIComponent(this.lastId)}` : "";
    const source = new EventSource(`/v1/activity:watch${query}`);
    this.source = source;
    this.setState("connecting");
    source.onopen = () => {
      this.delay = RECONNECT_MIN_MS;
      this.setState("live");
    };
    source.onmessage = (message) => this.receive(JSON.parse(message.data));
    // The gateway sends a named "error" event with a google.rpc.Status when the
    // stream ends on an error; the browser's own connection errors carry no data.
    source.addEventListener("error", (event) => {
      if (event.data) {
        const status = JSON.parse(event.data);
        this.setState(`interrupted: ${status.message}`);
      }
      // EventSource retries by itself and sends Last-Event-ID; once it gives
      // up (closed), reconnect here with sinceId and a growing delay.
      if (source.readyState === EventSource.CLOSED) this.retry(source);
      else this.setState("reconnecting");
    });
  }

  retry(source) {
    if (this.source !== source) return;
    source.close();
    this.setState(`reconnecting in ${Math.round(this.delay / 1000)} s`);
    setTimeout(() => this.connect(), this.delay);
    this.delay = Math.min(this.delay * 2, RECONNECT_MAX_MS);
  }

  setState(text) {
    $("feed-state").textContent = text;
  }

  receive(reply) {
    const dropped = Number(reply.dropped || 0);
    if (dropped > 0) {
      this.missed += dropped;
      const note = $("feed-dropped");
      note.hidden = false;
      note.textContent = `${formatCount(this.missed)} events were skipped: they came faster than the server could send them to this page, or left the capped activity stream before it read them.`;
    }
    if (reply.event) this.add(reply.event);
  }

  add(event) {
    if (!event.id || this.seen.has(event.id)) return;
    this.seen.add(event.id);
    this.lastId = event.id;

    const type = EVENT_TYPES[event.type] || { label: event.type, css: "" };
    const item = document.createElement("li");
    item.dataset.eventId = event.id;
    const time = document.createElement("time");
    time.dateTime = event.time;
    time.textContent = formatClock(event.time);
    const label = document.createElement("span");
    label.className = `type ${type.css}`;
    label.textContent = type.label;
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = `${event.client}${event.prompt ? ` · ${event.prompt}` : ""}`;
    item.append(time, label, detail);

    const feed = $("feed");
    feed.prepend(item);
    while (feed.children.length > FEED_ITEMS) {
      this.seen.delete(feed.lastElementChild.dataset.eventId);
      feed.lastElementChild.remove();
    }
  }
}

// --- forms --------------------------------------------------------------

async function postJson(url, body) {
  return fetchWithTimeout(url, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
}

function showError(id, text) {
  const element = $(id);
  element.hidden = !text;
  element.textContent = text || "";
}

function setupTryIt() {
  $("try-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("try-send");
    button.disabled = true;
    showError("try-error", "");
    try {
      const response = await postJson("/v1/generate", { prompt: $("try-prompt").value });
      showRateLimitHeaders(response.headers);
      if (!response.ok) {
        $("try-result").hidden = false;
        $("try-answer").textContent = "";
        $("try-cached").textContent = response.status === 429 ? "rate limited" : "error";
        $("try-cached").className = "badge";
        $("try-model").textContent = "";
        showError("try-error", await statusMessage(response));
        return;
      }
      const reply = await response.json();
      $("try-result").hidden = false;
      $("try-cached").textContent = reply.cached ? "cached" : "generated";
      $("try-cached").className = reply.cached ? "badge badge-cached" : "badge";
      $("try-model").textContent = reply.model;
      $("try-answer").textContent = reply.response;
    } catch (error) {
      showError("try-error", "No response from the gateway: it is down or the request timed out.");
    } finally {
      button.disabled = false;
    }
  });
}

function showRateLimitHeaders(headers) {
  const list = $("try-headers");
  list.replaceChildren();
  if (headers.get("X-RateLimit-Limit") === null) {
    const note = document.createElement("p");
    note.className = "hint";
    note.textContent = "No rate-limit headers: the limit was not applied to this request (the server could not reach Valkey and lets requests through).";
    list.append(note);
    return;
  }
  for (const name of RATE_LIMIT_HEADERS) {
    const value = headers.get(name);
    if (value === null) continue;
    const entry = document.createElement("div");
    const term = document.createElement("dt");
    term.textContent = name;
    const description = document.createElement("dd");
    description.textContent = value;
    description.dataset.header = name.toLowerCase();
    entry.append(term, description);
    list.append(entry);
  }
}

function setupLoadTest(poller) {
  $("sim-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $("sim-run");
    button.disabled = true;
    button.textContent = "Running…";
    showError("sim-error", "");
    try {
      const count = Number($("sim-count").value);
      const response = await postJson("/v1/simulate", { count });
      if (!response.ok) {
        showError("sim-error", await statusMessage(response));
        return;
      }
      const summary = (await response.json()).summary;
      for (const field of ["total", "successful", "blocked", "cached", "failed"]) {
        $(`sim-${field}`).textContent = formatCount(summary[field]);
      }
      $("sim-summary").hidden = false;
      poller.now();
    } catch (error) {
      showError("sim-error", "No response from the gateway: it is down or the request timed out.");
    } finally {
      button.disabled = false;
      button.textContent = "Run load test";
    }
  });
}

// --- start --------------------------------------------------------------

function main() {
  const feed = new ActivityFeed();
  const poller = new StatsPoller(makeCharts(), (stats) =>
    feed.start(stats && stats.connected ? stats.activity : [], stats ? stats.timestamp : ""),
  );
  setupTryIt();
  setupLoadTest(poller);
  poller.start();
}

document.addEventListener("DOMContentLoaded", main);
