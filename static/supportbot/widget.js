/*
 * SupportBot chat widget for any web page:
 *
 *   <script src="https://HOST/static/supportbot/widget.js" defer></script>
 *
 * Optional attributes on that tag: data-segment="pro" (customer segment, kept on
 * the conversation for bias reports), data-label="Chat with us" (bubble text).
 *
 * The bubble lives in a shadow root (styles cannot leak in or out); the chat
 * panel is an iframe of HOST/chat/embed/. The chat therefore runs on HOST's own
 * origin: its websocket's Origin is HOST, which the server's Origin check allows,
 * while a foreign page cannot open the socket itself. The iframe identifies the
 * customer with a signed token kept in its own storage, because browsers drop
 * cookies in cross-site iframes (docs/protocol.md, "Sessions and tokens").
 * Nothing is loaded from any other host; the panel is created on first open.
 */
(function () {
  "use strict";
  if (window.__supportbotWidget) return; // included twice: one bubble is enough
  window.__supportbotWidget = true;

  var script = document.currentScript;
  var base = new URL(script && script.src ? script.src : "/static/supportbot/widget.js", window.location.href);
  var origin = base.origin;
  var segment = (script && script.getAttribute("data-segment")) || "";
  var label = (script && script.getAttribute("data-label")) || "Chat with us";

  var CSS = [
    ":host { all: initial; }",
    ".bubble { position: fixed; right: 20px; bottom: 20px; z-index: 2147483000; display: flex; align-items: center;",
    "  gap: 8px; border: 0; border-radius: 999px; padding: 12px 18px; background: #2456d6; color: #fff;",
    "  font: 600 15px/1.2 system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif; cursor: pointer;",
    "  box-shadow: 0 6px 20px rgba(0,0,0,.25); }",
    ".bubble:focus-visible { outline: 3px solid #ffb020; outline-offset: 3px; }",
    ".bubble svg { width: 20px; height: 20px; fill: currentColor; }",
    ".badge { min-width: 10px; height: 10px; border-radius: 50%; background: #ffb020; }",
    ".badge[hidden] { display: none; }",
    ".panel { position: fixed; right: 20px; bottom: 84px; z-index: 2147483000; width: 380px; height: 560px;",
    "  max-width: calc(100vw - 40px); max-height: calc(100vh - 110px); border-radius: 14px; overflow: hidden;",
    "  box-shadow: 0 12px 40px rgba(0,0,0,.3); background: #fff; }",
    ".panel[hidden] { display: none; }",
    ".panel iframe { width: 100%; height: 100%; border: 0; display: block; }",
    "@media (max-width: 480px) {",
    "  .panel { right: 0; bottom: 0; width: 100vw; height: 100%; max-width: none; max-height: none; border-radius: 0; }",
    "  .open .bubble { display: none; }",
    "}"
  ].join("\n");

  var host = document.createElement("div");
  host.setAttribute("data-supportbot-widget", "");
  var shadow = host.attachShadow({ mode: "open" });
  if (shadow.adoptedStyleSheets !== undefined && window.CSSStyleSheet && CSSStyleSheet.prototype.replaceSync) {
    // A constructed sheet is not an inline <style>, so a strict page CSP still lets it apply.
    var sheet = new CSSStyleSheet();
    sheet.replaceSync(CSS);
    shadow.adoptedStyleSheets = [sheet];
  } else {
    var style = document.createElement("style");
    style.textContent = CSS;
    shadow.appendChild(style);
  }

  var wrap = document.createElement("div");
  var bubble = document.createElement("button");
  bubble.type = "button";
  bubble.className = "bubble";
  bubble.setAttribute("aria-expanded", "false");
  bubble.setAttribute("aria-controls", "supportbot-panel");
  var icon = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  icon.setAttribute("viewBox", "0 0 24 24");
  icon.setAttribute("aria-hidden", "true");
  var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", "M4 4h16a2 2 0 0 1 2 2v10a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V6a2 2 0 0 1 2-2z");
  icon.appendChild(path);
  var text = document.createElement("span");
  text.textContent = label;
  var badge = document.createElement("span");
  badge.className = "badge";
  badge.hidden = true;
  badge.setAttribute("role", "status");
  badge.setAttribute("aria-label", "New reply");
  bubble.appendChild(icon);
  bubble.appendChild(text);
  bubble.appendChild(badge);

  var panel = document.createElement("div");
  panel.className = "panel";
  panel.id = "supportbot-panel";
  panel.hidden = true;
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", "Support chat");
  var frame = null;
  var frameLoaded = false;

  function post(message) {
    // Until the panel has loaded, its window is still an about:blank of this page's origin
    // and a message for HOST's origin would be refused (with a console warning); the load
    // handler tells the panel whether it is open instead.
    if (frame && frameLoaded && frame.contentWindow) {
      message.source = "supportbot";
      frame.contentWindow.postMessage(message, origin);
    }
  }

  function open() {
    if (!frame) {
      frame = document.createElement("iframe");
      frame.title = "Support chat";
      var src = new URL("/chat/embed/", origin);
      if (segment) src.searchParams.set("segment", segment);
      // Where the customer is, without its query string (which may hold private values).
      src.searchParams.set("page", window.location.origin + window.location.pathname);
      frame.src = src.toString();
      frame.addEventListener("load", function () {
        frameLoaded = true;
        post({ type: panel.hidden ? "closed" : "open" });
      });
      panel.appendChild(frame);
    }
    panel.hidden = false;
    wrap.classList.add("open");
    bubble.setAttribute("aria-expanded", "true");
    badge.hidden = true;
    post({ type: "open" });
    frame.focus();
  }

  function close() {
    panel.hidden = true;
    wrap.classList.remove("open");
    bubble.setAttribute("aria-expanded", "false");
    post({ type: "closed" });
    bubble.focus();
  }

  bubble.addEventListener("click", function () { panel.hidden ? open() : close(); });
  window.addEventListener("message", function (event) {
    if (event.origin !== origin || !frame || event.source !== frame.contentWindow) return;
    var data = event.data || {};
    if (data.source !== "supportbot") return;
    if (data.type === "close") close();
    if (data.type === "unread" && panel.hidden) badge.hidden = false;
    // The server does not answer to the host this script came from: the panel shows one
    // line; the fix is for whoever embeds the widget, so it goes to this page's console.
    if (data.type === "unavailable" && typeof data.message === "string") console.error(data.message);
  });

  wrap.appendChild(panel);
  wrap.appendChild(bubble);
  shadow.appendChild(wrap);
  (document.body || document.documentElement).appendChild(host);
})();
