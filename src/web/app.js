// imgate web demo: a complete client of the imgate.v1.json subprotocol in one file.
//
// What a real client does, in small: log in with a token, keep one WebSocket, ack what it got
// (cumulatively), load history with Sync, dedupe by inbox seq, resend unacknowledged sends with
// the same client_msg_id after a reconnect, and reconnect by itself with backoff, resuming
// after the highest seq it has.
//
// A conversation is a user or a group, keyed "u:<uid>" or "g:<gid>". Groups come from
// LoginOk.groups, GroupChanged and messages with a groupId. Signals carry the demo's own
// conventions: kind "typing" (at most every 2 s while typing) and kind "read" with the decimal
// serverTimeMs of the newest message from others that was on screen (serverTimeMs, unlike the
// per-inbox seq, is the same in every copy of a message).
"use strict";

const $ = (id) => document.getElementById(id);
const PROTOCOL = "imgate.v1.json";
const HISTORY_PAGE = 1000;
const HISTORY_MAX_PAGES = 10;
/** At most one typing signal per conversation this often. */
const TYPING_EVERY_MS = 2000;
/** How long "x is typing…" stays after the last typing signal. */
const TYPING_SHOWN_MS = 3000;

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
  /** client_msg_id -> {conv, text} for sends without SendOk yet. */
  pending: new Map(),
  /** request id -> client_msg_id of a send in flight. */
  inflight: new Map(),
  /** uid -> {online: bool|null, unread: number, friend: bool} */
  peers: new Map(),
  /** gid -> {unread: number, member: bool} */
  groups: new Map(),
  /** The selected conversation's key, "u:<uid>" or "g:<gid>". */
  selected: null,
  /** conversation -> time of the last typing signal sent to it. */
  typingSent: new Map(),
  /** conversation -> (uid -> time until which "uid is typing…" shows). */
  typing: new Map(),
  typingTimer: null,
  /** conversation -> newest serverTimeMs sent in a read signal. */
  readSent: new Map(),
  /** conversation -> (uid -> serverTimeMs that uid has read up to). */
  readBy: new Map(),
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

const userKey = (uid) => "u:" + uid;
const groupKey = (gid) => "g:" + gid;
const isGroup = (conv) => conv.startsWith("g:");
const convId = (conv) => conv.slice(2);

/** The conversation a message belongs to. */
function convOf(m) {
  if (m.groupId) return groupKey(m.groupId);
  return userKey(m.fromUid === state.uid ? m.toUid : m.fromUid);
}

/** The recipient fields of a send or signal to a conversation. */
function recipient(conv) {
  return isGroup(conv) ? { groupId: convId(conv) } : { toUid: convId(conv) };
}

/** Whether this user can write to a conversation (not to a group it is no longer in). */
function canWrite(conv) {
  return !!conv && (!isGroup(conv) || group(convId(conv)).member);
}

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
  $("join-group").hidden = !state.dev;
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
    // LoginOk.groups is the whole list now: a group known here but not in it was left.
    const now = new Set(f.loginOk.groups || []);
    for (const [gid, g] of state.groups) g.member = now.has(gid);
    for (const gid of now) group(gid).member = true;
    loadFriends();
    if (!state.historyLoaded) {
      state.syncPages = 0;
      requestHistory(0);
    }
    // Sends that never got their SendOk go again, with the same client_msg_id: the server
    // answers a repeat with the original seq, so nothing is stored twice.
    for (const [cmid, p] of state.pending) transmit(cmid, p);
    renderFriends();
    renderComposer();
    // The other side may have lost the read marks (they are not stored): tell them again.
    state.readSent.clear();
    markRead();
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
      markRead();
    }
  } else if (f.sendOk) {
    const cmid = state.inflight.get(id);
    state.inflight.delete(id);
    const p = cmid && state.pending.get(cmid);
    if (p) {
      state.pending.delete(cmid);
      addMessage({
        seq: f.sendOk.seq, fromUid: state.uid, ...recipient(p.conv), clientMsgId: cmid,
        content: toBase64(p.text), serverTimeMs: f.sendOk.serverTimeMs,
      }, false, false);
      ack();
    }
  } else if (f.presence) {
    const p = peer(f.presence.uid);
    p.friend = true;
    p.online = f.presence.online === true;
    renderFriends();
  } else if (f.groupChanged) {
    // joined is left out of the JSON when false (a default value).
    group(f.groupChanged.groupId).member = f.groupChanged.joined === true;
    renderFriends();
    renderComposer();
  } else if (f.signal) {
    onSignal(f.signal);
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
  const id = send({ send: { ...recipient(p.conv), clientMsgId: cmid, content: toBase64(p.text) } });
  state.inflight.set(id, cmid);
}

function sendSignal(conv, kind, payloadText) {
  const body = { ...recipient(conv), kind };
  if (payloadText !== undefined) body.payload = toBase64(payloadText);
  send({ signal: body });
}

