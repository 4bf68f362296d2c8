// Coven's own script: applies the live stream's events to the server-rendered page.
// The htmx SSE extension owns the connection; this file only listens. Every event
// carries an id, and an event at or below the last one applied is skipped, so replays
// after a reconnect never apply twice.
(function () {
  "use strict";

  // An avatar is the person's initial with their picture on top (CSS): while the
  // picture loads, or when it cannot (offline, CDN blocked), the initial shows. A
  // picture that failed is removed so no broken-image box covers the initial.
  function watch(img) {
    if (img.complete && img.naturalWidth === 0 && img.src) img.remove();
    else img.addEventListener("error", function () { img.remove(); });
  }
  document.querySelectorAll(".avatar img").forEach(watch);

  var live = document.getElementById("live");
  if (!live || !window.htmx) return;

  var connect = live.getAttribute("sse-connect") || "";
  var lastId = new URL(connect, location.href).searchParams.get("last_event_id") || "0-0";

  function newer(a, b) {
    var x = a.split("-"), y = b.split("-");
    var dm = Number(x[0]) - Number(y[0]);
    return dm > 0 || (dm === 0 && Number(x[1]) > Number(y[1]));
  }

  // When the extension reconnects by itself it reuses the page's URL: resume from the
  // last event applied instead of the page's snapshot.
  htmx.createEventSource = function (url) {
    var u = new URL(url, location.href);
    u.searchParams.set("last_event_id", lastId);
    return new EventSource(u.toString(), { withCredentials: true });
  };

  var TYPES = ["room.created", "room.updated", "room.deleted", "room.closing", "voice.joined",
    "voice.updated", "voice.left", "room.viewers", "gateway.status", "resync"];

  live.addEventListener("htmx:sseOpen", function (e) {
    // Marks the page as live (tests wait for it before changing things).
    live.dataset.streamOpen = "1";
    var source = e.detail && e.detail.source;
    if (!source || source.__coven) return;
    source.__coven = true;
    TYPES.forEach(function (type) {
      source.addEventListener(type, function (msg) { receive(type, msg); });
    });
  });

  function receive(type, msg) {
    if (type === "resync") {
      // Too far behind for a replay: the page renders a fresh snapshot.
      location.reload();
      return;
    }
    var envelope;
    try { envelope = JSON.parse(msg.data); } catch (err) { return; }
    // A "view" event shows this viewer a room they just gained (or lost) the right to
    // see; it has no place in the log, so it neither moves nor checks the last id.
    if (!envelope.view) {
      var id = msg.lastEventId;
      if (id && !newer(id, lastId)) return;
      if (id) lastId = id;
    }
    var d = envelope.data || {};
    if (type === "gateway.status") return gatewayStatus(d);
    if (live.dataset.page === "rooms") roomsPage(type, d);
    else if (live.dataset.page === "room" && d.channel_id === live.dataset.room) roomPage(type, d);
    document.dispatchEvent(new CustomEvent("coven:applied", { detail: envelope }));
  }

  function gatewayStatus(d) {
    var banner = document.getElementById("gateway-banner");
    if (!banner) return;
    banner.hidden = d.state === "CONNECTED";
    var reason = banner.querySelector("[data-reason]");
    if (reason) reason.textContent = d.reason || ("the gateway is " + String(d.state).toLowerCase());
  }

  function clone(id) {
    var t = document.getElementById(id);
    return t.content.firstElementChild.cloneNode(true);
  }

  function avatar(el, user) {
    var name = user.global_name || user.username || "?";
    el.textContent = name.charAt(0).toUpperCase();
    if (user.avatar_url) {
      var img = document.createElement("img");
      img.src = user.avatar_url;
      img.alt = "";
      watch(img);
      el.append(img);
    }
  }

  function byUser(list, userId) {
    return list ? list.querySelector('[data-user="' + userId + '"]') : null;
  }

  function setCount(root, count, limit) {
    var c = root.querySelector("[data-count]");
    if (!c) return;
    c.textContent = limit > 0 ? count + "/" + limit : String(count);
    c.classList.toggle("full", limit > 0 && count >= limit);
  }

  // ----- /rooms -----
  function card(channelId) {
    return live.querySelector('.room-card[data-room="' + channelId + '"]');
  }

  function recount(c) {
    setCount(c, c.querySelectorAll("[data-members] > li").length, Number(c.dataset.limit));
  }

  function roomsSummary() {
    var n = live.querySelectorAll(".room-card").length;
    live.querySelector(".heading [data-count]").textContent = n + " open";
    live.querySelector("[data-empty]").hidden = n > 0;
  }

  function roomsPage(type, d) {
    var c = d.channel_id && card(d.channel_id);
    if (type === "room.created" && !c) {
      c = clone("room-card");
      c.dataset.room = d.channel_id;
      c.dataset.limit = d.user_limit;
      c.querySelector("a").href = "/rooms/" + d.channel_id;
      c.querySelector("[data-name]").textContent = d.name;
      live.querySelector("[data-rooms]").prepend(c);
      recount(c);
      roomsSummary();
    } else if (type === "room.updated" && c) {
      c.querySelector("[data-name]").textContent = d.name;
      c.dataset.limit = d.user_limit;
      recount(c);
    } else if (type === "room.deleted" && c) {
      c.remove();
      roomsSummary();
    } else if (type === "room.closing" && c) {
      c.querySelector("[data-closing]").hidden = false;
    } else if (type === "voice.joined") {
      live.querySelectorAll('.faces [data-user="' + d.user.id + '"]').forEach(function (f) {
        var from = f.closest(".room-card");
        f.remove();
        recount(from);
      });
      if (!c) return;
      var face = clone("face");
      face.dataset.user = d.user.id;
      face.title = d.user.global_name || d.user.username;
      c.querySelector("[data-members]").append(face);
      avatar(face.firstElementChild, d.user);
      c.querySelector("[data-closing]").hidden = true;
      recount(c);
    } else if (type === "voice.left" && c) {
      var gone = byUser(c.querySelector("[data-members]"), d.user_id);
      if (gone) gone.remove();
      recount(c);
    }
  }

  // ----- /rooms/{id} -----
  var me = live.dataset.me;
  var countdown = null;

  function members() { return live.querySelector("[data-members]"); }

  function roomRecount() {
    var n = members().querySelectorAll(":scope > li").length;
    var limit = Number(live.dataset.limit);
    setCount(live, n, limit);
    live.querySelector("[data-empty]").hidden = n > 0;
    live.querySelector("[data-full]").hidden = !(limit > 0 && n >= limit);
    // The tab says how full the room is, like the page's own first render.
    var name = live.querySelector("h1[data-name]").textContent;
    document.title = (limit > 0 ? "(" + n + "/" + limit + ") " : "") + name + " · Coven";
  }

  function setFlags(row, d) {
    row.querySelector(".flag.mute").hidden = !d.self_mute;
    row.querySelector(".flag.deaf").hidden = !d.self_deaf;
    row.querySelector(".flag.video").hidden = !d.self_video;
    row.querySelector(".flag.stream").hidden = !d.self_stream;
  }

  function showState(which) {
    live.querySelectorAll("[data-state]").forEach(function (el) {
      el.hidden = el.dataset.state !== which;
    });
  }

  function startCountdown(closesAt) {
    var banner = live.querySelector("[data-closing]");
    var out = banner.querySelector("[data-countdown]");
    banner.hidden = false;
    live.querySelector("[data-reopened]").hidden = true;
    clearInterval(countdown);
    function tick() {
      var s = Math.max(0, Math.round((closesAt - Date.now()) / 1000));
      out.textContent = "in " + s + " s";
    }
    tick();
    countdown = setInterval(tick, 1000);
  }

  function callOffClosing() {
    var banner = live.querySelector("[data-closing]");
    if (banner.hidden) return;
    banner.hidden = true;
    clearInterval(countdown);
    live.querySelector("[data-reopened]").hidden = false;
  }

  function roomPage(type, d) {
    if (type === "voice.joined") {
      var row = byUser(members(), d.user.id);
      if (!row) {
        row = clone("member");
        row.dataset.user = d.user.id;
        row.querySelector(".name").textContent = d.user.global_name || d.user.username;
        members().append(row);
        avatar(row.querySelector(".avatar"), d.user);
      }
      setFlags(row, d);
      if (d.user.id === me) showState("in");
      callOffClosing();
      roomRecount();
    } else if (type === "voice.updated") {
      var r = byUser(members(), d.user_id);
      if (r) setFlags(r, d);
    } else if (type === "voice.left") {
      var gone = byUser(members(), d.user_id);
      if (gone) gone.remove();
      if (d.user_id === me) showState("left");
      roomRecount();
    } else if (type === "room.viewers") {
      if ((d.viewers || []).length) callOffClosing();
      var list = live.querySelector("[data-viewers]");
      list.textContent = "";
      (d.viewers || []).forEach(function (v) {
        var li = clone("viewer");
        li.dataset.user = v.id;
        li.title = v.username;
        li.lastElementChild.textContent = v.username;
        list.append(li);
        avatar(li.firstElementChild, v);
      });
    } else if (type === "room.closing") {
      startCountdown(Number(d.closes_at));
    } else if (type === "room.updated") {
      live.querySelector("h1[data-name]").textContent = d.name;
      live.dataset.limit = d.user_limit;
      roomRecount();
    } else if (type === "room.deleted") {
      live.querySelector("[data-deleted]").hidden = false;
      setTimeout(function () { location.assign("/rooms?closed=1"); }, 1500);
    }
  }

  var closing = live.querySelector("[data-closes-at]");
  if (closing) startCountdown(Number(closing.dataset.closesAt));
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
// page; show the error page's words above the content instead.
(function () {
  function flash(text) {
    var box = document.getElementById("flash");
    if (!box) {
      box = document.createElement("p");
      box.id = "flash";
      box.className = "banner warn";
      box.setAttribute("role", "alert");
      var main = document.querySelector("main");
      if (!main) return;
      main.prepend(box);
    }
    box.textContent = text;
    box.hidden = false;
  }
  document.body.addEventListener("htmx:responseError", function (e) {
    var xhr = e.detail.xhr;
    var doc = new DOMParser().parseFromString(xhr.responseText || "", "text/html");
    var card = doc.querySelector("section.error");
    var words = "";
    if (card) {
      var title = card.querySelector("h1");
      var lines = Array.prototype.map.call(card.querySelectorAll("p:not(.status)"), function (p) {
        return p.textContent.trim();
      }).filter(function (t) { return t && t !== "Back to the rooms"; });
      words = (title ? title.textContent.trim() + ": " : "") + lines.join(" ");
    }
    flash(words || "That did not work (HTTP " + xhr.status + "). Reload the page and try again.");
  });
  document.body.addEventListener("htmx:sendError", function () {
    flash("Coven could not be reached. Check your connection and try again.");
  });
})();
