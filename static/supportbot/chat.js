/*
 * SupportBot chat client: drives the chat UI of /chat/ and of the widget's panel
 * (/chat/embed/, inside the iframe that widget.js adds to any site).
 *
 * Protocol: docs/protocol.md. In short: get a chat token (POST /chat/session/),
 * open /ws/chat/?token=..., send `resume` with the last message id held after each
 * `conversation` frame, then `message` frames with a fresh client_id each. Bot
 * replies arrive as a `message` (status streaming), `token` frames and a final
 * `reply_done` whose body replaces the streamed text.
 *
 * Nothing the customer writes is lost: an unsent or unacknowledged message stays
 * in an outbox (localStorage) and is sent again, with the same client_id, after a
 * reconnect; the server recognises resends.
 * All text is rendered with textContent, never innerHTML.
 */
(function () {
  "use strict";

  var root = document.getElementById("supportbot-chat");
  var configEl = document.getElementById("supportbot-chat-config");
  if (!root || !configEl) return;
  var cfg = JSON.parse(configEl.textContent);

  var TOKEN_KEY = "supportbot.chat.token";
  var OUTBOX_KEY = "supportbot.chat.outbox";
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var TYPING_EVERY_MS = 3000;

  // --- storage: localStorage when the browser allows it (a partitioned iframe may not) ---
  var memory = {};
  var store = {
    get: function (k) {
      try { return window.localStorage.getItem(k); } catch (e) { return memory[k] || null; }
    },
    set: function (k, v) {
      try { window.localStorage.setItem(k, v); } catch (e) { memory[k] = v; }
    },
    remove: function (k) {
      try { window.localStorage.removeItem(k); } catch (e) { delete memory[k]; }
    }
  };

  var els = {
    log: document.getElementById("sb-log"),
    form: document.getElementById("sb-form"),
    input: document.getElementById("sb-input"),
    human: document.getElementById("sb-human"),
    close: document.getElementById("sb-close"),
    conn: document.getElementById("sb-conn"),
    banner: document.getElementById("sb-banner"),
    typing: document.getElementById("sb-typing"),
    typingText: document.getElementById("sb-typing-text"),
    alert: document.getElementById("sb-alert")
  };

  var token = store.get(TOKEN_KEY);
  var ws = null;
  var backoff = BACKOFF_MIN_MS;
  var reconnectTimer = null;
  var conversationId = null;
  var status = "bot";
  var messages = new Map(); // server id -> {el, body, data, seq}
  var pending = new Map(); // client_id -> {el, body}
  var outbox = loadOutbox();
  var lastTypingSent = 0;
  var typingTimer = null;
  var panelOpen = !cfg.embedded;
  var stopped = false;

  function loadOutbox() {
    try {
      var items = JSON.parse(store.get(OUTBOX_KEY) || "[]");
      return Array.isArray(items) ? items : [];
    } catch (e) { return []; }
  }
  function saveOutbox() { store.set(OUTBOX_KEY, JSON.stringify(outbox)); }

  function newClientId() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    var bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.prototype.map.call(bytes, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }

  // --- connection ------------------------------------------------------------------------

  function setConn(text) {
    els.conn.textContent = text;
    els.conn.hidden = !text;
  }

  function fetchToken() {
    return fetch(cfg.sessionUrl, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(token ? { token: token } : {})
    }).then(function (response) {
      if (!response.ok) throw new Error("token endpoint answered " + response.status);
      return response.json();
    }).then(function (data) {
      token = data.token;
      store.set(TOKEN_KEY, token);
    });
  }

  function wsUrl() {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    var params = new URLSearchParams({ token: token, segment: cfg.segment || "", page: cfg.page || "" });
    return scheme + "//" + window.location.host + cfg.wsPath + "?" + params.toString();
  }

  function start() {
    setConn("Connecting…");
    fetchToken().then(connect, function () { scheduleReconnect(); });
  }

  function connect() {
    clearTimeout(reconnectTimer);
    var socket = new WebSocket(wsUrl());
    ws = socket;
    socket.onopen = function () {
      backoff = BACKOFF_MIN_MS;
      setConn("");
      // The server answers with a `conversation` frame, which is when we resume.
    };
    socket.onmessage = function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      handle(frame);
    };
    socket.onclose = function (event) {
      if (ws !== socket) return;
      ws = null;
      if (stopped) return;
      if (event.code === 4401) {
        // The token expired or is unknown: get a new one (a new anonymous session).
        token = null;
        store.remove(TOKEN_KEY);
        setConn("Reconnecting…");
        setTimeout(start, BACKOFF_MIN_MS);
        return;
      }
      if (event.code === 4403) {
        setConn("");
        showAlert("This conversation belongs to someone else.");
        return;
      }
      // 1012: the server is restarting; reconnecting (with resume) picks up where it left off.
      scheduleReconnect(event.code === 1012 ? "The chat server is restarting. Reconnecting…" : null);
    };
  }

  function scheduleReconnect(text) {
    setConn(text || "Connection lost. Reconnecting…");
    clearTimeout(reconnectTimer);
    var delay = backoff * (0.75 + Math.random() * 0.5); // jitter: clients do not reconnect in lockstep
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    reconnectTimer = setTimeout(function () { token ? connect() : start(); }, delay);
  }

  function sendFrame(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  // The id to resume after: the newest message held, but never past a reply still
  // streaming, so its final text is replayed if its reply_done was missed.
  function resumeAfter() {
    var last = 0;
    var streaming = Infinity;
    messages.forEach(function (m, id) {
      last = Math.max(last, id);
      if (m.data.status === "streaming") streaming = Math.min(streaming, id);
    });
    return streaming === Infinity ? last : streaming - 1;
  }

  // --- frames from the server -----------------------------------------------------------------

  function handle(frame) {
    switch (frame.type) {
      case "conversation":
        // Sent when the socket opens (id null until the first message starts a conversation)
        // and when the conversation starts, here or in another tab: replay what it holds.
        if (conversationId && frame.id && conversationId !== frame.id) resetLog();
        conversationId = frame.id;
        sendFrame({ type: "resume", after: resumeAfter() });
        setStatus(frame.status, frame.handoff_reason, frame.agent_name);
        if (!frame.bot_available && frame.status === "bot") {
          showBanner("Our assistant is not available yet. Press “Talk to a human” and a support agent will answer.");
        }
        break;
      case "message":
        upsert(frame);
        break;
      case "token":
        onToken(frame);
        break;
      case "reply_done":
        var m = messages.get(frame.id);
        upsert(Object.assign({}, m ? m.data : { role: "bot", client_id: "" }, {
          id: frame.id, body: frame.body, status: frame.status, model_version: frame.model_version
        }));
        setTyping(false);
        notifyUnread();
        break;
      case "typing":
        if (frame.role !== "customer") setTyping(true, frame.role, frame.name);
        break;
      case "handoff":
        setStatus(frame.status, frame.reason, frame.agent_name);
        break;
      case "resumed":
        flushOutbox();
        break;
      case "error":
        onError(frame);
        break;
    }
  }

  function onToken(frame) {
    var m = messages.get(frame.id);
    if (!m) {
      upsert({ type: "message", id: frame.id, role: "bot", body: "", status: "streaming", client_id: "", seq: 0 });
      m = messages.get(frame.id);
    }
    if (typeof frame.seq === "number" && frame.seq <= m.seq) return; // already in the text
    m.body.appendChild(document.createTextNode(frame.delta));
    m.seq = frame.seq;
    setTyping(false);
    scrollDown();
  }

  function onError(frame) {
    var item = frame.client_id ? pending.get(frame.client_id) : null;
    if (frame.code === "rate_limited") {
      if (item) markPending(item, "Waiting to send…");
      setTimeout(flushOutbox, Math.max(1, frame.retry_after || 5) * 1000);
      showAlert(frame.message);
      return;
    }
    if (frame.code === "conversation_closed") setStatus("closed"); // closed by an agent meanwhile
    if (item && ["too_long", "empty", "bad_frame", "conversation_closed"].indexOf(frame.code) !== -1) {
      // Refused for good: keep the text visible, drop it from the outbox.
      outbox = outbox.filter(function (o) { return o.client_id !== frame.client_id; });
      saveOutbox();
      markPending(item, "Not sent: " + frame.message);
      item.el.classList.add("sb-msg--refused");
      pending.delete(frame.client_id);
      setTyping(false);
    }
    showAlert(frame.message);
  }

  // --- rendering -----------------------------------------------------------------------

  function roleLabel(role) {
    return { customer: "You", bot: "Assistant", agent: "Agent", system: "Notice" }[role] || role;
  }

  function makeItem(role, authorName) {
    var el = document.createElement("li");
    el.className = "sb-msg sb-msg--" + role;
    var who = document.createElement("span");
    who.className = "sb-who";
    who.textContent = roleLabel(role) + ": ";
    if (role === "agent" && authorName) {
      // A person answers: their name is shown, not only read out.
      who.className = "sb-author";
      who.textContent = authorName + " · Support team";
    }
    var body = document.createElement("p");
    body.className = "sb-body";
    var meta = document.createElement("div");
    meta.className = "sb-meta";
    el.appendChild(who);
    el.appendChild(body);
    el.appendChild(meta);
    return { el: el, body: body, meta: meta };
  }

  function insertSorted(el, id) {
    // Server messages in id order; pending (unacknowledged) ones stay at the end.
    var children = els.log.children;
    for (var i = 0; i < children.length; i++) {
      var other = children[i].dataset.id;
      if (!other || Number(other) > id) {
        els.log.insertBefore(el, children[i]);
        return;
      }
    }
    els.log.appendChild(el);
  }

  function upsert(data) {
    var m = messages.get(data.id);
    if (!m && data.client_id && pending.has(data.client_id)) {
      // Our own message, acknowledged: it keeps its place and gets its server id.
      var p = pending.get(data.client_id);
      pending.delete(data.client_id);
      outbox = outbox.filter(function (o) { return o.client_id !== data.client_id; });
      saveOutbox();
      p.el.remove();
      m = { el: p.el, body: p.body, meta: p.meta, data: data, seq: 0 };
      m.el.classList.remove("sb-msg--pending");
      m.meta.textContent = "";
      m.el.dataset.id = String(data.id);
      messages.set(data.id, m);
      insertSorted(m.el, data.id);
    } else if (!m) {
      var item = makeItem(data.role, data.author_name);
      m = { el: item.el, body: item.body, meta: item.meta, data: data, seq: -1 };
      m.el.dataset.id = String(data.id);
      messages.set(data.id, m);
      insertSorted(m.el, data.id);
      if (data.client_id) {
        outbox = outbox.filter(function (o) { return o.client_id !== data.client_id; });
        saveOutbox();
      }
    }
    var streaming = data.status === "streaming";
    var incomingSeq = typeof data.seq === "number" ? data.seq : 0;
    if (!streaming || incomingSeq >= m.seq) {
      // The server's text is as new as ours or final: it wins.
      m.body.textContent = data.body || "";
      m.seq = streaming ? incomingSeq : Infinity;
    }
    m.data = Object.assign({}, m.data, data);
    m.el.dataset.status = data.status;
    m.el.setAttribute("aria-busy", streaming ? "true" : "false");
    renderMeta(m);
    if (data.role !== "customer" && !streaming) notifyUnread();
    scrollDown();
  }

  function renderMeta(m) {
    var d = m.data;
    if (m.csat && d.status === "complete") {
      // Already drawn: update the buttons in place, so a focused one keeps the focus.
      pressCsat(m);
      return;
    }
    m.meta.textContent = "";
    m.csat = null;
    if (d.role !== "bot") return;
    if (d.status === "failed") {
      m.el.classList.add("sb-msg--failed");
      var note = document.createElement("span");
      note.textContent = d.body ? "This reply was interrupted." : "The assistant could not answer.";
      m.meta.appendChild(note);
      return;
    }
    if (d.status !== "complete") return;
    var group = document.createElement("div");
    group.className = "sb-csat";
    group.setAttribute("role", "group");
    var label = document.createElement("span");
    label.textContent = "Was this helpful?";
    label.id = "sb-csat-" + d.id;
    group.setAttribute("aria-labelledby", label.id);
    group.appendChild(label);
    m.csat = [];
    [["Yes", true], ["No", false]].forEach(function (choice) {
      var b = document.createElement("button");
      b.type = "button";
      b.className = "sb-csat-btn";
      b.textContent = choice[0];
      b.addEventListener("click", function () {
        if (sendFrame({ type: "csat", message_id: m.data.id, helpful: choice[1] })) {
          m.data.helpful = choice[1];
          pressCsat(m);
        } else {
          showAlert("Not connected; try again in a moment.");
        }
      });
      m.csat.push({ button: b, helpful: choice[1] });
      group.appendChild(b);
    });
    pressCsat(m);
    m.meta.appendChild(group);
  }

  function pressCsat(m) {
    m.csat.forEach(function (c) {
      c.button.setAttribute("aria-pressed", m.data.helpful === c.helpful ? "true" : "false");
    });
  }

  function markPending(item, text) {
    item.meta.textContent = text;
  }

  function resetLog() {
    messages.clear();
    Array.prototype.slice.call(els.log.children).forEach(function (li) {
      if (li.dataset.id) li.remove();
    });
  }

  function scrollDown() {
    els.log.scrollTop = els.log.scrollHeight;
  }

  function setStatus(newStatus, reason, agentName) {
    status = newStatus;
    var waiting = status === "waiting_for_agent" || status === "with_agent";
    els.human.disabled = waiting || status === "closed";
    if (status === "waiting_for_agent") {
      showBanner("A support agent will join this chat. Everything you write is kept for them.");
      setTyping(false);
    } else if (status === "with_agent") {
      showBanner(agentName ? "You are chatting with " + agentName + " from the support team." : "You are chatting with a support agent.");
      setTyping(false);
    } else if (status === "closed") {
      showBanner("This conversation is closed. Reload the page to start a new one.");
    } else {
      els.banner.hidden = true;
    }
  }

  function showBanner(text) {
    els.banner.textContent = text;
    els.banner.hidden = false;
  }

  function showAlert(text) {
    els.alert.textContent = text;
    els.alert.hidden = false;
    clearTimeout(showAlert.timer);
    showAlert.timer = setTimeout(function () { els.alert.hidden = true; }, 8000);
  }

  function setTyping(on, role, name) {
    clearTimeout(typingTimer);
    els.typing.hidden = !on;
    if (on) {
      els.typingText.textContent = role === "agent"
        ? (name ? name + " is typing…" : "The agent is typing…")
        : "The assistant is typing…";
      // A safety net: the indicator never stays up if its end was missed.
      typingTimer = setTimeout(function () { els.typing.hidden = true; }, 30000);
    }
  }

  function notifyUnread() {
    if (cfg.embedded && !panelOpen && window.parent !== window) {
      window.parent.postMessage({ source: "supportbot", type: "unread" }, "*");
    }
  }

  // --- sending ---------------------------------------------------------------------------

  function flushOutbox() {
    outbox.forEach(function (o) {
      sendFrame({ type: "message", client_id: o.client_id, text: o.text });
    });
  }

  function submit() {
    var text = els.input.value.trim();
    if (!text) return;
    if (text.length > cfg.maxChars) {
      showAlert("The message is " + text.length + " characters long; the limit is " + cfg.maxChars + ".");
      return;
    }
    var clientId = newClientId();
    outbox.push({ client_id: clientId, text: text });
    saveOutbox();
    var item = makeItem("customer");
    item.el.classList.add("sb-msg--pending");
    item.body.textContent = text;
    item.meta.textContent = "Sending…";
    pending.set(clientId, item);
    els.log.appendChild(item.el);
    els.input.value = "";
    scrollDown();
    if (status === "bot") setTyping(true, "bot");
    if (!sendFrame({ type: "message", client_id: clientId, text: text })) {
      markPending(item, "Not connected yet; it will be sent when the chat reconnects.");
    }
  }

  // Messages written in an earlier visit but never acknowledged: show them as pending.
  outbox.forEach(function (o) {
    var item = makeItem("customer");
    item.el.classList.add("sb-msg--pending");
    item.body.textContent = o.text;
    item.meta.textContent = "Sending…";
    pending.set(o.client_id, item);
    els.log.appendChild(item.el);
  });

  els.form.addEventListener("submit", function (event) {
    event.preventDefault();
    submit();
  });
  els.input.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
  });
  els.input.addEventListener("input", function () {
    var now = Date.now();
    if (els.input.value && now - lastTypingSent > TYPING_EVERY_MS) {
      lastTypingSent = now;
      sendFrame({ type: "typing" });
    }
  });
  els.human.addEventListener("click", function () {
    if (!sendFrame({ type: "request_human" })) showAlert("Not connected; try again in a moment.");
  });

  // --- inside the widget's iframe --------------------------------------------------------

  if (cfg.embedded) {
    var closePanel = function () {
      window.parent.postMessage({ source: "supportbot", type: "close" }, "*");
    };
    if (els.close) els.close.addEventListener("click", closePanel);
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape") closePanel();
    });
    window.addEventListener("message", function (event) {
      // Only the page that framed us talks to us; it says when the panel opens or closes.
      if (event.source !== window.parent || !event.data || event.data.source !== "supportbot") return;
      if (event.data.type === "open") {
        panelOpen = true;
        els.input.focus();
      } else if (event.data.type === "closed") {
        panelOpen = false;
      }
    });
  }

  window.addEventListener("pagehide", function () { stopped = true; if (ws) ws.close(1000); });
  window.addEventListener("pageshow", function (event) {
    // Back from the back-forward cache: the old socket is gone.
    if (event.persisted) { stopped = false; start(); }
  });
  start();
})();