function onSignal(sig) {
  // A group signal reaches this user's other devices too; the demo shows only others'.
  if (!sig.fromUid || sig.fromUid === state.uid) return;
  const conv = sig.groupId ? groupKey(sig.groupId) : userKey(sig.fromUid);
  if (sig.kind === "typing") {
    if (!state.typing.has(conv)) state.typing.set(conv, new Map());
    state.typing.get(conv).set(sig.fromUid, Date.now() + TYPING_SHOWN_MS);
    renderTyping();
  } else if (sig.kind === "read") {
    const upTo = Number(fromBase64(sig.payload));
    if (!Number.isSafeInteger(upTo) || upTo <= 0) return;
    if (!state.readBy.has(conv)) state.readBy.set(conv, new Map());
    const readers = state.readBy.get(conv);
    if (upTo > (readers.get(sig.fromUid) || 0)) readers.set(sig.fromUid, upTo);
    if (conv === state.selected) renderMessages();
  }
}

/** Tells the selected conversation, if it is on screen, how far this user has read it. */
function markRead() {
  const conv = state.selected;
  if (!conv || document.hidden || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  let newest = 0;
  for (const m of state.messages.values()) {
    if (m.fromUid !== state.uid && convOf(m) === conv) newest = Math.max(newest, num(m.serverTimeMs));
  }
  if (!newest || newest <= (state.readSent.get(conv) || 0)) return;
  state.readSent.set(conv, newest);
  sendSignal(conv, "read", String(newest));
}

/** Sends a typing signal to the selected conversation, at most every TYPING_EVERY_MS. */
function typed() {
  const conv = state.selected;
  if (!canWrite(conv) || !$("text").value) return;
  const now = Date.now();
  if (now - (state.typingSent.get(conv) || 0) < TYPING_EVERY_MS) return;
  state.typingSent.set(conv, now);
  sendSignal(conv, "typing");
}

// ---- the model -----------------------------------------------------------------------------

function peer(uid) {
  if (!state.peers.has(uid)) state.peers.set(uid, { online: null, unread: 0, friend: false });
  return state.peers.get(uid);
}

function group(gid) {
  if (!state.groups.has(gid)) state.groups.set(gid, { unread: 0, member: false });
  return state.groups.get(gid);
}

/** The unread counter of a conversation: a peer's or a group's. */
function conversation(conv) {
  return isGroup(conv) ? group(convId(conv)) : peer(convId(conv));
}

/** `live`: pushed now (may count as unread); `delivered`: came in a Message or SyncResult. */
function addMessage(m, live, delivered) {
  const seq = num(m.seq);
  if (delivered) state.maxSeq = Math.max(state.maxSeq, seq);
  if (!seq || state.messages.has(seq)) return;
  state.messages.set(seq, m);
  const conv = convOf(m);
  // A group message pushed now means this user is in the group, even before GroupChanged.
  if (m.groupId && live && !state.groups.has(m.groupId)) group(m.groupId).member = true;
  const c = conversation(conv);
  if (live && m.fromUid !== state.uid && (conv !== state.selected || document.hidden)) {
    c.unread += 1;
  }
  // A message ends its sender's "typing…".
  state.typing.get(conv)?.delete(m.fromUid);
  if (conv === state.selected) {
    renderMessages();
    renderTyping();
    if (live) markRead();
  }
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
    li.onclick = () => select(userKey(uid));
    ul.append(li);
  }
  $("friend-options").replaceChildren(...names.filter((uid) => state.peers.get(uid).friend)
    .map((uid) => Object.assign(document.createElement("option"), { value: uid })));
  renderGroups();
  renderPeerBar();
}

function renderGroups() {
  const ul = $("groups");
  ul.replaceChildren();
  for (const gid of [...state.groups.keys()].sort()) {
    const g = state.groups.get(gid);
    const li = document.createElement("li");
    li.dataset.group = gid;
    li.dataset.member = String(g.member);
    li.classList.add("group");
    if (!g.member) li.classList.add("left");
    if (groupKey(gid) === state.selected) li.classList.add("selected");
    const mark = document.createElement("span");
    mark.className = "mark";
    mark.textContent = "#";
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = gid;
    name.title = g.member ? "" : "not a member any more";
    const badge = document.createElement("span");
    badge.className = "unread";
    badge.textContent = g.unread ? String(g.unread) : "";
    li.append(mark, name, badge);
    li.onclick = () => select(groupKey(gid));
    ul.append(li);
  }
}

function renderPeerBar() {
  const title = $("peer-title");
  const presence = $("peer-presence");
  const conv = state.selected;
  $("add-member").hidden = !(state.dev && conv && isGroup(conv) && canWrite(conv));
  if (!conv) {
    title.textContent = "Pick a friend or a group to start chatting";
    presence.textContent = "";
    return;
  }
  if (isGroup(conv)) {
    title.textContent = "# " + convId(conv);
    presence.textContent = canWrite(conv) ? "group" : "you are not in this group any more";
  } else {
    const p = peer(convId(conv));
    title.textContent = convId(conv);
    presence.textContent = p.online ? "online" : p.online === false ? "offline" : "";
  }
}

