// Keeps a status page current: refetches its main part every data-refresh-ms
// (the server renders it, escaped, with `X-Sax-Fragment: 1`) and swaps it in.
(function () {
  "use strict";
  var period = parseInt(document.body.dataset.refreshMs || "0", 10);
  var main = document.getElementById("live");
  var badge = document.getElementById("live-state");
  if (!period || !main) return;

  function mark(state, title) {
    if (!badge) return;
    badge.className = "live " + state;
    badge.textContent = state === "stale" ? "reconnecting" : "live";
    badge.title = title;
  }

  function refresh() {
    fetch(window.location.pathname + window.location.search, {
      headers: {"X-Sax-Fragment": "1", "Accept": "text/html"},
      credentials: "same-origin",
      cache: "no-store"
    }).then(function (resp) {
      if (resp.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
        return null;
      }
      return resp.text().then(function (html) {
        if (!resp.ok && resp.status !== 404) throw new Error("HTTP " + resp.status);
        main.innerHTML = html;
        document.body.dataset.updated = String(Date.now());
        mark("ok", "updated " + new Date().toLocaleTimeString());
      });
    }).catch(function (err) {
      mark("stale", "cannot reach the admin: " + err.message);
    }).finally(function () {
      window.setTimeout(refresh, period);
    });
  }
  window.setTimeout(refresh, period);
})();
