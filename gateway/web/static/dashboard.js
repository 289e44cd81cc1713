// qkd-gateway dashboard: live updates for the server-rendered page. No library, no inline
// code (the page's Content-Security-Policy allows only this file). Each element with a
// `data-src` is a slot: its content is fetched again from that URL (with the controls'
// query) and swapped in, when the server says something changed (Server-Sent Events from
// the body's `data-events`) and every `data-refresh-ms` anyway (key ages move even when
// nothing else does). Without script the page still shows everything, as of its loading.
"use strict";
(function () {
  var body = document.body;
  var refreshMs = parseInt(body.dataset.refreshMs || "5000", 10);
  var form = document.getElementById("controls");
  var conn = document.getElementById("conn");
  var pending = false, again = false, live = false;

  function params() {
    return form ? new URLSearchParams(new FormData(form)) : new URLSearchParams();
  }

  function load(slot) {
    var src = slot.dataset.src, extra = params().toString();
    var url = src + (extra ? (src.indexOf("?") < 0 ? "?" : "&") + extra : "");
    return fetch(url, {credentials: "same-origin", cache: "no-store"})
      .then(function (r) { if (!r.ok) { throw new Error("HTTP " + r.status); } return r.text(); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.body.firstElementChild;
        if (fresh) { slot.replaceChildren(document.adoptNode(fresh)); }
      });
  }

  function refresh() {
    if (pending) { again = true; return; }
    pending = true;
    var slots = Array.prototype.slice.call(document.querySelectorAll("[data-src]"));
    Promise.all(slots.map(load))
      .then(function () { if (conn) { conn.textContent = live ? "live" : "polling"; conn.className = "muted"; } })
      .catch(function (e) { if (conn) { conn.textContent = "no answer (" + e.message + ")"; conn.className = "alarm"; } })
      .finally(function () { pending = false; if (again) { again = false; refresh(); } });
  }

  function controlsChanged(e) {
    if (e) { e.preventDefault(); }
    history.replaceState(null, "", "?" + params().toString());
    refresh();
  }

  if (form) {
    form.addEventListener("change", controlsChanged);
    form.addEventListener("submit", controlsChanged);
  }
  if (body.dataset.events && window.EventSource) {
    var events = new EventSource(body.dataset.events);
    events.addEventListener("change", function () { live = true; refresh(); });
    events.onerror = function () { live = false; if (conn) { conn.textContent = "reconnecting"; } };
  }
  setInterval(refresh, refreshMs);
  if (conn) { conn.textContent = "polling"; }
})();
