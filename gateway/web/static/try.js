// Earshot "Try it": the browser's microphone over WebRTC (WHIP, POST /v1/whip) and the live transcript
// of that session from the dashboard's call stream (/calls/<id>/stream). The WHIP request is
// authenticated by the login cookie (same origin). Text goes in through textContent only. The
// helpers el, mmss and transcriptView come from earshot.js, which every page loads first.
"use strict";

(function () {
  var ICE_WAIT_MS = 3000;  // host candidates gather in milliseconds; do not hang on a slow interface

  function $(id) { return document.getElementById(id); }

  function start(root) {
    var startButton = $("try-start"), stopButton = $("try-stop"), status = $("try-status");
    var errorBox = $("try-error"), list = $("try-transcript"), empty = $("try-empty");
    var done = $("try-done"), link = $("try-link");
    var pc = null, mic = null, resource = null, events = null, current = null, seen = {};
    var view = transcriptView(list);  // earshot.js, loaded first by base.html

    function setStatus(text, ok) {
      status.textContent = text;
      status.className = "feed" + (ok === true ? " ok" : ok === false ? " down" : "");
    }

    function showError(message) {
      errorBox.textContent = message;
      errorBox.hidden = false;
    }

    function closeMedia() {
      if (mic) mic.getTracks().forEach(function (t) { t.stop(); });
      mic = null;
      if (pc) pc.close();
      pc = null;
    }

    function reset() {
      closeMedia();
      if (events) events.close();
      events = null;
      resource = null;
      startButton.disabled = false;
      startButton.hidden = false;
      stopButton.hidden = true;
    }

    function waitForIce(conn) {
      return new Promise(function (resolve) {
        if (conn.iceGatheringState === "complete") { resolve(); return; }
        var timer = setTimeout(resolve, ICE_WAIT_MS);
        conn.addEventListener("icegatheringstatechange", function () {
          if (conn.iceGatheringState === "complete") { clearTimeout(timer); resolve(); }
        });
      });
    }

    function ended(callId) {
      if (current !== callId) return;  // already shown
      current = null;
      setStatus("ended", null);
      link.href = "/calls/" + encodeURIComponent(callId);
      done.hidden = false;
      if (!list.children.length) { empty.textContent = "No speech was transcribed in this session."; empty.hidden = false; }
      reset();
    }

    function follow(callId) {
      events = new EventSource("/calls/" + encodeURIComponent(callId) + "/stream");
      events.addEventListener("event", function (e) {
        var ev = JSON.parse(e.data);
        if (seen[ev.event_id]) return;
        seen[ev.event_id] = true;
        if (ev.type === "turn.partial" || ev.type === "turn.final") {
          view.turn(ev, ev.type === "turn.final");
          empty.hidden = true;
        }
      });
      events.addEventListener("end", function () { ended(callId); });
    }

    async function begin() {
      startButton.disabled = true;
      errorBox.hidden = true;
      done.hidden = true;
      while (list.firstChild) list.removeChild(list.firstChild);
      empty.textContent = "Listening… each turn appears when you pause.";
      empty.hidden = false;
      seen = {};
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || !window.RTCPeerConnection) {
        showError("This browser gives pages the microphone only over https:// (or on localhost).");
        reset();
        return;
      }
      try {
        setStatus("asking for the microphone…", null);
        mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
        pc = new RTCPeerConnection();  // no ICE servers: host candidates, as the gateway offers
        mic.getAudioTracks().forEach(function (track) {
          pc.addTransceiver(track, { direction: "sendonly", streams: [mic] });
        });
        pc.addEventListener("connectionstatechange", function () {
          if (!pc) return;
          if (pc.connectionState === "connected") setStatus("live: speak now", true);
          else if (pc.connectionState === "failed") { showError("The WebRTC connection failed."); setStatus("failed", false); }
        });
        setStatus("connecting…", null);
        await pc.setLocalDescription(await pc.createOffer());
        await waitForIce(pc);
        var response = await fetch(root.getAttribute("data-whip"), {
          method: "POST", credentials: "same-origin",
          headers: { "Content-Type": "application/sdp" }, body: pc.localDescription.sdp
        });
        var body = await response.text();
        if (response.status !== 201) {
          var message = body;
          try { message = JSON.parse(body).error.message; } catch (ignored) { /* not JSON: show it as it came */ }
          throw new Error("The gateway refused the session (" + response.status + "): " + message);
        }
        resource = response.headers.get("Location");
        var callId = resource.split("/").pop();
        current = callId;
        follow(callId);
        await pc.setRemoteDescription({ type: "answer", sdp: body });
        root.setAttribute("data-session-id", callId);
        startButton.hidden = true;
        stopButton.disabled = false;
        stopButton.hidden = false;
      } catch (err) {
        showError(err && err.message ? err.message : String(err));
        setStatus("stopped", false);
        if (resource) fetch(resource, { method: "DELETE", credentials: "same-origin" });
        reset();
      }
    }

    async function finish() {
      stopButton.disabled = true;
      setStatus("finishing the last turn…", null);
      var url = resource;
      try {
        // DELETE answers once the session has ended: its last turn is transcribed by then
        if (url) await fetch(url, { method: "DELETE", credentials: "same-origin" });
      } catch (ignored) { /* the connection closing ends the session too */ }
      closeMedia();
      // the call stream's "end" event follows call.ended and shows the link to the history;
      // should the stream be down, the session has ended all the same
      var callId = current;
      setTimeout(function () { ended(callId); }, 10000);
    }

    startButton.addEventListener("click", begin);
    stopButton.addEventListener("click", finish);
    window.addEventListener("pagehide", function () {
      if (resource) fetch(resource, { method: "DELETE", credentials: "same-origin", keepalive: true });
      closeMedia();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = $("try");
    if (root) start(root);
  });
})();
