// Coven's glue. Live updates are HTML rendered by the server and swapped in by htmx's SSE
// extension (out-of-band, by id); this file only connects the page to the browser's one
// shared stream (relay.js), keeps what depends on the viewer (where they are, how many
// rooms they see) and runs the few timers a page has. It builds no markup.
(function () {
  "use strict";

  var reduced = window.matchMedia && window.matchMedia("(prefers-reduced-motion: reduce)").matches;

  // An avatar is the person's initial with their picture on top (CSS): a picture that
  // cannot load (offline, CDN blocked) is removed so no broken-image box covers it.
  var seen = new WeakSet();
  function watchImages(root) {
    root.querySelectorAll(".avatar img").forEach(function (img) {
      if (seen.has(img)) return;
      seen.add(img);
      if (img.complete && img.naturalWidth === 0 && img.src) img.remove();
      else img.addEventListener("error", function () { img.remove(); });
    });
  }
  watchImages(document);

  var live = document.getElementById("live");
  if (!live || !window.htmx || !window.CovenRelay) return;

  var newer = window.covenNewer;
  var connect = new URL(live.getAttribute("sse-connect") || "", location.href);
  var tab = Math.random().toString(36).slice(2) + Date.now().toString(36);
  var applied = connect.searchParams.get("last_event_id") || "0-0";
  var view = connect.searchParams.get("view") || null;
  // One relay per community: tabs of different communities do not share a stream.
  var guild = connect.searchParams.get("guild") || "";
  var streamName = "coven-stream-" + guild;

  // What htmx's SSE extension listens on: an EventSource-like object fed by the relay.
  function SharedSource() {
    this.events = new EventTarget();
    this.readyState = 0;
    this.onopen = null;
    this.onerror = null;
  }
  SharedSource.prototype.addEventListener = function (type, f) { this.events.addEventListener(type, f); };
  SharedSource.prototype.removeEventListener = function (type, f) { this.events.removeEventListener(type, f); };
  SharedSource.prototype.close = function () { this.readyState = 2; };
  var source = new SharedSource();

  function receive(d) {
    if (d.open) {
      source.readyState = 1;
      live.dataset.streamOpen = "1";
      if (source.onopen) source.onopen(new Event("open"));
      return;
    }
    var m = d.msg;
    if (!m || source.readyState === 2) return;
    if (m.type === "at") {
      if (newer(m.data, applied)) applied = m.data;
      return;
    }
    // A message belongs to the event after `w`: the page has it when it is past that.
    if (m.type !== "gateway" && newer(applied, m.w)) return;
    if (m.type === "me") return whereabouts(m.data);
    source.events.dispatchEvent(new MessageEvent(m.type, { data: m.data, lastEventId: m.w }));
  }

  function hello() { return { tab: tab, at: applied, view: view, guild: guild }; }

  // Holds this tab's own lock while it lives (the relay learns it is gone when it is
  // granted there), then says hello.
  function whileAlive(then) {
    if (!navigator.locks) return then();
    navigator.locks.request("coven-tab-" + tab, function () {
      then();
      return new Promise(function () {});
    });
  }

  var mode = (function () {
    var forced = null;
    try { forced = localStorage.getItem("coven.tabs"); } catch (e) { /* private mode */ }
    if (window.SharedWorker && forced !== "locks" && forced !== "alone") return "shared";
    if (navigator.locks && window.BroadcastChannel && forced !== "alone") return "locks";
    return "alone";
  })();
  document.documentElement.dataset.streamRole = mode === "locks" ? "follower" : mode;

  if (mode === "shared") {
    var script = document.querySelector("script[data-relay]");
    var worker = new SharedWorker(script.src, { name: streamName });
    worker.port.onmessage = function (e) { receive(e.data || {}); };
    worker.port.start();
    whileAlive(function () { worker.port.postMessage({ hello: hello() }); });
    window.addEventListener("pagehide", function () { worker.port.postMessage({ bye: tab }); });
  } else if (mode === "locks") {
    // The tab holding "coven-stream" runs the relay; the others talk to it here.
    var channel = new BroadcastChannel(streamName);
    var relay = null;
    var to = function (t) {
      return function (x) {
        if (t === tab) receive(x);
        else channel.postMessage({ to: t, x: x });
      };
    };
    channel.onmessage = function (e) {
      var d = e.data || {};
      if (d.to === tab) receive(d.x);
      else if (d.who) channel.postMessage({ hello: hello() });
      else if (relay && d.hello) relay.hello(d.hello, to(d.hello.tab));
      else if (relay && d.bye) relay.bye(d.bye);
    };
    whileAlive(function () {
      channel.postMessage({ hello: hello() });
      navigator.locks.request(streamName, function () {
        relay = new window.CovenRelay();
        document.documentElement.dataset.streamRole = "leader";
        relay.hello(hello(), to(tab));
        // Whoever was served by the old holder says where it is.
        channel.postMessage({ who: true });
        return new Promise(function () {});
      });
    });
    window.addEventListener("pagehide", function () { channel.postMessage({ bye: tab }); });
  } else {
    var own = new window.CovenRelay();
    own.hello(hello(), receive);
  }

  // The SSE extension's hook for making its event source.
  htmx.createEventSource = function () { return source; };

  // ----- what depends on the viewer -----

  function whereabouts(channel) {
    if (live.dataset.page !== "room") return;
    var now = channel === "none" ? "none" : channel === live.dataset.room ? "in" : "elsewhere";
    if (live.dataset.whereabouts === "in" && now !== "in") live.dataset.left = "1";
    if (now === "in") delete live.dataset.left;
    live.dataset.whereabouts = now;
  }

  function roomsCount() {
    var list = document.getElementById("rooms-list");
    if (!list) return;
    var n = list.children.length;
    var count = live.querySelector("[data-open-count]");
    if (count) count.textContent = n + " open";
    var empty = live.querySelector("[data-no-rooms]");
    if (empty) empty.hidden = n > 0;
    var channels = document.getElementById("channels-list");
    var heading = live.querySelector("[data-channels-heading]");
    if (channels && heading) heading.hidden = channels.children.length === 0;
  }

  // A room page's closing countdown, while the room shows one.
  var countdown = null;
  function closing() {
    clearInterval(countdown);
    var banner = live.querySelector("[data-closes-at]");
    if (!banner) return;
    var closesAt = Number(banner.dataset.closesAt);
    function tick() {
      var out = live.querySelector("[data-closes-at] [data-countdown]");
      if (!out) return clearInterval(countdown);
      out.textContent = "in " + Math.max(0, Math.round((closesAt - Date.now()) / 1000)) + " s";
    }
    tick();
    countdown = setInterval(tick, 1000);
  }
  closing();

  // A new card or a newly arrived person is highlighted briefly (not when the viewer
  // asked for less motion). Nothing is added to the markup.
  function highlight(el) {
    if (reduced || !el.animate) return;
    el.animate([{ boxShadow: "0 0 0 3px rgba(124, 140, 255, .9)" }, { boxShadow: "0 0 0 3px rgba(124, 140, 255, 0)" }],
      { duration: 1500, easing: "ease-out" });
  }
  var before = null;
  document.body.addEventListener("htmx:oobBeforeSwap", function (e) {
    var d = e.detail;
    // An element arriving for a list (a room appearing) replaces any copy already shown.
    if (d.fragment && d.fragment.querySelectorAll) {
      d.fragment.querySelectorAll("[id]").forEach(function (el) {
        var old = document.getElementById(el.id);
        if (old && old !== d.target && !d.target.contains(old)) old.remove();
      });
    }
    before = {};
    d.target.querySelectorAll("[data-user]").forEach(function (el) { before[el.dataset.user] = true; });
  });
  document.body.addEventListener("htmx:oobAfterSwap", function (e) {
    var el = e.target;
    if (!(el instanceof Element)) return;
    if (el.classList.contains("room-card") && el.isConnected) highlight(el);
    if (before) {
      el.querySelectorAll(".member[data-user]").forEach(function (m) {
        if (!before[m.dataset.user]) highlight(m);
      });
    }
  });
  document.body.addEventListener("htmx:sseMessage", function () {
    watchImages(live);
    roomsCount();
    closing();
  });
})();

