// Labelling page: show a pair, take a key, post the judgement, show the prefetched next pair.
// Talks only to the REST API (/api/v1) with the session cookie plus the page's CSRF token.
"use strict";
(() => {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const pairEl = $("pair");
  const undoMs = 1000 * Number(pairEl.dataset.undoSeconds || 0);
  const EMPTY_RETRY_MS = 15000;

  let current = null; // the assignment on screen: {pair_id, prompt, left: {side, url}, right, ...}
  let queue = []; // prefetched assignments, already leased to us
  let prefetching = null; // promise of the running prefetch
  let busy = false; // one judgement or undo in flight at a time
  let shownAt = 0;
  let last = null; // {id, at}: the judgement U would undo
  let counts = { today: 0, total: 0 };

  class ApiError extends Error {
    constructor(status, message, retryAfter = null) { super(message); this.status = status; this.retryAfter = retryAfter; }
  }

  async function api(method, url, body) {
    const options = { method, credentials: "same-origin", headers: { Accept: "application/json", "X-CSRF-Token": csrf } };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(url, options);
    let data = null;
    try { data = await response.json(); } catch (_) { /* empty body */ }
    if (response.status === 401) { window.location.href = "/login"; }
    if (!response.ok) {
      const wait = parseFloat(response.headers.get("Retry-After") || "");
      throw new ApiError(response.status, (data && data.detail) || response.statusText, Number.isFinite(wait) ? wait : null);
    }
    return data;
  }

  // Network failures, and a busy server (503, or 429 with Retry-After), are retried with the same
  // client key, so a judgement is never lost during a database restart and never recorded twice.
  async function withRetry(fn, tries = 6) {
    for (let attempt = 1; ; attempt++) {
      try { return await fn(); } catch (e) {
        const busy = e instanceof ApiError && (e.status === 503 || (e.status === 429 && e.retryAfter !== null));
        if ((e instanceof ApiError && !busy) || attempt >= tries) throw e;
        const seconds = busy && e.retryAfter !== null ? Math.min(e.retryAfter, 10) : 0.5 * attempt;
        status(`Server busy; retrying in ${Math.ceil(seconds)} s (your choice is kept)...`);
        await new Promise((r) => setTimeout(r, 1000 * seconds));
      }
    }
  }

  function clientKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function status(text) { $("status").textContent = text; }

  function renderCounts() {
    $("today").textContent = counts.today;
    $("total").textContent = counts.total;
  }

  function shownIds() { return [current, ...queue].filter(Boolean).map((a) => a.pair_id); }

  async function fetchNext() {
    const ids = shownIds();
    const data = await api("GET", "/api/v1/pairs/next" + (ids.length ? "?exclude=" + ids.join(",") : ""));
    // a paused labeller is told why (their judgements so far are all kept)
    if (!data.pair && data.paused) $("empty-reason").textContent = data.message;
    return data.pair;
  }

  function preload(a) { for (const img of [a.left, a.right]) { new Image().src = img.url; } }

  function prefetch() {
    if (prefetching || queue.length > 0 || !current) return prefetching;
    prefetching = fetchNext()
      .then((a) => { if (a) { queue.push(a); preload(a); } })
      .catch(() => {})
      .finally(() => { prefetching = null; });
    return prefetching;
  }

  function show(a) {
    current = a;
    if (!a) {
      pairEl.hidden = true;
      $("empty").hidden = false;
      setTimeout(() => { if (!current) advance(); }, EMPTY_RETRY_MS);
      return;
    }
    $("empty").hidden = true;
    pairEl.dataset.pairId = a.pair_id;
    pairEl.dataset.leftSide = a.left.side;
    $("prompt").textContent = a.prompt;
    $("left").src = a.left.url;
    $("right").src = a.right.url;
    pairEl.hidden = false;
    shownAt = performance.now();
    prefetch();
  }

  async function advance() {
    current = null;
    if (queue.length === 0 && prefetching) await prefetching;
    try {
      show(queue.length ? queue.shift() : await fetchNext());
    } catch (e) {
      status(e.message);
    }
  }

  // `choice` is what the API records (the side 'a'/'b' of the pair, 'tie' or 'skip'); `said` is what
  // the annotator pressed ('left', 'right', 'tie', 'skip'): the status line names that, never a/b.
  async function judge(choice, said) {
    if (!current || busy) return;
    busy = true;
    const body = {
      pair_id: current.pair_id,
      choice,
      client_key: clientKey(),
      decide_ms: Math.round(performance.now() - shownAt),
    };
    try {
      const judgement = await withRetry(() => api("POST", "/api/v1/judgements", body));
      last = { id: judgement.id, at: Date.now() };
      counts.today += 1;
      counts.total += 1;
      renderCounts();
      status("Saved: " + said);
      await advance();
    } catch (e) {
      status(e.message);
      if (e instanceof ApiError && [403, 404, 409].includes(e.status)) await advance();
    } finally {
      busy = false;
    }
  }

  async function undo() {
    if (!last || busy) return;
    if (Date.now() - last.at > undoMs) { status("Too late to undo the last judgement."); last = null; return; }
    busy = true;
    try {
      const again = await api("DELETE", "/api/v1/judgements/" + last.id);
      last = null;
      counts.today -= 1;
      counts.total -= 1;
      renderCounts();
      if (current) queue.unshift(current);
      show(again);
      status("Undone: judge this pair again.");
    } catch (e) {
      status(e.message);
    } finally {
      busy = false;
    }
  }

  function act(action) {
    if (!current) return;
    if (action === "left") judge(current.left.side, action);
    else if (action === "right") judge(current.right.side, action);
    else judge(action, action); // tie or skip
  }

  const KEYS = {
    ArrowLeft: "left", 1: "left", ArrowRight: "right", 2: "right",
    ArrowDown: "tie", t: "tie", T: "tie", " ": "skip", s: "skip", S: "skip", u: "undo", U: "undo",
  };

  document.addEventListener("keydown", (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.target.closest("input, textarea, select")) return;
    const action = KEYS[e.key];
    if (!action) return;
    e.preventDefault();
    if (action === "undo") undo(); else act(action);
  });
  for (const button of document.querySelectorAll("button[data-key]")) {
    button.addEventListener("click", (e) => { e.currentTarget.blur(); act(e.currentTarget.dataset.key); });
  }

  api("GET", "/api/v1/me").then((me) => { counts = { today: me.today, total: me.total }; renderCounts(); }).catch(() => {});
  advance();
})();
