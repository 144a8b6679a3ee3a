// The search page: POST /search on submit, render the results. Plain DOM, no dependencies.
// A search is its URL: /?q=...&k=20&rerank=0&hide=I runs on load, and each search writes its
// query and options back into the address bar, so the page can be bookmarked or shared.
"use strict";

(function () {
  const LABELS = { E: "exact", S: "substitute", C: "complement", I: "irrelevant" };
  const CLASSES = ["E", "S", "C", "I"];
  const form = document.getElementById("search-form");
  const input = document.getElementById("q");
  const button = document.getElementById("go");
  const rerank = document.getElementById("rerank");
  const hideI = document.getElementById("hide-i");
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

  // "Exact: P = 0.83 (S 0.10, C 0.02, I 0.05)": the shown class first, then the other three.
  function probabilityText(cls, probs) {
    const name = LABELS[cls].charAt(0).toUpperCase() + LABELS[cls].slice(1);
    if (!probs) return name;
    const others = CLASSES.filter((c) => c !== cls).map((c) => c + " " + probs[c].toFixed(2));
    return name + ": P = " + probs[cls].toFixed(2) + " (" + others.join(", ") + ")";
  }

  // The page's state <-> the URL's query string (only what differs from the defaults).
  function stateToUrl() {
    const params = new URLSearchParams();
    const query = input.value.trim();
    if (query) params.set("q", query);
    if (topK.value !== topK.dataset.default) params.set("k", topK.value);
    if (!rerank.checked) params.set("rerank", "0");
    if (hideI.checked) params.set("hide", "I");
    const search = params.toString();
    return location.pathname + (search ? "?" + search : "") + location.hash;
  }

  function urlToState() {
    const params = new URLSearchParams(location.search);
    input.value = params.get("q") || "";
    const k = params.get("k");
    const known = Array.from(topK.options).some((o) => o.value === k);
    topK.value = known ? k : topK.dataset.default;
    rerank.checked = params.get("rerank") !== "0";
    hideI.checked = params.get("hide") === "I";
    applyHide();
  }

  function remember(push) {
    const url = stateToUrl();
    if (url === location.pathname + location.search + location.hash) return;
    if (push) history.pushState(null, "", url);
    else history.replaceState(null, "", url);
  }

  function applyHide() {
    results.classList.toggle("hide-irrelevant", hideI.checked);
    const hidden = hideI.checked ? results.querySelectorAll("li.hit[data-esci='I']").length : 0;
    hiddenNote.textContent = hidden ? " · " + hidden + " irrelevant hidden" : "";
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
    if (hit.esci_class) item.dataset.esci = hit.esci_class;
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
      const text = probabilityText(hit.esci_class, hit.probabilities);
      const badge = el("span", "badge esci esci-" + hit.esci_class, hit.esci_class);
      // title: the hover text; focusable, with the same text shown on focus (CSS) and read out.
      badge.title = text;
      badge.tabIndex = 0;
      badge.dataset.esci = hit.esci_class;
      badge.appendChild(el("span", "visually-hidden", " (" + text + ")"));
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

  async function search(event, fromUrl) {
    if (event) event.preventDefault();
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
    // A new query is a new history entry (Back returns to the last one); a changed option is not.
    if (!fromUrl) remember(new URLSearchParams(location.search).get("q") !== query);
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
    status.appendChild(hiddenNote);
    applyHide();
    document.body.dataset.latencyMs = String(Math.round(elapsed));
  }

  const hiddenNote = el("span", "hidden-note");
  topK.dataset.default = topK.value;

  form.addEventListener("submit", (event) => search(event, false));
  rerank.addEventListener("change", function () {
    if (input.value.trim()) form.requestSubmit();
    else remember(false);
  });
  topK.addEventListener("change", function () {
    if (input.value.trim()) form.requestSubmit();
    else remember(false);
  });
  // Hiding needs no new request: the labels are on the page already.
  hideI.addEventListener("change", function () {
    applyHide();
    remember(false);
  });
  // Back/Forward: show the search that URL names.
  window.addEventListener("popstate", function () {
    urlToState();
    if (input.value.trim()) search(null, true);
    else {
      results.replaceChildren();
      say("", false);
    }
  });
  document.addEventListener("keydown", function (event) {
    if (event.key === "/" && document.activeElement !== input && !(event.target instanceof HTMLInputElement)) {
      event.preventDefault();
      input.focus();
    }
  });

  urlToState();
  if (input.value.trim()) search(null, true);
})();
