// imgate web demo: a complete client of the imgate.v1.json subprotocol in one file.
//
// What a real client does, in small: log in with a token, keep one WebSocket, ack what it got
// (cumulatively), load history with Sync, dedupe by inbox seq, resend unacknowledged sends with
// the same client_msg_id after a reconnect, and reconnect by itself with backoff, resuming
// after the highest seq it has.
"use strict";

const $ = (id) => document.getElementById(id);
const PROTOCOL = "imgate.v1.json";
const HISTORY_PAGE = 1000;
const HISTORY_MAX_PAGES = 10;

const state = {
  dev: false,
  uid: null,
  token: null,
  deviceId: null,
  ws: null,
  nextId: 1,
  /** Highest seq that reached this page in a Message or SyncResult: the resume point and what
   *  is acked. The seqs of this page's own sends (from SendOk) do not count: a SendOk can
   *  arrive before a Message with a lower seq, and acking past that would skip it. */
  maxSeq: 0,
  /** Highest seq acknowledged to the server. */
  ackedSeq: 0,
  /** seq -> message, for every message of this user's inbox that the page holds. */
  messages: new Map(),
  /** client_msg_id -> {to, text, requestId} for sends without SendOk yet. */
  pending: new Map(),
  /** request id -> client_msg_id of a send in flight. */
  inflight: new Map(),
  /** uid -> {online: bool|null, unread: number, friend: bool} */
  peers: new Map(),
  selected: null,
  historyLoaded: false,
  syncRequest: 0,
  syncPages: 0,
  backoffMs: 500,
  reconnectTimer: null,
  stopped: true,
};

// ---- small helpers -------------------------------------------------------------------------

function toBase64(text) {
  const bytes = new TextEncoder().encode(text);
  let bin = "";
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin);
}

function fromBase64(b64) {
  try {
    const bin = atob(b64 || "");
    const bytes = Uint8Array.from(bin, (c) => c.charCodeAt(0));
    return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
  } catch {
    return "[binary content]";
  }
}

function randomId(prefix) {
  const a = new Uint8Array(6);
  crypto.getRandomValues(a);
  return prefix + Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

const num = (v) => Number(v || 0);
const session = {
  get: (k) => sessionStorage.getItem("imgate." + k),
  set: (k, v) => sessionStorage.setItem("imgate." + k, v),
  clear: () => sessionStorage.clear(),
};

function setStatus(s, text) {
  const el = $("status");
  el.dataset.state = s;
  el.textContent = text || s;
}

// ---- server config and tokens --------------------------------------------------------------

async function loadConfig() {
  try {
    const r = await fetch("/dev/config");
    state.dev = r.ok && (await r.json()).dev === true;
  } catch {
    state.dev = false;
  }
  $("token-row").hidden = state.dev;
  if (!state.dev) {
    $("login-hint").textContent =
      "Paste a token your backend issued for this user (for a try-out: imgate token --uid NAME).";
  }
}

async function devToken(uid) {
  const r = await fetch("/dev/token?uid=" + encodeURIComponent(uid));
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || "cannot get a token");
  return body.token;
}

async function loadFriends() {
  if (!state.dev) return;
  const r = await fetch("/dev/friends?uid=" + encodeURIComponent(state.uid));
  if (!r.ok) return;
  for (const f of (await r.json()).friends) {
    const p = peer(f.uid);
    p.friend = true;
    p.online = f.online;
  }
  renderFriends();
}

// ---- the connection ------------------------------------------------------------------------

function send(body) {
  const id = state.nextId++;
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    state.ws.send(JSON.stringify({ id: String(id), ...body }));
  }
  return id;
}