function renderComposer() {
  const ok = canWrite(state.selected);
  $("text").disabled = !ok;
  $("send").disabled = !ok;
  renderPeerBar();
}

function renderTyping() {
  clearTimeout(state.typingTimer);
  const el = $("typing");
  const now = Date.now();
  const who = [];
  let next = Infinity;
  for (const [uid, until] of state.typing.get(state.selected) || []) {
    if (until > now) {
      who.push(uid);
      next = Math.min(next, until);
    }
  }
  who.sort();
  el.textContent = who.length === 0 ? "" :
    who.length === 1 ? `${who[0]} is typing…` : `${who.join(", ")} are typing…`;
  if (next !== Infinity) state.typingTimer = setTimeout(renderTyping, next - now + 10);
}

function renderMessages() {
  const ol = $("messages");
  ol.replaceChildren();
  const conv = state.selected;
  if (!conv) return;
  const rows = [...state.messages.entries()]
    .filter(([, m]) => convOf(m) === conv)
    .sort((a, b) => a[0] - b[0]);
  const readers = state.readBy.get(conv) || new Map();
  for (const [seq, m] of rows) {
    const mine = m.fromUid === state.uid;
    const readBy = mine
      ? [...readers].filter(([, upTo]) => upTo >= num(m.serverTimeMs)).map(([uid]) => uid).sort()
      : [];
    ol.append(bubble(mine, fromBase64(m.content), m, seq, isGroup(conv), readBy));
  }
  for (const [, p] of state.pending) {
    if (p.conv === conv) ol.append(bubble(true, p.text, null, null, false, []));
  }
  ol.scrollTop = ol.scrollHeight;
}

/** One message; `inGroup`: others' bubbles name their sender; `readBy`: who has read it. */
function bubble(mine, text, m, seq, inGroup, readBy) {
  const li = document.createElement("li");
  li.className = "msg" + (mine ? " mine" : "") + (m ? "" : " pending");
  if (seq) li.dataset.seq = String(seq);
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  li.append(body);
  if (inGroup && !mine) {
    const from = document.createElement("span");
    from.className = "from";
    from.textContent = m.fromUid;
    li.append(from);
  }
  const meta = document.createElement("span");
  meta.className = "meta";
  meta.textContent = m
    ? new Date(num(m.serverTimeMs)).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })
    : "sending…";
  if (readBy.length) {
    li.classList.add("read");
    const receipt = document.createElement("span");
    receipt.className = "receipt";
    receipt.textContent = inGroup ? `✓✓ ${readBy.join(", ")}` : "✓✓";
    receipt.title = "read by " + readBy.join(", ");
    meta.append(" ", receipt);
  }
  li.append(meta);
  return li;
}

function select(conv) {
  state.selected = conv;
  conversation(conv).unread = 0;
  renderFriends();
  renderComposer();
  renderMessages();
  renderTyping();
  $("group-error").textContent = "";
  // Selecting says "I have read this" anew, even at the same point (the other side may have
  // reloaded since).
  state.readSent.delete(conv);
  markRead();
  if (canWrite(conv)) $("text").focus();
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
  if (!text.trim() || !canWrite(state.selected)) return;
  $("text").value = "";
  const cmid = randomId("c-");
  const p = { conv: state.selected, text };
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
  select(userKey(uid));
});

/** Adds `uid` to group `gid` through the dev route (a backend's job in a real app). */
async function devJoin(uid, gid) {
  $("group-error").textContent = "";
  const r = await fetch(`/dev/join?uid=${encodeURIComponent(uid)}&group=${encodeURIComponent(gid)}`);
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    $("group-error").textContent = body.error || `cannot add ${uid} to ${gid}`;
  }
  return r.ok;
}

$("join-group").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const gid = $("group-id").value.trim();
  if (!gid || !state.dev) return;
  if (!(await devJoin(state.uid, gid))) return;
  $("group-id").value = "";
  // The 204 comes once the membership is durable; GroupChanged says the same.
  group(gid).member = true;
  select(groupKey(gid));
});

$("add-member").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const conv = state.selected;
  const uid = $("member-uid").value.trim();
  if (!uid || !state.dev || !conv || !isGroup(conv)) return;
  if (await devJoin(uid, convId(conv))) $("member-uid").value = "";
});

$("text").addEventListener("input", typed);

$("logout").addEventListener("click", logout);

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && state.selected) {
    conversation(state.selected).unread = 0;
    renderFriends();
    markRead();
  }
});

(async () => {
  await loadConfig();
  const uid = session.get("uid");
  const token = session.get("token");
  if (uid && token) login(uid, token);
})();
