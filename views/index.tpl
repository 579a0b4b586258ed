<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1, viewport-fit=cover">
<meta name="color-scheme" content="light dark">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; object-src 'none'">
<title>#{{room}} · Chattle</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/chattle.css">
<script src="/static/chattle.js" defer></script>
</head>
<body data-room="{{room}}">
<header class="top">
  <div class="title">
    <h1><span class="hash">#</span><span id="room-name">{{room}}</span></h1>
    <p id="status" class="status" data-state="connecting" role="status" aria-live="polite">
      <span class="dot" aria-hidden="true"></span><span id="status-text">connecting…</span>
    </p>
  </div>
  <label class="me">
    <span>Name</span>
    <input id="name" name="name" type="text" aria-label="Your name" maxlength="40" placeholder="Your name" autocomplete="nickname" spellcheck="false">
  </label>
</header>

<main id="scroller" class="scroller">
  <p id="empty" class="empty">No messages yet. Say hello!</p>
  <ol id="messages" class="messages" aria-live="polite"></ol>
</main>

<form id="composer" class="composer" autocomplete="off">
  <p id="send-error" class="send-error" role="alert" hidden></p>
  <div class="row">
    <label class="visually-hidden" for="content">Message</label>
    <textarea id="content" name="content" rows="1" maxlength="2000" placeholder="Message #{{room}}" title="Enter sends, Shift+Enter starts a new line" required></textarea>
    <button id="send" type="submit" aria-label="Send">
      <svg viewBox="0 0 24 24" width="20" height="20" aria-hidden="true"><path fill="currentColor" d="M3.4 20.4 21 12 3.4 3.6l-.01 6.53L15 12 3.39 13.87z"/></svg>
    </button>
  </div>
</form>

<template id="message-template">
  <li class="msg">
    <div class="bubble">
      <div class="meta"><span class="from"></span><time class="time"></time></div>
      <div class="content"></div>
    </div>
  </li>
</template>
<template id="notice-template">
  <li class="notice"><span class="notice-text"></span></li>
</template>
</body>
</html>