function connect() {
  clearTimeout(state.reconnectTimer);
  if (state.stopped) return;
  setStatus("connecting", "connecting…");
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ws", PROTOCOL);
  state.ws = ws;
  ws.onopen = () => {
    send({ login: { token: state.token, deviceId: state.deviceId, lastSeq: String(state.maxSeq) } });
  };
  ws.onmessage = (ev) => {
    let frame;
    try {
      frame = JSON.parse(ev.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  ws.onclose = (ev) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.inflight.clear();
    if (state.stopped) return;
    if (ev.code === 4000) {
      setStatus("offline", "signed in elsewhere");
      return;
    }
    const wait = state.backoffMs;
    state.backoffMs = Math.min(state.backoffMs * 2, 8000);
    setStatus("offline", `offline, retrying in ${Math.ceil(wait / 1000)} s`);
    state.reconnectTimer = setTimeout(connect, wait);
  };
}

function onFrame(f) {
  const id = num(f.id);
  if (f.loginOk) {
    state.backoffMs = 500;
    setStatus("online", "online");
    for (const uid of f.loginOk.onlineFriends || []) {
      const p = peer(uid);
      p.friend = true;
      p.online = true;
    }
    loadFriends();
    if (!state.historyLoaded) {
      state.syncPages = 0;
      requestHistory(0);
    }
    // Sends that never got their SendOk go again, with the same client_msg_id: the server
    // answers a repeat with the original seq, so nothing is stored twice.
    for (const [cmid, p] of state.pending) transmit(cmid, p);
    renderFriends();
  } else if (f.message) {
    addMessage(f.message, true, true);
    ack();
  } else if (f.syncResult) {
    for (const m of f.syncResult.messages || []) addMessage(m, false, true);
    const last = (f.syncResult.messages || []).at(-1);
    if (f.syncResult.hasMore && last && ++state.syncPages < HISTORY_MAX_PAGES) {
      requestHistory(num(last.seq));
    } else {
      state.historyLoaded = true;
      ack();
    }
  } else if (f.sendOk) {
    const cmid = state.inflight.get(id);
    state.inflight.delete(id);
    const p = cmid && state.pending.get(cmid);
    if (p) {
      state.pending.delete(cmid);
      addMessage({
        seq: f.sendOk.seq, fromUid: state.uid, toUid: p.to, clientMsgId: cmid,
        content: toBase64(p.text), serverTimeMs: f.sendOk.serverTimeMs,
      }, false, false);
      ack();
    }
  } else if (f.presence) {
    const p = peer(f.presence.uid);
    p.friend = true;
    p.online = f.presence.online === true;
    renderFriends();
  } else if (f.error) {
    const cmid = state.inflight.get(id);
    if (cmid) {
      state.inflight.delete(id);
      state.pending.delete(cmid);
      renderMessages();
    }
    console.warn("imgate error", f.error.code, f.error.message);
    if (f.error.code === "ERROR_CODE_UNAUTHENTICATED") logout();
  } else if (f.kicked) {
    setStatus("offline", "signed in elsewhere");
  }
}

function requestHistory(afterSeq) {
  state.syncRequest = send({ sync: { afterSeq: String(afterSeq), limit: HISTORY_PAGE } });
}

/** Acknowledges everything up to the highest seq held (the ack is cumulative). */
function ack() {
  if (state.maxSeq > state.ackedSeq) {
    send({ ack: { seq: String(state.maxSeq) } });
    state.ackedSeq = state.maxSeq;
  }
}

function transmit(cmid, p) {
  const id = send({ send: { toUid: p.to, clientMsgId: cmid, content: toBase64(p.text) } });
  state.inflight.set(id, cmid);
}

// ---- the model -----------------------------------------------------------------------------

function peer(uid) {
  if (!state.peers.has(uid)) state.peers.set(uid, { online: null, unread: 0, friend: false });
  return state.peers.get(uid);
}

/** `live`: pushed now (may count as unread); `delivered`: came in a Message or SyncResult. */
function addMessage(m, live, delivered) {
  const seq = num(m.seq);
  if (delivered) state.maxSeq = Math.max(state.maxSeq, seq);
  if (!seq || state.messages.has(seq)) return;
  state.messages.set(seq, m);
  const other = m.fromUid === state.uid ? m.toUid : m.fromUid;
  const p = peer(other);
  if (live && m.fromUid !== state.uid && (other !== state.selected || document.hidden)) {
    p.unread += 1;
  }
  if (other === state.selected) renderMessages();
  renderFriends();
}

// ---- the view ------------------------------------------------------------------------------

function renderFriends() {
  const ul = $("friends");
  ul.replaceChildren();
  const names = [...state.peers.keys()].sort();
  for (const uid of names) {
    const p = state.peers.get(uid);
    const li = document.createElement("li");
    li.dataset.uid = uid;
    li.dataset.online = String(p.online === true);
    if (uid === state.selected) li.classList.add("selected");
    const dot = document.createElement("span");
    dot.className = "dot" + (p.online ? " online" : "");
    dot.title = p.online ? "online" : p.online === false ? "offline" : "not a friend";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = uid;
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = p.unread ? String(p.unread) : "";
    li.append(dot, name, badge);
    li.onclick = () => select(uid);
    ul.append(li);
  }
  renderPeerBar();
}

function renderPeerBar() {
  const bar = $("peer-bar");
  if (!state.selected) {
    bar.textContent = "Pick a friend to start chatting";
    return;
  }
  const p = peer(state.selected);
  bar.textContent = state.selected;
  const presence = document.createElement("span");
  presence.className = "presence";
  presence.textContent = p.online ? "online" : p.online === false ? "offline" : "";
  bar.append(presence);
}

function renderMessages() {
  const ol = $("messages");
  ol.replaceChildren();
  if (!state.selected) return;
  const other = state.selected;
  const rows = [...state.messages.entries()]
    .filter(([, m]) => (m.fromUid === other && m.toUid === state.uid) ||
                       (m.fromUid === state.uid && m.toUid === other))
    .sort((a, b) => a[0] - b[0]);
  for (const [seq, m] of rows) ol.append(bubble(m.fromUid === state.uid, fromBase64(m.content), m, seq));
  for (const [, p] of state.pending) {
    if (p.to === other) ol.append(bubble(true, p.text, null, null));
  }
  ol.scrollTop = ol.scrollHeight;
}

function bubble(mine, text, m, seq) {
  const li = document.createElement("li");
  li.className = "msg" + (mine ? " mine" : "") + (m ? "" : " pending");
  if (seq) li.dataset.seq = String(seq);
  li.textContent = text;
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = m
    ? new Date(num(m.serverTimeMs)).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : "sending…";
  li.append(meta);
  return li;
}

function select(uid) {
  state.selected = uid;
  peer(uid).unread = 0;
  $("text").disabled = false;
  $("send").disabled = false;
  renderFriends();
  renderMessages();
  $("text").focus();
}

// ---- user actions --------------------------------------------------------------------------

async function login(uid, token) {
  state.uid = uid;
  state.token = token;
  state.deviceId = session.get("device." + uid) || randomId("web-");
  session.set("device." + uid, state.deviceId);
  session.set("uid", uid);
  session.set("token", token);
  state.stopped = false;
  $("me-uid").textContent = uid;
  $("me").hidden = false;
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  connect();
}

function logout() {
  state.stopped = true;
  if (state.ws) state.ws.close(1000, "logout");
  session.clear();
  location.reload();
}

$("login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const uid = $("uid").value.trim();
  $("login-error").textContent = "";
  try {
    const token = state.dev ? await devToken(uid) : $("token").value.trim();
    if (!token) throw new Error("a token is needed");
    await login(uid, token);
  } catch (e) {
    $("login-error").textContent = e.message;
  }
});

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("text").value;
  if (!text.trim() || !state.selected) return;
  $("text").value = "";
  const cmid = randomId("c-");
  const p = { to: state.selected, text };
  state.pending.set(cmid, p);
  transmit(cmid, p);
  renderMessages();
});

$("add-friend").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const uid = $("friend-uid").value.trim();
  if (!uid || uid === state.uid) return;
  $("friend-uid").value = "";
  if (state.dev) {
    await fetch(`/dev/befriend?uid=${encodeURIComponent(state.uid)}&friend=${encodeURIComponent(uid)}`);
    await loadFriends();
  }
  peer(uid);
  select(uid);
});

$("logout").addEventListener("click", logout);

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && state.selected) {
    peer(state.selected).unread = 0;
    renderFriends();
  }
});

(async () => {
  await loadConfig();
  const uid = session.get("uid");
  const token = session.get("token");
  if (uid && token) login(uid, token);
})();
