// Conveyor console: live refresh of [data-refresh] regions and times in the viewer's zone. No dependencies.
"use strict";
(function () {
  var zone = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "local time";

  function localize(root) {
    root.querySelectorAll("time[data-local]").forEach(function (el) {
      if (el.dataset.done) { return; }
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when.getTime())) { return; }
      el.dataset.done = "1";
      var local = document.createElement("span");
      local.className = "local";
      local.textContent = when.toLocaleString(undefined, {
        year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit"
      }) + " " + zone;
      // One format per cell: the viewer's local time; the server's UTC text moves to the tooltip.
      el.title = el.textContent;
      el.textContent = "";
      el.appendChild(local);
    });
    root.querySelectorAll("[data-zone]").forEach(function (el) { el.textContent = zone; });
  }

  function refresh(el) {
    var every = Math.max(1, parseInt(el.dataset.every || "5", 10)) * 1000;
    var stopped = false;
    function tick() {
      if (stopped) { return; }
      if (document.hidden || el.contains(document.activeElement)) { setTimeout(tick, every); return; }
      fetch(el.dataset.refresh, { headers: { "Accept": "text/html" }, credentials: "same-origin", redirect: "manual" })
        .then(function (response) {
          if (response.status !== 200) { stopped = response.status === 401 || response.type === "opaqueredirect"; return null; }
          return response.text();
        })
        .then(function (html) {
          if (html !== null) { el.innerHTML = html; localize(el); el.dataset.refreshed = String(Date.now()); }
        })
        .catch(function () { /* a restart or a network blip: try again next time */ })
        .finally(function () { setTimeout(tick, every); });
    }
    setTimeout(tick, every);
  }

  document.addEventListener("DOMContentLoaded", function () {
    localize(document);
    document.querySelectorAll("[data-refresh]").forEach(refresh);
  });
})();
