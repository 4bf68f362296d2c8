// One live stream for all of a browser's Coven tabs.
//
// Browsers allow six connections per host over HTTP/1.1, so a stream per tab would stop
// the seventh tab from loading. This file runs in one place per browser: as a
// SharedWorker where the browser has them, else in the one tab that holds the Web Lock
// "coven-stream-{guild}" (the others hear it over a BroadcastChannel): one per community.
// Either way it holds one EventSource to /api/stream/html for the community's rooms whose
// pages are open, and relays each
// message to the tabs that show it. Every tab also holds a lock of its own while it
// lives: when it is granted here, the tab is gone.
//
// Messages are relayed as {type, data, w}: w is the id of the event before the message's
// own (the stream's last id when it arrived), so a tab knows whether its page already
// has it. A tab that joins later is served from the recent messages kept here, or the
// stream restarts from the tab's point (the server replays or sends its pages whole).
(function (scope) {
  "use strict";

  var RECENT = 1000;

  function newer(a, b) {
    var x = String(a).split("-"), y = String(b).split("-");
    var dm = Number(x[0]) - Number(y[0]);
    return dm > 0 || (dm === 0 && Number(x[1] || 0) > Number(y[1] || 0));
  }

  function Relay() {
    this.tabs = new Map(); // tab id -> {post, view}
    this.source = null;
    this.views = "";
    this.last = null; // id of the last event whose messages all arrived
    this.complete = null; // recent[] holds every message of the events after this id
    this.recent = [];
    this.timer = null;
    this.from = null;
    this.retry = 0;
    this.guild = "";
  }

  // A tab arrived: {tab, at (the id its page was rendered at), view (room id or null)}.
  Relay.prototype.hello = function (hello, post) {
    var self = this;
    // Every tab of a relay is of one community (the relay is named after it).
    if (hello.guild) this.guild = hello.guild;
    this.tabs.set(hello.tab, { post: post, view: hello.view });
    if (scope.navigator && scope.navigator.locks) {
      scope.navigator.locks.request("coven-tab-" + hello.tab, function () { self.bye(hello.tab); });
    }
    var views = this.wanted();
    var covered = this.complete !== null && !newer(this.complete, hello.at);
    if (this.source && views === this.views && covered) {
      this.recent.forEach(function (m) { post({ msg: m }); });
      if (this.source.readyState === 1) post({ open: true });
      return;
    }
    this.restart(hello.at);
  };

  Relay.prototype.bye = function (tab) {
    if (!this.tabs.delete(tab)) return;
    if (this.tabs.size === 0) {
      this.stop();
      return;
    }
    if (this.wanted() !== this.views) this.restart(null);
  };

  Relay.prototype.wanted = function () {
    var set = {};
    this.tabs.forEach(function (t) { if (t.view) set[t.view] = true; });
    return Object.keys(set).sort().join(",");
  };

  Relay.prototype.stop = function () {
    if (this.source) this.source.close();
    this.source = null;
    this.views = "";
    clearTimeout(this.timer);
  };

  // (Re)opens the stream from `from` or from where the tabs already are, whichever is
  // older, once the tabs arriving together have all said hello.
  Relay.prototype.restart = function (from) {
    var self = this;
    var floor = this.from !== null ? this.from : this.last !== null ? this.last : this.complete;
    if (floor === null || (from !== null && newer(floor, from))) floor = from;
    this.from = floor;
    clearTimeout(this.timer);
    this.timer = setTimeout(function () { self.open(); }, 30);
  };

  Relay.prototype.open = function () {
    var self = this;
    if (this.source) this.source.close();
    this.views = this.wanted();
    var from = this.from || "";
    this.from = null;
    this.complete = from || null;
    this.recent = [];
    var url = "/api/stream/html?guild=" + encodeURIComponent(this.guild || "") +
      "&last_event_id=" + encodeURIComponent(from);
    if (this.views) url += "&view=" + this.views;
    var source = new EventSource(url, { withCredentials: true });
    this.source = source;
    var types = ["rooms", "gateway", "me", "at"];
    this.views.split(",").forEach(function (v) { if (v) types.push("room-" + v); });
    types.forEach(function (type) {
      source.addEventListener(type, function (e) {
        if (self.source !== source) return;
        self.relay({ type: type, data: e.data, w: e.lastEventId || "0-0" });
      });
    });
    source.onopen = function () {
      if (self.source !== source) return;
      self.retry = 0;
      self.broadcast({ open: true });
    };
    source.onerror = function () {
      if (self.source !== source || source.readyState !== 2) return;
      // Refused (logged out, too many streams): the browser will not retry by itself.
      self.retry = Math.min(self.retry * 2 || 1000, 60000);
      self.timer = setTimeout(function () {
        if (self.source !== source) return;
        self.from = self.last !== null ? self.last : self.complete;
        self.open();
      }, self.retry);
    };
  };

  Relay.prototype.relay = function (m) {
    if (m.type === "at") {
      this.last = m.data;
    }
    if (m.type !== "gateway") {
      this.recent.push(m);
      if (this.recent.length > RECENT) {
        // Forget whole events only, so what is kept is complete after `complete`.
        var i = 0, lastAt = null;
        while (i < this.recent.length &&
               (this.recent.length - i > RECENT / 2 || this.recent[i - 1].type !== "at")) {
          if (this.recent[i].type === "at") lastAt = this.recent[i].data;
          i++;
        }
        this.recent.splice(0, i);
        if (lastAt !== null) this.complete = lastAt;
      }
    }
    this.tabs.forEach(function (t) {
      if (m.type.indexOf("room-") === 0 && m.type !== "room-" + t.view) return;
      if (m.type === "rooms" && t.view) return;
      t.post({ msg: m });
    });
  };

  Relay.prototype.broadcast = function (message) {
    this.tabs.forEach(function (t) { t.post(message); });
  };

  scope.CovenRelay = Relay;
  scope.covenNewer = newer;

  // As a SharedWorker: every tab connects a port.
  if (typeof scope.SharedWorkerGlobalScope !== "undefined" && scope instanceof scope.SharedWorkerGlobalScope) {
    var relay = new Relay();
    scope.onconnect = function (e) {
      var port = e.ports[0];
      port.onmessage = function (m) {
        var d = m.data || {};
        if (d.hello) relay.hello(d.hello, function (x) { port.postMessage(x); });
        else if (d.bye) relay.bye(d.bye);
      };
      port.start();
    };
  }
})(self);
