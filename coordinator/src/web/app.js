// shardgate dashboard: follows the coordinator's events and re-reads the page's own <main>
// (rendered by the server, like the first load) at most once a second. Without this script
// the pages still work: they refresh themselves every few seconds.
"use strict";
(function () {
  var body = document.body;
  var main = document.getElementById("main");

  function fmt(ms) {
    var s = Math.floor(ms / 1000);
    if (ms < 1000) return ms + "ms";
    if (s < 60) return (ms / 1000).toFixed(1) + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  }

  // "… ago" stays true between refreshes.
  function tick() {
    var now = Date.now();
    document.querySelectorAll("time[data-ms]").forEach(function (t) {
      t.textContent = fmt(Math.max(0, now - Number(t.dataset.ms))) + " ago";
    });
  }
  setInterval(tick, 1000);

  // Open <details> stay open across refreshes.
  function openKeys() {
    var keys = [];
    main.querySelectorAll("details[open] summary code").forEach(function (c) { keys.push(c.textContent); });
    return keys;
  }

  // One re-read at a time, at most one a second; events meanwhile ask for one more.
  var pending = false, inflight = false, last = 0;
  function refresh() {
    if (pending) return;
    pending = true;
    setTimeout(load, Math.max(0, 1000 - (Date.now() - last)));
  }
  function load() {
    if (inflight) { setTimeout(load, 200); return; }
    pending = false; inflight = true; last = Date.now();
    var open = openKeys();
    fetch(location.href, { headers: { "x-shardgate-fragment": "1" }, credentials: "same-origin" })
      .then(function (r) { if (!r.ok) throw new Error(String(r.status)); return r.text(); })
      .then(function (html) {
        main.innerHTML = html;
        main.querySelectorAll("details summary code").forEach(function (c) {
          if (open.indexOf(c.textContent) >= 0) c.closest("details").open = true;
        });
        tick();
        follow();
      })
      .catch(function () {})
      .then(function () { inflight = false; });
  }

  var url = body.dataset.events;
  if (url) {
    var es = new EventSource(url);
    es.onopen = function () { body.classList.add("connected"); };
    es.onerror = function () { body.classList.remove("connected"); };
    ["snapshot", "progress", "test_finished", "resync"].forEach(function (name) {
      es.addEventListener(name, refresh);
    });
    es.addEventListener("finished", function () {
      refresh();
      // A run page is done for good; the list pages keep following.
      if (/\/api\/runs\//.test(url)) { es.close(); body.classList.remove("connected"); }
    });
  }
  // Part of a page that changes without events (a run's deploy after its verdict) asks to be
  // re-read while it does.
  function follow() {
    var again = main.querySelector("[data-poll]");
    if (again) setTimeout(refresh, Number(again.dataset.poll));
  }
  follow();

  var poll = Number(body.dataset.poll || 0);
  if (poll > 0) {
    body.classList.add("connected");
    setInterval(refresh, poll);
  }
})();
