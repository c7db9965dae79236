// The demo page: pick a portrait, open a WebRTC conversation with the avatar, give it speech, watch figures.
// A plain script with no build step and no dependencies; the HTTP API it uses is docs/api.md.
// Tests drive it through window.avatarDemo (bottom of this file), which the buttons use as well.
"use strict";

(function () {
  const TOKEN_KEY = "avatarForcing.token";
  const AVATAR_KEY = "avatarForcing.avatar";
  // Waiting for every ICE candidate puts them all in the offer (the server takes no trickled ones);
  // a STUN/TURN server that does not answer must not hold the call up for long.
  const ICE_GATHER_TIMEOUT_MS = 2000;
  const STATS_PERIOD_MS = 1000;
  // A request the server does not answer within this is treated as "server unreachable".
  const REQUEST_TIMEOUT_MS = 5000;
  // Failed figures requests in a row (one a second) after which the server counts as gone.
  const UNREACHABLE_AFTER = 2;
  // The server's reasons for refusing a new session (503), in words for a person; the server's own
  // message and code follow them on the page.
  const REFUSALS = {
    at_capacity: "The server is full",
    overloaded: "The server is too busy",
    draining: "The server is shutting down",
    not_ready: "The model is not ready yet",
  };

  const $ = (id) => document.getElementById(id);

  // The page's one conversation. `session` holds what a start() created, so stop() can undo it even
  // half-way; a start() that finds its session replaced (stopped meanwhile) cleans up after itself.
  const call = {
    state: "idle", // idle, starting, connecting, live, stopping, failed
    error: null,
    lastSessionId: null, // stays on the page after the conversation ends, for scripts and bug reports
    session: null, // {avatarId, id, pc, stream, remote, timer, polling, prevVideo, client, server}
  };

  // ---- storage (may be unavailable, e.g. some private modes) ----

  function storeGet(key) {
    try {
      return window.localStorage.getItem(key) || "";
    } catch (_) {
      return "";
    }
  }

  function storeSet(key, value) {
    try {
      if (value) window.localStorage.setItem(key, value);
      else window.localStorage.removeItem(key);
    } catch (_) {
      // Not kept across reloads then; everything else still works.
    }
  }

  // ---- HTTP API ----

  class ApiError extends Error {
    constructor(httpStatus, code, message) {
      super(message);
      this.httpStatus = httpStatus;
      this.code = code;
    }
  }

  // Thrown inside a start() that stop() overtook: not an error to show.
  class Cancelled extends Error {}

  function authHeaders(extra) {
    const headers = Object.assign({}, extra || {});
    const token = storeGet(TOKEN_KEY);
    if (token) headers["Authorization"] = "Bearer " + token;
    return headers;
  }

  // fetch() with the bearer token; resolves to the JSON answer (null for 204), rejects with an ApiError
  // whose message is the server's own `error.message` where it sent one.
  async function api(method, path, options) {
    options = options || {};
    const init = { method: method, headers: authHeaders(options.headers) };
    if (options.json !== undefined) {
      init.body = JSON.stringify(options.json);
      init.headers["Content-Type"] = "application/json";
    } else if (options.body !== undefined) {
      init.body = options.body;
    }
    // A server that accepts the connection but never answers must not hold the page up either.
    const abort = new AbortController();
    init.signal = abort.signal;
    const timer = setTimeout(() => abort.abort(), options.timeoutMs || REQUEST_TIMEOUT_MS);
    let response;
    try {
      response = await fetch(path, init);
    } catch (err) {
      const why = err.name === "AbortError" ? "no answer within " + (options.timeoutMs || REQUEST_TIMEOUT_MS) / 1000 + " s" : err.message;
      throw new ApiError(0, "unreachable", "The server is unreachable (" + why + "): it may have stopped or restarted.");
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) throw await apiError(response);
    if (options.blob) return response.blob();
    if (response.status === 204) return null;
    return response.json();
  }

  async function apiError(response) {
    let code = "http_" + response.status;
    let message = "The server answered " + response.status + " " + response.statusText + ".";
    try {
      const body = await response.json();
      if (body && body.error) {
        code = body.error.code || code;
        message = body.error.message || message;
      }
    } catch (_) {
      // Not JSON (a proxy's page, say): keep the status line.
    }
    if (response.status === 503) {
      // Say which refusal it was, then the server's own words and code: "full", "busy", "shutting
      // down" and "still loading" each call for something different from the person.
      const retry = response.headers.get("Retry-After");
      const headline = REFUSALS[code] || "The server cannot take a session now";
      message = headline + " (" + code + "): " + message.replace(/\.?$/, ".") + (retry ? " Retry in " + retry + " s." : "");
    } else if (response.status === 401) {
      message = "This server needs an access token (open \u201cAccess token\u201d below). " + message;
    }
    return new ApiError(response.status, code, message);
  }

  // ---- status lines ----

  function say(id, text, isError) {
    const el = $(id);
    el.textContent = text || "";
    el.classList.toggle("error", !!isError);
  }

  function setState(state) {
    call.state = state;
    const badge = $("call-state");
    badge.textContent = state;
    badge.dataset.state = state;
    updateButtons();
  }

  function updateButtons() {
    const s = call.session;
    const idle = call.state === "idle" || call.state === "failed";
    // Speech needs a connection that carries the avatar: not while it is still being set up.
    const talking = !!(s && s.id) && call.state === "live";
    $("start").disabled = !idle || !selectedAvatar();
    $("stop").disabled = idle || call.state === "stopping";
    $("speech-send").disabled = !talking;
    $("test-phrase").disabled = !talking;
    $("interrupt").disabled = !talking;
  }

  function fmt(x) {
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    return x.toFixed(Math.abs(x) >= 100 ? 1 : 3);
  }

  // ---- portraits ----

  function selectedAvatar() {
    const checked = document.querySelector('input[name="avatar"]:checked');
    return checked ? checked.value : "";
  }

  async function loadAvatars(wanted) {
    let data;
    try {
      data = await api("GET", "/v1/avatars");
    } catch (err) {
      say("avatar-status", err.message, true);
      return;
    }
    const list = $("avatar-list");
    list.querySelectorAll(".avatar").forEach((el) => el.remove());
    const avatars = data.avatars || [];
    $("avatar-empty").hidden = avatars.length > 0;
    wanted = wanted || selectedAvatar() || storeGet(AVATAR_KEY);
    avatars.forEach((avatar, i) => {
      const id = avatar.avatar_id;
      const label = document.createElement("label");
      label.className = "avatar";
      const input = document.createElement("input");
      input.type = "radio";
      input.name = "avatar";
      input.value = id;
      input.checked = id === wanted || (!wanted && i === 0);
      const img = document.createElement("img");
      img.alt = "";
      img.width = 96;
      img.height = 96;
      showThumbnail(img, id);
      const name = document.createElement("span");
      name.textContent = id;
      label.append(input, img, name);
      list.append(label);
    });
    updateButtons();
  }

  function showThumbnail(img, id) {
    const url = "/v1/avatars/" + encodeURIComponent(id) + "/image";
    if (!storeGet(TOKEN_KEY)) {
      img.loading = "lazy";
      img.src = url;
      return;
    }
    // An <img> cannot send the Authorization header: fetch it and show the bytes.
    api("GET", url, { blob: true })
      .then((blob) => {
        img.src = URL.createObjectURL(blob);
      })
      .catch(() => {});
  }

  async function uploadAvatar(event) {
    event.preventDefault();
    const file = $("upload-file").files[0];
    if (!file) return;
    const form = new FormData();
    form.append("image", file);
    $("upload").disabled = true;
    say("avatar-status", "Uploading and finding the face\u2026");
    try {
      const result = await api("POST", "/v1/avatars", { body: form });
      say("avatar-status", "Portrait ready (" + result.width + "\u00d7" + result.height + ").");
      $("upload-form").reset();
      storeSet(AVATAR_KEY, result.avatar_id);
      await loadAvatars(result.avatar_id);
    } catch (err) {
      say("avatar-status", err.message, true);
    } finally {
      $("upload").disabled = false;
    }
  }

  // ---- the conversation ----

  async function openMedia(session) {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      throw new Error(window.isSecureContext ? "This browser offers no camera or microphone."
        : INSECURE);
    }
    const audio = { echoCancellation: true, noiseSuppression: true };
    const video = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 25 } };
    try {
      return await navigator.mediaDevices.getUserMedia({ audio: audio, video: video });
    } catch (err) {
      if (err.name === "NotAllowedError") throw new Error("Camera and microphone access was refused.");
      // No camera, or a busy one: the avatar can still listen to the microphone alone.
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ audio: audio });
        session.note = "No camera (" + err.name + "): the avatar only hears you.";
        return stream;
      } catch (_) {
        throw new Error("Cannot open the camera or microphone (" + err.name + ": " + err.message + ").");
      }
    }
  }

  function iceServersFrom(answer) {
    return (answer.ice_servers || []).map((s) => {
      const server = { urls: s.urls };
      if (s.username) server.username = s.username;
      if (s.credential) server.credential = s.credential;
      return server;
    });
  }

  function addMedia(pc, stream) {
    for (const kind of ["audio", "video"]) {
      const track = stream.getTracks().find((t) => t.kind === kind);
      // sendrecv carries ours out and the avatar's back on one transceiver; without ours, only receive.
      if (track) pc.addTransceiver(track, { direction: "sendrecv", streams: [stream] });
      else pc.addTransceiver(kind, { direction: "recvonly" });
    }
  }

  function iceGatheringDone(pc, timeoutMs) {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const timer = setTimeout(finish, timeoutMs);
      function check() {
        if (pc.iceGatheringState === "complete") finish();
      }
      function finish() {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function showRemote(session, track) {
    session.remote.addTrack(track);
    const video = $("remote");
    if (video.srcObject !== session.remote) video.srcObject = session.remote;
    playRemote();
  }

  function playRemote() {
    const video = $("remote");
    video.play().catch(() => {
      // Autoplay with sound refused (no click on this page yet): play muted, offer to unmute.
      video.muted = true;
      $("unmute").hidden = false;
      video.play().catch(() => {});
    });
  }

  function onConnectionChange(session) {
    if (call.session !== session) return;
    const pc = session.pc;
    const state = pc.connectionState || pc.iceConnectionState;
    if (state === "connected" || state === "completed") {
      if (call.state === "connecting") setState("live");
      say("call-status", session.note);
    } else if (state === "disconnected") {
      say("call-status", "Connection interrupted, trying to recover\u2026");
      // Most often the server itself went away: ask it at once rather than wait for ICE to give up.
      serverReachable().then((ok) => {
        if (!ok && call.session === session) end(UNREACHABLE);
      });
    } else if (state === "failed") {
      serverReachable().then((ok) => {
        if (call.session !== session) return;
        end(ok ? "The media connection failed: the server answers, but no media route between this browser "
          + "and it works (behind NAT or a firewall a TURN server is needed; see README)." : UNREACHABLE);
      });
    }
  }

  const UNREACHABLE = "The server is unreachable: it stopped, restarted or the network went down. "
    + "The conversation has ended; reload the page once the server is back.";

  async function serverReachable() {
    try {
      await api("GET", "/healthz", { timeoutMs: 2000 });
      return true;
    } catch (err) {
      return err.httpStatus !== 0; // any HTTP answer means it is there
    }
  }

  // An offer without a single ICE candidate can never connect: say so now instead of after the server's
  // connect timeout. Chromium on a machine whose only address is loopback offers none unless started
  // with --allow-loopback-in-peer-connection.
  function checkCandidates(sdp) {
    if (/^a=candidate:/m.test(sdp)) return;
    throw new Error("This browser offered no network address for the media (no ICE candidates), so the call "
      + "cannot connect. On a machine reachable only by loopback, start Chromium with "
      + "--allow-loopback-in-peer-connection; otherwise check that WebRTC is not blocked by a browser setting.");
  }

  async function start(avatarId) {
    if (call.session) throw new Error("A conversation is already " + call.state + ".");
    avatarId = avatarId || selectedAvatar();
    if (!avatarId) {
      say("call-status", "Pick or upload a portrait first.", true);
      throw new Error("no portrait chosen");
    }
    const session = {
      avatarId: avatarId, id: null, pc: null, stream: null, remote: new MediaStream(),
      timer: null, polling: null, prevVideo: null, client: null, server: null, note: "", unanswered: 0,
    };
    call.session = session;
    call.error = null;
    setState("starting");
    say("call-status", "Opening the camera and microphone\u2026");
    // After each wait: if stop() ran meanwhile, undo what this start made and leave quietly.
    const stillMine = () => {
      if (call.session !== session) throw new Cancelled("stopped");
    };
    try {
      session.stream = await openMedia(session);
      stillMine();
      $("local").srcObject = session.stream;
      const ice = await api("GET", "/v1/ice-servers");
      stillMine();
      const pc = (session.pc = new RTCPeerConnection({ iceServers: iceServersFrom(ice) }));
      pc.addEventListener("track", (event) => showRemote(session, event.track));
      pc.addEventListener("connectionstatechange", () => onConnectionChange(session));
      pc.addEventListener("iceconnectionstatechange", () => onConnectionChange(session));
      addMedia(pc, session.stream);
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringDone(pc, ICE_GATHER_TIMEOUT_MS);
      stillMine();
      checkCandidates(pc.localDescription.sdp);
      setState("connecting");
      say("call-status", "Connecting to the avatar\u2026");
      const answer = await api("POST", "/v1/sessions", {
        json: { sdp: pc.localDescription.sdp, type: "offer", avatar_id: avatarId },
      });
      session.id = answer.session_id;
      showSessionId(session.id, false);
      stillMine();
      storeSet(AVATAR_KEY, avatarId);
      await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
      stillMine();
      updateButtons();
      session.timer = setInterval(() => tick(session), STATS_PERIOD_MS);
      onConnectionChange(session); // it may have connected already
      return session.id;
    } catch (err) {
      await release(session);
      if (err instanceof Cancelled) return null;
      if (call.session === session) end(err.message);
      throw err;
    }
  }

  function delay(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
  }

  // Undo everything a session holds; safe to call twice.
  async function release(session) {
    clearInterval(session.timer);
    session.timer = null;
    // The camera and microphone go off at once.
    if (session.stream) session.stream.getTracks().forEach((t) => t.stop());
    // A figures request already on its way lands first, so it does not meet a deleted session.
    if (session.polling) await Promise.race([session.polling, delay(1000)]);
    const id = session.id;
    session.id = null;
    if (id) {
      // DELETE before closing the connection: a closed connection makes the server end the session on
      // its own, and the DELETE would then find nothing. A server that does not answer cannot hold us up.
      const gone = api("DELETE", "/v1/sessions/" + encodeURIComponent(id)).catch((err) => {
        if (err.httpStatus !== 404) console.warn("closing the session:", err.message);
      });
      await Promise.race([gone, delay(2000)]);
    }
    if (session.pc) session.pc.close();
  }

  // Leave the session (if it is still the current one) with an error message.
  function end(message) {
    const session = call.session;
    if (!session) return;
    const id = session.id;
    call.session = null;
    call.error = message;
    release(session).then(() => showFinalFigures(id, message === UNREACHABLE ? "unreachable" : "failed"));
    clearVideos();
    say("call-status", message, true);
    setState("failed");
  }

  async function stop() {
    const session = call.session;
    if (!session) return;
    setState("stopping");
    call.session = null;
    const id = session.id;
    await release(session);
    clearVideos();
    say("call-status", "");
    setState("idle");
    await showFinalFigures(id, "stopped");
  }

  // After a conversation the figures stay for reading, but must not claim it is still live: show the
  // server's final answer (it keeps an ended session for a minute), or mark the last one as ended.
  async function showFinalFigures(id, why) {
    if (id) showSessionId(id, true);
    let final = null;
    if (id && why !== "unreachable") {
      try {
        final = await api("GET", "/v1/sessions/" + encodeURIComponent(id), { timeoutMs: 2000 });
      } catch (_) {
        // Forgotten or unreachable: fall back to the last figures we have.
      }
    }
    if (call.session) return; // a new conversation started meanwhile: its figures win
    if (final) {
      showServerFigures(final);
      return;
    }
    const stateCell = document.querySelector('#server-stats tr[data-key="state"] td');
    if (stateCell) stateCell.textContent = "ended (" + why + ")";
    $("call-figures").textContent = "";
  }

  function showSessionId(id, ended) {
    call.lastSessionId = id;
    $("session-id").textContent = id;
    $("session-line").hidden = false;
    $("session-ended").hidden = !ended;
    $("copy-status").textContent = "";
  }

  async function copySessionId() {
    const id = $("session-id").textContent;
    try {
      await navigator.clipboard.writeText(id);
    } catch (_) {
      // No clipboard API (plain http from another machine): select the text so Ctrl-C copies it.
      const range = document.createRange();
      range.selectNodeContents($("session-id"));
      const selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      $("copy-status").textContent = "Selected: press Ctrl-C to copy.";
      return;
    }
    $("copy-status").textContent = "Copied.";
  }

  function clearVideos() {
    $("remote").srcObject = null;
    $("local").srcObject = null;
    $("unmute").hidden = true;
  }

  // ---- live figures ----

  // The browser's own view of the call, from getStats(): numbers only, grouped by direction and kind.
  async function clientStats(pc) {
    const report = await pc.getStats();
    const out = { timestamp: performance.now(), video: {}, audio: {}, sent: { video: {}, audio: {} }, rttMs: null };
    const pairs = {};
    let selectedPair = null;
    report.forEach((s) => {
      const kind = s.kind || s.mediaType;
      if (s.type === "inbound-rtp" && (kind === "video" || kind === "audio")) {
        const into = out[kind];
        for (const key of ["framesDecoded", "framesPerSecond", "frameWidth", "frameHeight", "framesDropped",
          "packetsReceived", "packetsLost", "jitter", "bytesReceived"]) {
          if (typeof s[key] === "number") into[key] = s[key];
        }
      } else if (s.type === "outbound-rtp" && (kind === "video" || kind === "audio")) {
        const into = out.sent[kind];
        for (const key of ["framesSent", "framesPerSecond", "frameWidth", "frameHeight", "packetsSent", "bytesSent"]) {
          if (typeof s[key] === "number") into[key] = s[key];
        }
      } else if (s.type === "candidate-pair") {
        pairs[s.id] = s;
        if (s.selected || (s.nominated && s.state === "succeeded" && !selectedPair)) selectedPair = s;
      } else if (s.type === "transport" && s.selectedCandidatePairId) {
        selectedPair = { ref: s.selectedCandidatePairId };
      }
    });
    if (selectedPair && selectedPair.ref) selectedPair = pairs[selectedPair.ref];
    if (selectedPair && typeof selectedPair.currentRoundTripTime === "number") {
      out.rttMs = selectedPair.currentRoundTripTime * 1000;
    }
    return out;
  }

  // Rows shown for the browser side; fps from the decoded-frame count, since not every browser fills
  // framesPerSecond.
  function clientRows(session, stats) {
    const rows = [];
    const v = stats.video;
    const a = stats.audio;
    const prev = session.prevVideo;
    let fps = v.framesPerSecond;
    if (prev && typeof v.framesDecoded === "number" && stats.timestamp > prev.timestamp) {
      fps = ((v.framesDecoded - prev.framesDecoded) * 1000) / (stats.timestamp - prev.timestamp);
    }
    session.prevVideo = { timestamp: stats.timestamp, framesDecoded: v.framesDecoded };
    if (fps !== undefined) rows.push(["received fps", fps.toFixed(1)]);
    if (v.frameWidth) rows.push(["received resolution", v.frameWidth + "\u00d7" + v.frameHeight]);
    if (v.framesDecoded !== undefined) rows.push(["video frames decoded", v.framesDecoded]);
    if (stats.rttMs !== null) rows.push(["round-trip time (ms)", stats.rttMs.toFixed(1)]);
    if (v.jitter !== undefined) rows.push(["video jitter (ms)", (v.jitter * 1000).toFixed(1)]);
    if (a.jitter !== undefined) rows.push(["audio jitter (ms)", (a.jitter * 1000).toFixed(1)]);
    if (v.packetsReceived !== undefined) rows.push(["video packets received / lost", v.packetsReceived + " / " + (v.packetsLost || 0)]);
    if (a.packetsReceived !== undefined) rows.push(["audio packets received / lost", a.packetsReceived + " / " + (a.packetsLost || 0)]);
    const sv = stats.sent.video;
    if (sv.frameWidth) rows.push(["camera sent", sv.frameWidth + "\u00d7" + sv.frameHeight + (sv.framesPerSecond ? " @ " + sv.framesPerSecond + " fps" : "")]);
    if (stats.sent.audio.packetsSent !== undefined) rows.push(["microphone packets sent", stats.sent.audio.packetsSent]);
    return rows;
  }

  // Names a person can read for the server's session figures; the most telling come first. A figure the
  // server adds later still appears, named from its key ("video_ticks_skipped" -> "video ticks skipped").
  const SERVER_LABELS = [
    ["timings.block_latency_p50_ms", "block latency, median (ms)"],
    ["timings.block_latency_p99_ms", "block latency, p99 (ms)"],
    ["stats.late_blocks", "late blocks"],
    ["stats.queued_speech_seconds", "queued speech (s)"],
    ["stats.playout_delay_seconds", "playout delay (s)"],
    ["stats.blocks_generated", "blocks generated"],
    ["stats.video_frames_sent", "video frames sent"],
    ["stats.audio_seconds_sent", "audio sent (s)"],
    ["stats.av_offset_ms", "audio/video offset (ms)"],
    ["stats.user_video_frames_received", "your video frames received"],
    ["stats.user_audio_seconds_received", "your audio received (s)"],
    ["stats.user_audio_late_seconds", "your audio too late to use (s)"],
  ];

  function humanLabel(key) {
    const name = key.slice(key.indexOf(".") + 1);
    const units = [["_seconds", " (s)"], ["_ms", " (ms)"], ["_bps", " (bit/s)"]];
    for (const [suffix, unit] of units) {
      if (name.endsWith(suffix)) return name.slice(0, -suffix.length).replace(/_/g, " ") + unit;
    }
    return name.replace(/_/g, " ");
  }

  // The server's session JSON as rows [key, label, value]: the state, then the known figures in their
  // order, then whatever else it sent.
  function serverRows(info) {
    const flat = {};
    function walk(prefix, value) {
      if (value === null || value === undefined) return;
      if (Array.isArray(value)) {
        if (value.every((x) => typeof x === "number")) flat[prefix] = value.map(fmt).join(", ");
      } else if (typeof value === "object") {
        for (const key of Object.keys(value)) walk(prefix + "." + key, value[key]);
      } else if (["number", "string", "boolean"].includes(typeof value)) {
        flat[prefix] = fmt(value);
      }
    }
    walk("stats", info.stats);
    walk("timings", info.timings);
    const state = info.state + (info.end_reason ? " (" + info.end_reason + ")" : "");
    const rows = [["state", "state", state]];
    for (const [key, label] of SERVER_LABELS) {
      if (key in flat) rows.push([key, label, flat[key]]);
    }
    const known = new Set(SERVER_LABELS.map(([key]) => key));
    for (const key of Object.keys(flat)) {
      if (!known.has(key)) rows.push([key, humanLabel(key), flat[key]]);
    }
    return rows;
  }

  // The figures that say whether the avatar keeps up, in one line beside the video (the tables are
  // further down the page).
  function showServerFigures(info) {
    showRows("server-stats", serverRows(info));
    const t = info.timings || {};
    const st = info.stats || {};
    const parts = [];
    if (typeof t.block_latency_p50_ms === "number") {
      parts.push("block latency " + fmt(t.block_latency_p50_ms) + " ms (p99 " + fmt(t.block_latency_p99_ms) + " ms)");
    }
    if (typeof st.late_blocks === "number") parts.push("late blocks " + st.late_blocks);
    if (typeof st.queued_speech_seconds === "number") parts.push("queued speech " + fmt(st.queued_speech_seconds) + " s");
    $("call-figures").textContent = parts.length ? "Server: " + parts.join(" \u00b7 ") : "";
  }

  function showRows(tbodyId, rows) {
    const body = $(tbodyId);
    const fresh = document.createDocumentFragment();
    for (const row of rows) {
      // Server rows carry their key (kept for tests and scripts); browser rows are [label, value].
      const [key, label, value] = row.length === 3 ? row : [row[0], row[0], row[1]];
      const tr = document.createElement("tr");
      tr.dataset.key = key;
      const th = document.createElement("th");
      th.scope = "row";
      th.textContent = label;
      const td = document.createElement("td");
      td.textContent = value;
      tr.append(th, td);
      fresh.append(tr);
    }
    body.replaceChildren(fresh);
  }

  function tick(session) {
    if (session.polling || call.session !== session) return; // a slow answer: skip a beat, don't pile up
    session.polling = poll(session).finally(() => {
      session.polling = null;
    });
  }

  async function poll(session) {
    try {
      session.client = await clientStats(session.pc);
      showRows("client-stats", clientRows(session, session.client));
      if (!session.id || call.session !== session) return;
      try {
        session.server = await api("GET", "/v1/sessions/" + encodeURIComponent(session.id));
        session.unanswered = 0;
      } catch (err) {
        if (err.httpStatus === 404 && call.session === session) {
          session.id = null; // gone already: nothing to DELETE
          return end("The server ended the session.");
        }
        // The figures double as the server's heartbeat: a few unanswered in a row and it is gone.
        if (err.httpStatus === 0 && call.session === session && ++session.unanswered >= UNREACHABLE_AFTER) {
          return end(UNREACHABLE);
        }
        throw err;
      }
      if (call.session !== session) return;
      if (session.server.state === "closed") {
        const why = session.server.end_reason;
        return end("The server closed the session" + (why ? " (" + why + ")." : "."));
      }
      showServerFigures(session.server);
    } catch (err) {
      console.warn("live figures:", err.message);
    }
  }

  // ---- speech ----

  function sessionPath(suffix) {
    const s = call.session;
    if (!s || !s.id) throw new Error("Start a conversation first.");
    return "/v1/sessions/" + encodeURIComponent(s.id) + suffix;
  }

  async function queueSpeech(body, headers, path) {
    try {
      const r = await api("POST", sessionPath(path), { body: body, headers: headers });
      say("speech-status", "Queued " + fmt(r.queued_seconds) + " s of speech; it starts in " + fmt(r.starts_in_seconds) + " s.");
    } catch (err) {
      say("speech-status", err.message, true);
    }
  }

  function sendWav(event) {
    event.preventDefault();
    const file = $("speech-file").files[0];
    if (file) queueSpeech(file, { "Content-Type": "audio/wav" }, "/speech");
  }

  async function interrupt() {
    try {
      const r = await api("POST", sessionPath("/interrupt"));
      say("speech-status", "Interrupted: dropped " + fmt(r.dropped_seconds) + " s of queued speech.");
    } catch (err) {
      say("speech-status", err.message, true);
    }
  }

  // ---- what this server is ----

  const INSECURE = "This page was opened over plain http from another machine, and browsers give the camera "
    + "and microphone only to https pages (or localhost). Serve it over https: avatar-forcing serve "
    + "--tls-cert CERT --tls-key KEY, or a reverse proxy (README, \u201cHTTPS\u201d).";

  // What the person should know before pressing Start: a page that cannot use the camera, a model that
  // is still loading, a model whose random weights make a meaningless face.
  async function showServerNotes() {
    const notes = [];
    if (!window.isSecureContext) notes.push(INSECURE);
    try {
      const ready = await fetch("/readyz").then((r) => r.json());
      if (ready.status !== "ready") {
        notes.push("Not ready for a new session (" + ready.reason + "): " + ready.detail.replace(/\.?$/, "."));
      }
      if (ready.model && ready.model.note) notes.push(ready.model.note);
    } catch (_) {
      notes.push("The server does not answer /readyz.");
    }
    $("server-notes").textContent = notes.join("\n");
    $("server-notes").hidden = notes.length === 0;
  }

  // ---- wiring ----

  function init() {
    const params = new URLSearchParams(window.location.search);
    const wanted = params.get("avatar") || "";
    $("token").value = storeGet(TOKEN_KEY);
    $("token-form").addEventListener("submit", (event) => {
      event.preventDefault();
      storeSet(TOKEN_KEY, $("token").value.trim());
      loadAvatars();
    });
    $("upload-form").addEventListener("submit", uploadAvatar);
    $("avatar-list").addEventListener("change", updateButtons);
    // The error is on the page already; the buttons have nothing more to do with it.
    $("start").addEventListener("click", () => start().catch(() => {}));
    $("stop").addEventListener("click", () => stop());
    $("speech-form").addEventListener("submit", sendWav);
    $("test-phrase").addEventListener("click", () => queueSpeech(undefined, {}, "/speech/test-phrase"));
    $("interrupt").addEventListener("click", interrupt);
    $("copy-session").addEventListener("click", copySessionId);
    $("unmute").addEventListener("click", () => {
      $("remote").muted = false;
      $("unmute").hidden = true;
    });
    // Free the server's slot at once when the tab goes away (keepalive outlives the page).
    window.addEventListener("pagehide", () => {
      const s = call.session;
      if (s && s.id) {
        fetch("/v1/sessions/" + encodeURIComponent(s.id), { method: "DELETE", keepalive: true, headers: authHeaders() })
          .catch(() => {});
      }
    });
    showServerNotes();
    loadAvatars(wanted).then(() => {
      if (params.get("autostart") === "1") start(wanted || undefined).catch(() => {});
    });
    updateButtons();
  }

  // The test hook: the same functions the buttons call.
  window.avatarDemo = {
    start: (avatarId) => start(avatarId),
    stop: () => stop(),
    state: () => {
      const s = call.session;
      return {
        state: call.state,
        error: call.error,
        sessionId: s ? s.id : null,
        lastSessionId: call.lastSessionId,
        avatarId: s ? s.avatarId : selectedAvatar() || null,
        connectionState: s && s.pc ? s.pc.connectionState : null,
        iceConnectionState: s && s.pc ? s.pc.iceConnectionState : null,
      };
    },
    // Fresh browser figures and the server's last session answer (null outside a conversation).
    stats: async () => {
      const s = call.session;
      if (!s || !s.pc) return { client: null, server: null };
      return { client: await clientStats(s.pc), server: s.server };
    },
  };

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
