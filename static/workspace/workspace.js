/*
 * The agents' workspace (/agent/): the live socket, the keyboard, and what each page does.
 *
 * Every page opens one socket: /ws/agent/ (the queue, review and stats pages) or
 * /ws/agent/conversations/<id>/ (a live conversation). It keeps the header's
 * "waiting for a human" count live, adds and updates queue rows as they change, and
 * on the conversation page shows the customer's messages, the bot's words and
 * typing as they happen, and sends the agent's messages and typing.
 * Frames: workspace/consumers.py and docs/protocol.md.
 *
 * Shortcuts (also listed by "?"): j/k next/previous, Enter open, n next item,
 * g/b good/bad, 1-5 score, c correct, Ctrl+Enter submit and next, t take over,
 * Esc leaves a text field. Single keys are off while a field has the focus.
 * Text is always set with textContent, never innerHTML.
 */
(function () {
  "use strict";

  var configEl = document.getElementById("ws-config");
  if (!configEl) return;
  var cfg = JSON.parse(configEl.textContent) || {};
  var BACKOFF_MIN_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var RENEW_EVERY_MS = 120000;
  var TYPING_EVERY_MS = 2000;

  var els = {
    waiting: document.getElementById("ws-waiting"),
    waitingCount: document.getElementById("ws-waiting-count"),
    conn: document.getElementById("ws-conn"),
    toast: document.getElementById("ws-toast"),
    help: document.getElementById("ws-help"),
    helpOpen: document.getElementById("ws-help-open")
  };
  var baseTitle = document.title;

  // --- helpers ----------------------------------------------------------------------------

  function csrfToken() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    if (input) return input.value;
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    return match ? decodeURIComponent(match[1]) : "";
  }

  function post(url, data) {
    var body = new URLSearchParams(data || {});
    return fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken(), "Accept": "application/json" },
      body: body
    }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (json) {
        if (!response.ok) {
          var error = new Error(json.message || ("The server answered " + response.status + "."));
          error.code = json.error;
          throw error;
        }
        return json;
      });
    });
  }

  function toast(text) {
    if (!els.toast) return;
    els.toast.textContent = text;
    els.toast.hidden = false;
    clearTimeout(toast.timer);
    toast.timer = setTimeout(function () { els.toast.hidden = true; }, 6000);
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function newClientId() {
    if (window.crypto && window.crypto.randomUUID) return window.crypto.randomUUID();
    return String(Date.now()) + Math.random().toString(16).slice(2);
  }

  function hhmm(iso) {
    var d = new Date(iso);
    return isNaN(d) ? "" : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  }

  // --- the socket ---------------------------------------------------------------------------

  var ws = null;
  var backoff = BACKOFF_MIN_MS;
  var handlers = {}; // frame type -> function(frame), set by the page
  var onOpen = [];

  function socketPath() {
    return cfg.page === "conversation" ? "/ws/agent/conversations/" + cfg.conversation + "/" : "/ws/agent/";
  }

  function connect() {
    var scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    var socket = new WebSocket(scheme + "//" + window.location.host + socketPath());
    ws = socket;
    socket.onopen = function () {
      backoff = BACKOFF_MIN_MS;
      setConn("");
      document.documentElement.dataset.wsLive = "open"; // pages (and tests) can tell live updates flow
      onOpen.forEach(function (fn) { fn(); });
    };
    socket.onmessage = function (event) {
      var frame;
      try { frame = JSON.parse(event.data); } catch (e) { return; }
      var handler = handlers[frame.type] || common[frame.type];
      if (handler) handler(frame);
    };
    socket.onclose = function (event) {
      if (ws !== socket) return;
      ws = null;
      document.documentElement.dataset.wsLive = "closed";
      if (event.code === 4403) { setConn("Not allowed: sign in as a support agent."); return; }
      if (event.code === 4404) { setConn("This conversation does not exist."); return; }
      setConn("Live updates paused. Reconnecting…");
      var delay = backoff * (0.75 + Math.random() * 0.5);
      backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
      setTimeout(connect, delay);
    };
  }

  function send(frame) {
    if (ws && ws.readyState === WebSocket.OPEN) {
      ws.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  function setConn(text) {
    if (els.conn) els.conn.textContent = text;
  }

  function setWaiting(count) {
    if (!els.waitingCount) return;
    var before = Number(els.waitingCount.textContent) || 0;
    els.waitingCount.textContent = String(count);
    els.waiting.classList.toggle("ws-waiting--some", count > 0);
    document.title = (count > 0 ? "(" + count + ") " : "") + baseTitle;
    if (count > before) toast(count === 1 ? "A customer is waiting for a human." : count + " customers are waiting for a human.");
  }

  var common = {
    hello: function (frame) {
      setWaiting(frame.waiting);
      if (frame.queues) setCounts(frame.queues);
    },
    waiting: function (frame) { setWaiting(frame.count); },
    handoff_requested: function () { /* the waiting count that follows says it */ },
    claim: function (frame) {
      var until = document.getElementById("ws-claim-until");
      if (until) until.textContent = hhmm(frame.until);
    },
    error: function (frame) { toast(frame.message); }
  };

  function setCounts(queues) {
    Object.keys(queues).forEach(function (source) {
      var node = document.querySelector('[data-count-for="' + source + '"]');
      if (node) node.textContent = String(queues[source]);
    });
  }

  // --- the keyboard ---------------------------------------------------------------------------

  var keys = {}; // key -> function(event), set by the page
  function typingInField(target) {
    if (!target) return false;
    var tag = target.tagName;
    return tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || target.isContentEditable;
  }

  document.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      if (keys["ctrl+enter"]) { event.preventDefault(); keys["ctrl+enter"](event); }
      return;
    }
    if (event.key === "Escape") {
      if (typingInField(event.target)) { event.target.blur(); event.preventDefault(); }
      return; // an open dialog closes itself
    }
    if (event.ctrlKey || event.metaKey || event.altKey || event.isComposing) return;
    if (typingInField(event.target)) return;
    if (els.help && els.help.open) return;
    if (event.key === "?") {
      event.preventDefault();
      if (els.help && els.help.showModal) els.help.showModal();
      return;
    }
    var handler = keys[event.key];
    if (handler) { event.preventDefault(); handler(event); }
  });
  if (els.helpOpen && els.help) {
    els.helpOpen.addEventListener("click", function () { els.help.showModal(); });
  }

  function submitForm(id) {
    var form = document.getElementById(id);
    if (!form) return;
    if (form.requestSubmit) form.requestSubmit(); else form.submit();
  }

  // --- the queue page -------------------------------------------------------------------------

  function queuePage() {
    var table = document.getElementById("ws-queue");
    var body = table ? table.tBodies[0] : null;
    var selected = -1;
    var filters = cfg.filters || {};

    function rows() { return Array.prototype.slice.call(body.querySelectorAll("tr.ws-row")); }

    function select(index) {
      var all = rows();
      if (!all.length) return;
      selected = Math.max(0, Math.min(index, all.length - 1));
      all.forEach(function (row, i) { row.classList.toggle("ws-selected", i === selected); });
      all[selected].focus();
      all[selected].scrollIntoView({ block: "nearest" });
    }

    keys.j = function () { select(selected + 1); };
    keys.k = function () { select(selected - 1); };
    keys.Enter = function () {
      var row = rows()[selected];
      if (row) window.location.href = row.querySelector("a.ws-open").href;
    };
    keys.n = function () { submitForm("ws-next-form"); };

    function buildRow(item) {
      var tr = el("tr", "ws-row ws-row--new");
      tr.tabIndex = -1;
      tr.dataset.id = item.id;
      tr.dataset.source = item.source;
      tr.dataset.state = item.state;
      var age = el("time", "ws-age", item.created_label);
      age.setAttribute("datetime", item.created_at);
      var td = el("td"); td.appendChild(age); tr.appendChild(td);
      var src = el("td", "ws-src", item.source_label);
      if (item.slot === 2) { src.appendChild(document.createTextNode(" ")); src.appendChild(el("span", "ws-tag", "second review")); }
      tr.appendChild(src);
      var link = el("a", "ws-open");
      link.href = item.url;
      link.appendChild(el("span", "ws-q", item.question));
      link.appendChild(document.createTextNode(" "));
      link.appendChild(el("span", "ws-r", item.reply));
      td = el("td"); td.appendChild(link); tr.appendChild(td);
      tr.appendChild(el("td", "ws-model", item.model_version));
      tr.appendChild(el("td", "ws-seg", item.segment));
      tr.appendChild(el("td", "ws-state"));
      renderState(tr, item);
      return tr;
    }

    function renderState(tr, item) {
      var cell = tr.querySelector(".ws-state");
      cell.textContent = "";
      if (item.claimed_by) cell.appendChild(el("span", "ws-claimed", item.claimed_by + " is on it"));
      else cell.textContent = item.state_label;
      tr.dataset.state = item.state;
    }

    function matches(item) {
      return !filters.source || filters.source === item.source;
    }

    function bump(source, delta) {
      ["all", source].forEach(function (key) {
        var node = document.querySelector('[data-count-for="' + key + '"]');
        if (node) node.textContent = String(Math.max(0, (Number(node.textContent) || 0) + delta));
      });
    }

    handlers.queue_item = function (item) {
      if (!body) return;
      var row = body.querySelector('tr.ws-row[data-id="' + item.id + '"]');
      if (item.change === "added") {
        bump(item.source, 1);
        if (!matches(item) || row) return;
        if (cfg.narrowed) {
          var notice = document.getElementById("ws-new");
          notice.hidden = false;
          notice.querySelector("a").href = window.location.href;
          return;
        }
        var empty = body.querySelector("tr.ws-empty");
        if (empty) empty.remove();
        body.appendChild(buildRow(item)); // first in, first out: the newest goes last
      } else if (item.change === "resolved") {
        bump(item.source, -1);
        if (row && !filters.state) row.remove();
        else if (row) renderState(row, item);
      } else if (row) {
        renderState(row, item); // claimed, released, draft
      }
    };
  }

  // --- the review page ------------------------------------------------------------------------

  function itemPage() {
    var form = document.getElementById("ws-review-form");
    var correction = document.getElementById("ws-correction");
    var claimNote = document.getElementById("ws-claim");

    if (cfg.claim) {
      post("/agent/items/" + cfg.item + "/claim/").then(function (json) {
        claimNote.textContent = "";
        claimNote.appendChild(document.createTextNode("You hold this item until "));
        var until = el("time", "", hhmm(json.until));
        until.id = "ws-claim-until";
        until.setAttribute("datetime", json.until);
        claimNote.appendChild(until);
        claimNote.appendChild(document.createTextNode("."));
        claimNote.dataset.held = "me";
      }).catch(function (error) {
        claimNote.textContent = error.message;
        claimNote.dataset.held = "other";
        if (form) Array.prototype.forEach.call(form.elements, function (field) { field.disabled = true; });
      });
      setInterval(function () {
        if (document.visibilityState === "visible") send({ type: "renew", item: cfg.item });
      }, RENEW_EVERY_MS);
    }

    keys.j = function () { submitForm("ws-next-form"); };
    keys.n = keys.j;
    keys.k = function () { window.location.href = document.getElementById("ws-prev").href; };
    keys.t = function () {
      if (document.getElementById("ws-takeover-form")) submitForm("ws-takeover-form");
      else window.location.href = "/agent/conversations/" + cfg.conversation + "/";
    };
    if (!form) return;

    function check(id) {
      var input = document.getElementById(id);
      if (input && !input.disabled) { input.checked = true; input.dispatchEvent(new Event("change", { bubbles: true })); }
    }
    keys.g = function () { check("ws-good"); };
    keys.b = function () { check("ws-bad"); };
    ["1", "2", "3", "4", "5"].forEach(function (n) { keys[n] = function () { check("ws-score-" + n); }; });
    keys.c = function () {
      if (correction.disabled) return;
      if (!correction.value) { correction.value = cfg.reply; showDiff(); }
      correction.focus();
    };
    keys["ctrl+enter"] = function () {
      var button = document.getElementById("ws-submit-next");
      if (button && !button.disabled) {
        if (form.requestSubmit) form.requestSubmit(button); else button.click();
      }
    };

    var bytesNote = document.getElementById("ws-bytes");
    var diffBox = document.getElementById("ws-diff");
    var maxBytes = Number(correction.dataset.maxBytes) || 4096;
    function showDiff() {
      var text = correction.value;
      var size = new TextEncoder().encode(text.trim()).length;
      bytesNote.textContent = text ? size.toLocaleString() + " of " + maxBytes.toLocaleString() + " bytes" : "";
      bytesNote.classList.toggle("ws-bytes--over", size > maxBytes);
      diffBox.textContent = "";
      diffBox.hidden = !text.trim() || text.trim() === cfg.reply.trim();
      if (diffBox.hidden) return;
      wordDiff(cfg.reply, text).forEach(function (part) {
        diffBox.appendChild(part[0] === "equal" ? document.createTextNode(part[1]) : el(part[0] === "insert" ? "ins" : "del", "", part[1]));
      });
    }
    correction.addEventListener("input", showDiff);
    showDiff();
  }

  // Word diff by longest common subsequence (replies are short: a few hundred words).
  function wordDiff(oldText, newText) {
    var a = oldText.match(/\s+|[^\s]+/g) || [];
    var b = newText.match(/\s+|[^\s]+/g) || [];
    var n = a.length, m = b.length;
    if (n * m > 400000) return [["delete", oldText], ["insert", newText]];
    var lcs = [];
    for (var i = 0; i <= n; i++) { lcs.push(new Uint16Array(m + 1)); }
    for (i = n - 1; i >= 0; i--) {
      for (var j = m - 1; j >= 0; j--) {
        lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
      }
    }
    var out = [];
    function push(op, text) {
      var last = out[out.length - 1];
      if (last && last[0] === op) last[1] += text; else out.push([op, text]);
    }
    i = 0; j = 0;
    while (i < n && j < m) {
      if (a[i] === b[j]) { push("equal", a[i]); i++; j++; }
      else if (lcs[i + 1][j] >= lcs[i][j + 1]) { push("delete", a[i]); i++; }
      else { push("insert", b[j]); j++; }
    }
    while (i < n) { push("delete", a[i++]); }
    while (j < m) { push("insert", b[j++]); }
    return out;
  }

  // --- the live conversation page ---------------------------------------------------------------

  function conversationPage() {
    var log = document.getElementById("ws-transcript");
    var composer = document.getElementById("ws-composer");
    var input = document.getElementById("ws-compose");
    var sendButton = document.getElementById("ws-send");
    var statusEl = document.getElementById("ws-status");
    var typingEl = document.getElementById("ws-typing");
    var buttons = {
      takeover: document.getElementById("ws-takeover"),
      handback: document.getElementById("ws-handback"),
      close: document.getElementById("ws-close")
    };
    var labels = { bot: "Bot answering", waiting_for_agent: "Waiting for an agent", with_agent: "With an agent", closed: "Closed" };
    var mine = !!cfg.mine;
    var status = cfg.status;
    var pending = {}; // client_id -> text, until the server saves it
    var lastTyping = 0;
    var typingTimer = null;

    function setState(newStatus, agentName, isMine) {
      status = newStatus;
      mine = newStatus === "with_agent" && isMine;
      statusEl.textContent = labels[status] + (status === "with_agent" && agentName ? " · " + agentName : "");
      statusEl.dataset.status = status;
      buttons.takeover.hidden = status === "closed" || mine;
      buttons.handback.hidden = !mine;
      buttons.close.hidden = status === "closed";
      input.disabled = !mine;
      sendButton.disabled = !mine;
      input.placeholder = mine
        ? "Write to the customer (Enter sends, Shift+Enter new line)"
        : (status === "closed" ? "This conversation is closed." : "Take the conversation over to write to the customer");
    }

    function whoLabel(frame) {
      if (frame.role === "agent") return frame.author_name || "Agent";
      return { bot: "Bot", customer: "Customer", system: "Notice" }[frame.role] || frame.role;
    }

    function findItem(id) { return log.querySelector('li[data-id="' + id + '"]'); }

    function upsert(frame) {
      var li = findItem(frame.id);
      if (!li) {
        li = el("li", "ws-m ws-m--" + frame.role);
        li.dataset.id = frame.id;
        li.appendChild(el("span", "ws-who", whoLabel(frame)));
        li.appendChild(el("p", "ws-body"));
        li.appendChild(el("span", "ws-meta"));
        var after = null;
        Array.prototype.forEach.call(log.children, function (other) {
          if (!after && Number(other.dataset.id) > frame.id) after = other;
        });
        log.insertBefore(li, after);
      }
      li.dataset.status = frame.status || "complete";
      li.querySelector(".ws-body").textContent = frame.body || "";
      li.dataset.seq = frame.seq || 0;
      var meta = li.querySelector(".ws-meta");
      meta.textContent = hhmm(frame.created_at) + (frame.status === "streaming" ? " · writing…" : frame.status === "failed" ? " · failed" : "");
      if (frame.helpful === true) meta.textContent += " · customer: helpful";
      if (frame.helpful === false) meta.textContent += " · customer: not helpful";
      log.scrollTop = log.scrollHeight;
      return li;
    }

    handlers.message = function (frame) {
      upsert(frame);
      if (frame.client_id && pending[frame.client_id] !== undefined) delete pending[frame.client_id];
      if (frame.role === "customer") showTyping(false);
    };
    handlers.token = function (frame) {
      var li = findItem(frame.id) || upsert({ id: frame.id, role: "bot", body: "", status: "streaming", seq: 0 });
      if (frame.seq <= Number(li.dataset.seq || 0)) return;
      li.querySelector(".ws-body").appendChild(document.createTextNode(frame.delta));
      li.dataset.seq = frame.seq;
      showTyping(false);
    };
    handlers.reply_done = function (frame) {
      var li = findItem(frame.id) || upsert({ id: frame.id, role: "bot", body: frame.body, status: frame.status });
      li.querySelector(".ws-body").textContent = frame.body;
      li.dataset.status = frame.status;
      li.querySelector(".ws-meta").textContent = frame.status === "failed" ? "failed" : "";
    };
    handlers.typing = function (frame) {
      if (frame.role === "customer") showTyping(true, "The customer is typing…");
      else if (frame.role === "bot") showTyping(true, "The bot is writing…");
    };
    handlers.handoff = function (frame) {
      var isMine = frame.status === "with_agent" && (mine || frame.agent_name === cfg.agent_name);
      setState(frame.status, frame.agent_name, isMine);
    };
    handlers.error = function (frame) {
      if (frame.client_id && pending[frame.client_id] !== undefined) {
        input.value = pending[frame.client_id];
        delete pending[frame.client_id];
      }
      toast(frame.message);
    };

    function showTyping(on, text) {
      clearTimeout(typingTimer);
      typingEl.hidden = !on;
      if (on) {
        typingEl.textContent = text;
        typingTimer = setTimeout(function () { typingEl.hidden = true; }, 6000);
      }
    }

    function sendMessage() {
      var text = input.value.trim();
      if (!text || !mine) return;
      var clientId = newClientId();
      if (send({ type: "message", client_id: clientId, text: text })) {
        pending[clientId] = text;
        input.value = "";
      } else {
        document.getElementById("ws-client-id").value = clientId;
        composer.submit(); // no socket: the form posts it
      }
    }

    composer.addEventListener("submit", function (event) {
      event.preventDefault();
      sendMessage();
    });
    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.ctrlKey && !event.isComposing) {
        event.preventDefault();
        sendMessage();
      }
    });
    input.addEventListener("input", function () {
      var now = Date.now();
      if (mine && input.value && now - lastTyping > TYPING_EVERY_MS) {
        lastTyping = now;
        send({ type: "typing" });
      }
    });

    function action(formId, onDone) {
      var form = document.getElementById(formId);
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        post(form.action).then(function (json) {
          onDone(json);
          toast(json.message);
        }).catch(function (error) { toast(error.message); });
      });
    }
    action("ws-takeover-form", function (json) {
      setState(json.status, cfg.agent_name, true);
      input.focus();
    });
    action("ws-handback-form", function (json) { setState(json.status, "", false); });
    action("ws-close-form", function (json) { setState(json.status, "", false); });

    keys.t = function () { if (!buttons.takeover.hidden) submitForm("ws-takeover-form"); };
    onOpen.push(function () {
      // What arrived between the page's rendering and now (or while reconnecting).
      var last = 0;
      Array.prototype.forEach.call(log.children, function (li) { last = Math.max(last, Number(li.dataset.id) || 0); });
      send({ type: "resume", after: last });
    });
    setState(status, "", mine);
    log.scrollTop = log.scrollHeight;
  }

  // --- the training set page --------------------------------------------------------------------

  function trainingPage() {
    var all = document.getElementById("ws-select-all");
    if (!all) return;
    all.addEventListener("change", function () {
      document.querySelectorAll('input[name="candidate"]').forEach(function (box) { box.checked = all.checked; });
    });
  }

  ({ queue: queuePage, item: itemPage, conversation: conversationPage, training: trainingPage }[cfg.page] || function () {})();
  connect();
})();
