// Earshot dashboard: ticking durations and the live views (server-sent events).
// No framework and no innerHTML with data: every text goes in through textContent.
"use strict";

function pad(n) { return n < 10 ? "0" + n : String(n); }

function formatDuration(ms) {
  var s = Math.max(0, Math.floor(ms / 1000));
  var h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60;
  return (h ? h + ":" + pad(m) : String(m)) + ":" + pad(s % 60);
}

function mmss(ms) {
  var s = Math.max(0, Math.floor(ms / 1000));
  return pad(Math.floor(s / 60)) + ":" + pad(s % 60);
}

function party(uri) {
  var t = String(uri || "").trim();
  if (t.charAt(0) === "<" && t.indexOf(">") > 0) t = t.slice(1, t.indexOf(">"));
  return t.replace(/^(sips?|tel):/i, "").split(";")[0];
}

function el(tag, cls, text) {
  var e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

function tickAll() {
  var now = Date.now();
  document.querySelectorAll(".ticker[data-started-ms]").forEach(function (t) {
    var started = Number(t.getAttribute("data-started-ms"));
    if (started > 0) t.textContent = formatDuration(now - started);
  });
}

function confidence(c) {
  if (!c || typeof c.avg_logprob !== "number") return "";
  return Math.round(100 * Math.exp(Math.min(0, Math.max(-20, c.avg_logprob)))) + "%";
}

// -- the live board
// as gateway/web/format.py names them
var SOURCE_NAMES = {sip: "SIP", siprec: "SIPREC", realtime: "Realtime", rest: "REST", twilio: "Twilio",
                    webrtc: "WebRTC"};

function boardRow(call) {
  var tr = el("tr");
  tr.setAttribute("data-call-id", call.call_id);
  var d = el("td"); d.setAttribute("data-label", "Duration");
  var a = el("a", "ticker", "live"); a.href = "/calls/" + encodeURIComponent(call.call_id);
  a.setAttribute("data-started-ms", call.started_ms);
  d.appendChild(a); tr.appendChild(d);
  var kind = (call.source && call.source.kind) || "sip";
  var src = el("td"); src.setAttribute("data-label", "Source");
  src.appendChild(el("span", "source " + kind, SOURCE_NAMES[kind] || kind)); tr.appendChild(src);
  var f = el("td", "party", party(call.from)); f.setAttribute("data-label", "From"); tr.appendChild(f);
  var t = el("td", "party", party(call.to)); t.setAttribute("data-label", "To"); tr.appendChild(t);
  var g = el("td"); g.setAttribute("data-label", "Tags");
  (call.tags || []).forEach(function (tag) { g.appendChild(el("span", "tag", tag)); });
  tr.appendChild(g);
  var l = el("td", "latest" + (call.latest_partial ? " partial" : ""), call.latest_text || "");
  l.setAttribute("data-label", "Latest"); tr.appendChild(l);
  return tr;
}

function startBoard(table) {
  var rows = document.getElementById("board-rows");
  var empty = document.getElementById("board-empty");
  var count = document.getElementById("live-count");
  var feed = document.getElementById("feed-status");
  function refresh() {
    var n = rows.children.length;
    count.textContent = n;
    empty.hidden = n > 0;
    tickAll();
  }
  function setFeed(ok, text) {
    feed.className = "feed " + (ok ? "ok" : "down");
    feed.textContent = text;
  }
  function find(id) {
    for (var i = 0; i < rows.children.length; i++) {
      if (rows.children[i].getAttribute("data-call-id") === id) return rows.children[i];
    }
    return null;
  }
  function upsert(call) {
    var row = boardRow(call), old = find(call.call_id);
    if (old) { rows.replaceChild(row, old); return; }
    // newest call first
    var before = null;
    for (var i = 0; i < rows.children.length; i++) {
      var a = rows.children[i].querySelector("[data-started-ms]");
      if (a && Number(a.getAttribute("data-started-ms")) < call.started_ms) { before = rows.children[i]; break; }
    }
    rows.insertBefore(row, before);
  }
  var source = new EventSource(table.getAttribute("data-stream"));
  source.addEventListener("snapshot", function (e) {
    var data = JSON.parse(e.data);
    while (rows.firstChild) rows.removeChild(rows.firstChild);
    data.calls.forEach(upsert);
    setFeed(data.redis === "ok", data.redis === "ok" ? "live" : "event stream unreachable, retrying…");
    refresh();
  });
  source.addEventListener("call", function (e) { upsert(JSON.parse(e.data)); refresh(); });
  source.addEventListener("unauthorized", loggedOut(source));
  source.addEventListener("ended", function (e) {
    var row = find(JSON.parse(e.data).call_id);
    if (row) rows.removeChild(row);
    refresh();
  });
  source.addEventListener("status", function (e) {
    var ok = JSON.parse(e.data).redis === "ok";
    setFeed(ok, ok ? "live" : "event stream unreachable, retrying…");
  });
  source.onerror = function () { setFeed(false, "reconnecting…"); };
  source.onopen = function () { setFeed(true, "live"); };
}

// the side of a two-speaker transcript a leg's turns are on (as gateway/store/queries.py speaker_side):
// a SIPREC leg's role, else Earshot's leg names (caller, agent)
function speakerSide(leg, role) {
  if (role === "customer" || role === "agent") return role;
  return leg === "caller" ? "customer" : (leg === "agent" ? "agent" : "other");
}

// -- a transcript timeline: turns (a partial replaced by its final) and digits, in time order.
// Shared by the live call view and the "Try it" page (try.js). With turns of two or more legs
// it becomes a two-speaker transcript: one colour per side, the speaker's name and role shown.
function transcriptView(list) {
  var legs = {};
  list.querySelectorAll("li[data-leg]").forEach(function (li) { legs[li.getAttribute("data-leg")] = true; });
  function who(ev) {
    var w = el("span", "who", ev.participant || ev.leg || "caller");
    w.title = (ev.leg || "caller") + (ev.number ? " · " + ev.number : "");
    if (ev.role) { w.appendChild(document.createTextNode(" ")); w.appendChild(el("span", "role", ev.role)); }
    return w;
  }
  function place(li, start) {
    li.setAttribute("data-start", start);
    var items = list.children;
    for (var i = items.length - 1; i >= 0; i--) {
      if (Number(items[i].getAttribute("data-start")) <= start) {
        list.insertBefore(li, items[i].nextSibling);
        return;
      }
    }
    list.insertBefore(li, list.firstChild);
  }
  function findKey(key) {
    for (var i = 0; i < list.children.length; i++) {
      if (list.children[i].getAttribute("data-key") === key) return list.children[i];
    }
    return null;
  }
  function turn(ev, final) {
    var key = (ev.leg || "caller") + ":" + ev.turn;
    var old = findKey(key);
    if (old && old.classList.contains("final") && !final) return;  // a late partial never hides a final
    var leg = ev.leg || "caller";
    legs[leg] = true;
    if (Object.keys(legs).length > 1) list.classList.add("two-sided");
    var li = el("li", "turn " + (final ? "final" : "partial") + " side-" + speakerSide(leg, ev.role));
    li.setAttribute("data-key", key);
    li.setAttribute("data-leg", leg);
    var no = el("span", "no", "#" + ev.turn);
    if (ev.role || ev.participant || leg !== "caller") { no.appendChild(document.createTextNode(" ")); no.appendChild(who(ev)); }
    li.appendChild(no);
    li.appendChild(el("span", "at", mmss(ev.start_ms || 0)));
    li.appendChild(el("span", "text", ev.text || (final ? "" : "…")));
    var conf = el("span", "conf", final ? confidence(ev.confidence) : "");
    if (final && ev.confidence) conf.title = "avg log-prob " + ev.confidence.avg_logprob;
    li.appendChild(conf);
    if (old) list.replaceChild(li, old); else place(li, ev.start_ms || 0);
  }
  function dtmf(ev) {
    var key = "dtmf:" + (ev.leg || "caller") + ":" + ev.offset_ms + ":" + ev.digit;
    for (var i = 0; i < list.children.length; i++) {
      if (list.children[i].getAttribute("data-event") === key) return;
    }
    var li = el("li", "dtmf");
    li.setAttribute("data-event", key);
    li.appendChild(el("span", "no", "DTMF"));
    li.appendChild(el("span", "at", mmss(ev.offset_ms || 0)));
    var text = el("span", "text", "digit ");
    text.appendChild(el("kbd", "", ev.digit));
    li.appendChild(text);
    li.appendChild(el("span", "conf", ""));
    place(li, ev.offset_ms || 0);
  }
  return {turn: turn, dtmf: dtmf};
}

// -- the live call view
function startCall(list) {
  var empty = document.getElementById("timeline-empty");
  var status = document.getElementById("call-status");
  var ticker = document.getElementById("call-ticker");
  var seen = {};
  var view = transcriptView(list);
  function ended() {
    status.textContent = "ended";
    status.className = "badge ended";
    if (ticker) ticker.removeAttribute("data-started-ms");
    if (empty && !list.children.length) empty.textContent = "No speech was transcribed in this call.";
  }
  var source = new EventSource(list.getAttribute("data-stream"));
  source.addEventListener("event", function (e) {
    var ev = JSON.parse(e.data);
    if (seen[ev.event_id]) return;
    seen[ev.event_id] = true;
    if (ev.type === "turn.partial") view.turn(ev, false);
    else if (ev.type === "turn.final") view.turn(ev, true);
    else if (ev.type === "dtmf") view.dtmf(ev);
    else if (ev.type === "call.ended") ended();
    if (empty) empty.hidden = list.children.length > 0;
  });
  source.addEventListener("end", function () { source.close(); ended(); });
  source.addEventListener("unauthorized", loggedOut(source));
}

// a recorded call: clicking a turn (or a digit) plays the recording from its start_ms
function seekOnClick(list, audio) {
  list.addEventListener("click", function (e) {
    var li = e.target.closest ? e.target.closest("li[data-start]") : null;
    if (!li) return;
    var ms = parseInt(li.getAttribute("data-start"), 10);
    if (isNaN(ms)) return;
    audio.currentTime = ms / 1000;
    var playing = audio.play();
    if (playing && playing.catch) playing.catch(function () {});
  });
  list.classList.add("seekable");
}

// the server ended a stream whose login ended (logout, password change): to the login page
function loggedOut(source) {
  return function () {
    source.close();
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  };
}

document.addEventListener("DOMContentLoaded", function () {
  tickAll();
  setInterval(tickAll, 1000);
  var board = document.getElementById("board");
  if (board && board.getAttribute("data-stream") && window.EventSource) startBoard(board);
  var timeline = document.getElementById("timeline");
  if (timeline && timeline.getAttribute("data-stream") && window.EventSource) startCall(timeline);
  var audio = document.getElementById("recording");
  if (timeline && audio) seekOnClick(timeline, audio);
  document.querySelectorAll("time[datetime]").forEach(function (t) {
    var d = new Date(t.getAttribute("datetime"));
    if (!isNaN(d)) t.title = d.toLocaleString();
  });
});
