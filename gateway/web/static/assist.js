// Agent-assist suggestions beside the live call view (gateway/web/assist.py, docs/consumers.md):
// the call's suggestions so far, then new ones, from /calls/<id>/assist/stream.
"use strict";

(function () {
  function item(s) {
    var li = document.createElement("li");
    li.className = "suggestion";
    li.setAttribute("data-suggestion", s.suggestion || "");
    li.setAttribute("data-id", s.id);
    var head = document.createElement("div");
    head.className = "said";
    head.textContent = (s.matched ? "“" + s.matched + "”" : "") + (typeof s.start_ms === "number" ? " at " + mmss(s.start_ms) : "");
    var text = document.createElement("p");
    text.className = "text";
    text.textContent = s.text || "";
    li.appendChild(head);
    li.appendChild(text);
    if (s.link && /^https?:\/\//.test(s.link)) {
      var a = document.createElement("a");
      a.href = s.link;
      a.rel = "noopener noreferrer";
      a.target = "_blank";
      a.textContent = s.link;
      li.appendChild(a);
    }
    return li;
  }
  function start(box) {
    var list = document.getElementById("suggestions");
    var empty = document.getElementById("suggestions-empty");
    var seen = {};
    var source = new EventSource(box.getAttribute("data-stream"));
    source.addEventListener("suggestion", function (e) {
      var s = JSON.parse(e.data);
      if (seen[s.event_id]) return;
      seen[s.event_id] = true;
      list.insertBefore(item(s), list.firstChild);  // newest on top
      if (empty) empty.hidden = true;
    });
    source.addEventListener("unauthorized", function () { source.close(); });
    var status = document.getElementById("call-status");
    if (status && window.MutationObserver) {  // the call ended (earshot.js): no more suggestions to wait for
      new MutationObserver(function () {
        if (status.textContent === "ended") setTimeout(function () { source.close(); }, 5000);
      }).observe(status, {childList: true, characterData: true, subtree: true});
    }
  }
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.getElementById("assist");
    if (box && box.getAttribute("data-stream") && window.EventSource) start(box);
  });
})();
