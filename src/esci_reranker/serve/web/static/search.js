// The search page: POST /search on submit, render the results. Plain DOM, no dependencies.
"use strict";

(function () {
  const LABELS = { E: "exact", S: "substitute", C: "complement", I: "irrelevant" };
  const form = document.getElementById("search-form");
  const input = document.getElementById("q");
  const button = document.getElementById("go");
  const rerank = document.getElementById("rerank");
  const topK = document.getElementById("top-k");
  const keyBox = document.getElementById("key-box");
  const apiKey = document.getElementById("api-key");
  const status = document.getElementById("status");
  const results = document.getElementById("results");
  const endpoint = form.dataset.endpoint;

  apiKey.value = sessionStorage.getItem("esci-api-key") || "";

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function say(message, isError) {
    status.textContent = message;
    status.classList.toggle("error", Boolean(isError));
  }

  function sourcesText(hit) {
    const parts = [];
    if (hit.bm25_rank !== null) parts.push("BM25 #" + hit.bm25_rank);
    if (hit.dense_rank !== null) parts.push("dense #" + hit.dense_rank);
    return "found by " + parts.join(", ");
  }

  function renderHit(hit) {
    const item = el("li", "hit");
    item.dataset.productId = hit.product_id;
    item.appendChild(el("span", "rank", String(hit.rank)));

    const body = el("div", "body");
    body.appendChild(el("p", "title", hit.title || hit.product_id));
    const meta = [hit.brand, hit.color].filter(Boolean);
    const metaLine = el("p", "meta");
    if (hit.brand) metaLine.appendChild(el("span", "brand", hit.brand));
    if (hit.brand && hit.color) metaLine.appendChild(document.createTextNode(" · "));
    if (hit.color) metaLine.appendChild(el("span", "color", hit.color));
    if (meta.length) body.appendChild(metaLine);
    body.appendChild(el("p", "sources", sourcesText(hit)));
    item.appendChild(body);

    const side = el("div", "side");
    const badges = el("div", "badges");
    if (hit.esci_class) {
      const badge = el("span", "badge esci esci-" + hit.esci_class, hit.esci_class);
      badge.title = LABELS[hit.esci_class];
      badge.dataset.esci = hit.esci_class;
      badge.appendChild(el("span", "visually-hidden", " (" + LABELS[hit.esci_class] + ")"));
      badges.appendChild(badge);
    }
    if (hit.is_substitute) {
      const sub = el("span", "badge substitute", "substitute");
      sub.title = "substitute probability " + hit.substitute_prob.toFixed(2);
      badges.appendChild(sub);
    }
    side.appendChild(badges);
    side.appendChild(el("span", "score", "score " + hit.score.toFixed(3)));
    item.appendChild(side);
    return item;
  }

  async function search(event) {
    event.preventDefault();
    const query = input.value.trim();
    if (!query) {
      say("Type a query first.", true);
      input.focus();
      return;
    }
    const headers = { "Content-Type": "application/json" };
    const key = apiKey.value.trim();
    if (key) headers["X-API-Key"] = key;
    sessionStorage.setItem("esci-api-key", key);
    const k = Number(topK.value);
    const body = { query: query, top_k: k, candidates: Math.max(100, k), rerank: rerank.checked };
    button.disabled = true;
    form.setAttribute("aria-busy", "true");
    say("Searching…");
    const started = performance.now();
    let response, data;
    try {
      response = await fetch(endpoint, { method: "POST", headers: headers, body: JSON.stringify(body) });
      data = await response.json();
    } catch (err) {
      say("The service did not answer (" + err + ").", true);
      return;
    } finally {
      button.disabled = false;
      form.removeAttribute("aria-busy");
    }
    const elapsed = performance.now() - started;
    if (!response.ok) {
      if (response.status === 401) keyBox.open = true;
      say((data && data.message) || "Error " + response.status, true);
      results.replaceChildren();
      return;
    }
    results.replaceChildren(...data.results.map(renderHit));
    const s = data.stats;
    say(
      data.results.length + " of " + s.num_candidates + " candidates, " +
      (s.reranked ? "reranked" : "retrieval order") + " · " + Math.round(elapsed) + " ms (server " +
      Math.round(s.total_latency_ms) + " ms: retrieval " + Math.round(s.retrieval_ms) + " ms, model " +
      Math.round(s.model_forward_time_ms) + " ms" + (s.cache_hit ? ", cached" : "") + ")",
      false
    );
    document.body.dataset.latencyMs = String(Math.round(elapsed));
  }

  form.addEventListener("submit", search);
  rerank.addEventListener("change", function () {
    if (input.value.trim()) form.requestSubmit();
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "/" && document.activeElement !== input && !(event.target instanceof HTMLInputElement)) {
      event.preventDefault();
      input.focus();
    }
  });
})();
