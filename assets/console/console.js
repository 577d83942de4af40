// contact-sync console: refreshes the overview's live part in place while the tab is visible.
// Served from /static/console.js (the Content-Security-Policy allows no inline script); every
// page works without it.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live || !window.fetch) {
    return;
  }
  var every = parseInt(live.getAttribute("data-refresh-ms"), 10) || 5000;
  var timer = null;
  function refresh() {
    timer = null;
    if (document.visibilityState !== "visible") {
      return;
    }
    fetch("/overview/live", { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (r.status === 401) {
          // the session ended: the page itself goes to the sign-in
          window.location.reload();
          return null;
        }
        if (r.ok && r.headers.get("Content-Type").indexOf("text/html") === 0) {
          return r.text();
        }
        return null;
      })
      .then(function (html) {
        if (html !== null) {
          live.innerHTML = html;
        }
      })
      .catch(function () {})
      .then(schedule);
  }
  function schedule() {
    if (timer === null && document.visibilityState === "visible") {
      timer = window.setTimeout(refresh, every);
    }
  }
  document.addEventListener("visibilitychange", function () {
    if (document.visibilityState === "visible") {
      schedule();
    } else if (timer !== null) {
      window.clearTimeout(timer);
      timer = null;
    }
  });
  schedule();
})();