// Invite link: copy to the clipboard, and put a fresh link in place after "New link".
(function () {
  var input = document.getElementById("invite-link");
  if (!input) return;
  var copy = document.querySelector("[data-copy]");
  if (copy && navigator.clipboard) {
    copy.hidden = false;
    copy.addEventListener("click", function () {
      navigator.clipboard.writeText(input.value).then(function () {
        copy.textContent = "Copied";
        setTimeout(function () { copy.textContent = "Copy"; }, 1500);
      });
    });
  }
  document.body.addEventListener("htmx:afterRequest", function (e) {
    var form = e.detail.elt;
    if (form && form.hasAttribute && form.hasAttribute("data-new-link") && e.detail.successful) {
      input.value = e.detail.xhr.responseText.trim();
      input.select();
    }
  });
})();

// A post made through HTMX that fails (403, 409, 429, 502, ...) is not swapped into the
// page; the error page's words (the parts the server marks `data-error-part`: title,
// message, hint) are shown in the page's flash line instead.
(function () {
  function showProblem(text) {
    var box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.hidden = false;
  }
  document.body.addEventListener("htmx:responseError", function (e) {
    var xhr = e.detail.xhr;
    var doc = new DOMParser().parseFromString(xhr.responseText || "", "text/html");
    var parts = Array.prototype.map.call(doc.querySelectorAll("[data-error-part]"), function (el) {
      return el.textContent.trim();
    }).filter(Boolean);
    var words = parts.length ? parts[0] + ": " + parts.slice(1).join(" ") : "";
    showProblem(words || "That did not work (HTTP " + xhr.status + "). Reload the page and try again.");
  });
  document.body.addEventListener("htmx:sendError", function () {
    showProblem("Coven could not be reached. Check your connection and try again.");
  });
})();
