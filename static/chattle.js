// Chattle's browser client: long-polls one room over wire protocol version 1.
// No dependencies. Message content is text: it only ever reaches the page through
// textContent, never as HTML.
(function () {
  "use strict";

  var POLL_TIMEOUT_S = 25;          // what the server is asked to hold a poll for
  var POLL_ABORT_MS = 35000;        // longer than the hold, so a quiet room is not an error
  var POST_ABORT_MS = 15000;
  var POST_ATTEMPTS = 4;            // a message is sent at most this often before the page gives up
  var BACKOFF_BASE_MS = 500;
  var BACKOFF_MAX_MS = 30000;
  var MAX_NAME = 40;
  var MAX_CONTENT = 2000;
  var GROUP_GAP_S = 300;            // same sender within 5 minutes: one visual group
  var NAME_KEY = "chattle.name";

  var room = document.body.dataset.room;
  var msgsUrl = "/rooms/" + encodeURIComponent(room) + "/msgs";

  var $ = function (id) { return document.getElementById(id); };
  var scroller = $("scroller"), list = $("messages"), empty = $("empty");
  var statusBox = $("status"), statusText = $("status-text");
  var nameInput = $("name"), form = $("composer"), textarea = $("content");
  var sendButton = $("send"), sendError = $("send-error");
  var messageTemplate = $("message-template"), noticeTemplate = $("notice-template");

  var cursor = null;   // null until the first answer: then every poll sends since=cursor
  var epoch = null;    // the history the cursor belongs to; sent with it, so a history that
                       // started again on the server is told "reset", never passed off as news
  var lastShown = 0;   // highest id on screen, so a repeated answer never duplicates
  var lastSender = null, lastTs = 0;
  var failures = 0;

  // -- name, remembered across reloads -------------------------------------------

  function loadName() {
    try { return localStorage.getItem(NAME_KEY) || ""; } catch (e) { return ""; }
  }
  function saveName(name) {
    try { localStorage.setItem(NAME_KEY, name); } catch (e) { /* private mode: session only */ }
  }
  function myName() { return nameInput.value.trim(); }

  nameInput.maxLength = MAX_NAME;
  textarea.maxLength = MAX_CONTENT;
  nameInput.value = loadName();
  nameInput.addEventListener("input", function () {
    saveName(myName());
    markOwn();
  });

  // -- status ----------------------------------------------------------------------

  function setStatus(state, text) {
    statusBox.dataset.state = state;
    statusText.textContent = text;
  }

  // -- rendering -------------------------------------------------------------------

  function atBottom() {
    return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 48;
  }
  function scrollToBottom() { scroller.scrollTop = scroller.scrollHeight; }

  function formatTime(ts) {
    var when = new Date(ts * 1000);
    var sameDay = when.toDateString() === new Date().toDateString();
    var time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    return sameDay ? time : when.toLocaleDateString([], { month: "short", day: "numeric" }) + " " + time;
  }

  function hueOf(name) {
    var hash = 0;
    for (var i = 0; i < name.length; i++) hash = (hash * 31 + name.charCodeAt(i)) | 0;
    return Math.abs(hash) % 360;
  }

  function renderMessage(message) {
    var item = messageTemplate.content.firstElementChild.cloneNode(true);
    item.dataset.id = message.id;
    item.dataset.from = message.from;
    item.style.setProperty("--hue", hueOf(message.from));
    if (message.from === lastSender && message.ts - lastTs < GROUP_GAP_S) item.classList.add("continued");
    if (message.from === myName()) item.classList.add("own");
    item.querySelector(".from").textContent = message.from;
    var time = item.querySelector(".time");
    time.textContent = formatTime(message.ts);
    time.dateTime = new Date(message.ts * 1000).toISOString();
    time.title = new Date(message.ts * 1000).toLocaleString();
    item.querySelector(".content").textContent = message.content;
    list.appendChild(item);
    lastSender = message.from;
    lastTs = message.ts;
  }

  function renderNotice(text) {
    var item = noticeTemplate.content.firstElementChild.cloneNode(true);
    item.querySelector(".notice-text").textContent = text;
    list.appendChild(item);
    lastSender = null;
  }

  function markOwn() {
    var me = myName();
    list.querySelectorAll(".msg").forEach(function (item) {
      item.classList.toggle("own", item.dataset.from === me);
    });
  }

  function clearView() {
    list.replaceChildren();
    lastShown = 0;
    lastSender = null;
  }

  function apply(answer) {
    var follow = atBottom();
    if (answer.reset) {
      // The room's history started again (the server lost it): our cursor means nothing there now.
      clearView();
      renderNotice("The room's history started again; showing it from here.");
    }
    if (answer.missed > 0) {
      renderNotice(answer.missed + (answer.missed === 1 ? " earlier message is" : " earlier messages are") +
                   " no longer available");
    }
    answer.messages.forEach(function (message) {
      if (message.id > lastShown) {
        renderMessage(message);
        lastShown = message.id;
      }
    });
    cursor = answer.cursor;
    epoch = answer.epoch || null;
    empty.hidden = list.childElementCount > 0;
    if (follow) scrollToBottom();
  }

  // -- network -----------------------------------------------------------------------

  function HttpError(status, message, retryAfter, outcome) {
    this.status = status;
    this.message = message;
    this.retryAfter = retryAfter;
    this.outcome = outcome;         // a post's 503: "unknown" (it may have been posted) or "not written"
  }

  // fetch with a deadline; resolves to the decoded JSON of a 2xx, rejects otherwise
  function request(url, options, abortAfterMs) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, abortAfterMs);
    options.signal = controller.signal;
    options.cache = "no-store";
    return fetch(url, options).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (response.ok) return body;
        var retryAfter = parseFloat(response.headers.get("Retry-After"));
        throw new HttpError(response.status, body.error || ("HTTP " + response.status),
                            isFinite(retryAfter) ? retryAfter * 1000 : 0, body.outcome);
      });
    }).finally(function () { clearTimeout(timer); });
  }

  // Full jitter: anywhere in [0, min(max, base * 2^n)], so a restarted server is not
  // met by every client at the same instant.
  function backoffMs(failureCount) {
    var ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * Math.pow(2, failureCount - 1));
    return Math.random() * ceiling;
  }

  // A backoff wait that ends early when the browser says the network is back.
  var wakeUp = null;
  function sleep(ms) {
    return new Promise(function (resolve) {
      var timer = setTimeout(done, ms);
      function done() { clearTimeout(timer); wakeUp = null; resolve(); }
      wakeUp = done;
    });
  }
  window.addEventListener("online", function () { if (wakeUp) wakeUp(); });

  async function pollForever() {
    for (;;) {
      var url = cursor === null ? msgsUrl
        : msgsUrl + "?since=" + cursor + "&timeout=" + POLL_TIMEOUT_S +
          (epoch ? "&epoch=" + encodeURIComponent(epoch) : "");
      try {
        var answer = await request(url, { method: "GET" }, POLL_ABORT_MS);
        failures = 0;
        setStatus("connected", "connected");
        apply(answer);
      } catch (error) {
        failures += 1;
        var wait = Math.max(backoffMs(failures), (error && error.retryAfter) || 0);
        setStatus("offline", "reconnecting in " + Math.max(1, Math.round(wait / 1000)) + "s…");
        await sleep(wait);
        setStatus("connecting", "connecting…");
      }
    }
  }

  // -- posting -------------------------------------------------------------------------

  function showSendError(text) {
    sendError.textContent = text;
    sendError.hidden = !text;
  }

  var sending = false;
  // The message not yet known to be posted, and the Idempotency-Key it is sent with every
  // time, by the page's own retries and by the user's: the server posts it at most once.
  var pending = null;

  function newKey() {
    var bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);  // also where crypto.randomUUID is not (plain http)
    return Array.from(bytes, function (b) { return (b + 256).toString(16).slice(1); }).join("");
  }

  // Sent again by itself only where that may help: no answer came (the post may or may not
  // have arrived) or the server said 503; anything else it refused would be refused again.
  function worthRetrying(error) {
    return !(error instanceof HttpError) || error.status === 503;
  }

  function wait(ms) {
    return new Promise(function (resolve) { setTimeout(resolve, ms); });
  }

  // The server's answer; else the last error, marked when any attempt may have posted it.
  async function postWithRetries(name, content, key) {
    var mayHavePosted = false;
    for (var attempt = 1; ; attempt++) {
      try {
        return await request(msgsUrl, {
          method: "POST",
          headers: { "Content-Type": "application/json", "Idempotency-Key": key },
          body: JSON.stringify({ from: name, content: content }),
        }, POST_ABORT_MS);
      } catch (error) {
        mayHavePosted = mayHavePosted || !(error instanceof HttpError) || error.outcome === "unknown";
        if (attempt >= POST_ATTEMPTS || !worthRetrying(error)) {
          throw { error: error, mayHavePosted: mayHavePosted };
        }
        await wait(Math.max(backoffMs(attempt), (error && error.retryAfter) || 0));
      }
    }
  }

  async function send() {
    var name = myName(), content = textarea.value;
    if (sending) return;
    if (!name) {
      showSendError("Pick a name first (top right).");
      nameInput.focus();
      return;
    }
    if (!content.trim()) return;
    if (content.length > MAX_CONTENT) {
      showSendError("A message is at most " + MAX_CONTENT + " characters.");
      return;
    }
    if (!pending || pending.name !== name || pending.content !== content) {
      pending = { name: name, content: content, key: newKey() };
    }
    sending = true;
    sendButton.disabled = true;
    try {
      await postWithRetries(name, content, pending.key);
      pending = null;
      showSendError("");
      // Only clear what was sent: the user may have typed on while it was in flight.
      if (textarea.value === content) textarea.value = "";
      autoGrow();
      scrollToBottom();
    } catch (failed) {
      if (failed.mayHavePosted) {
        showSendError("Not confirmed: the server did not answer, so your message may have been posted. " +
                      "It was kept: send it again within a few minutes, and it will not be posted twice.");
      } else {
        showSendError("Not sent: " + (failed.error || failed).message);
      }
    } finally {
      sending = false;
      sendButton.disabled = false;
      textarea.focus();
    }
  }

  function autoGrow() {
    textarea.style.height = "auto";
    textarea.style.height = Math.min(textarea.scrollHeight, 200) + "px";
  }

  form.addEventListener("submit", function (event) {
    event.preventDefault();
    send();
  });
  textarea.addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  textarea.addEventListener("input", autoGrow);

  (nameInput.value ? textarea : nameInput).focus();
  pollForever();
})();
