// shindensen web client: one plain ES module, no build step, no third-party
// code. It speaks only the public API (../shared/API.md): HTTP for accounts,
// chats and history, one WebSocket for live traffic.
//
// Rules this file keeps:
// - Output is never parsed as HTML: every piece of data reaches the page as
//   a text node (`el()` below, `textContent`), so a message containing
//   `<script>` shows as text. There is no `innerHTML` in this file.
// - The token lives in sessionStorage (see README "Web client"): it survives
//   a reload of the tab, is not shared with other tabs, and is gone when the
//   tab closes. It goes to the WebSocket as `?access_token=` because browsers
//   cannot set headers on an upgrade.
// - Messages are kept per chat in a Map keyed by id, so a message that
//   arrives twice (history page + live frame, or a resume replay) shows once,
//   always in id order.
// - A send is shown as pending until its ack; unacked sends keep their
//   `client_msg_id` and are sent again after every reconnect (the server
//   answers a repeat with the original ack and stores nothing new).
// - Reconnects resume with `?since=<highest message id received over the
//   socket>`, so nothing is missed and nothing is doubled.

const SESSION_KEY = 'shindensen.session';
const PENDING_KEY = 'shindensen.pending.';
const PAGE = 50;
const TYPING_SEND_EVERY_MS = 2000;
const TYPING_SHOW_MS = 5000;
const RECONNECT_MAX_MS = 5000;

const $ = (id) => document.getElementById(id);

/** Builds an element; strings and numbers become text nodes, never HTML. */
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'hidden' || key === 'disabled') node[key] = Boolean(value);
    else node.setAttribute(key, String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// ---------------------------------------------------------------- state

const state = {
  token: null,
  user: null, // {id, username}
  chats: new Map(), // chat_id -> Chat summary (API shape)
  members: new Map(), // chat_id -> [{id, username, role, last_read_id}]
  timelines: new Map(), // chat_id -> {byId: Map, hasOlder, loadingOlder}
  fetchingChats: new Map(), // chat_id -> [frames that arrived meanwhile]
  openChatId: null,
  lastSeenId: null, // highest message id received over the socket (resume point)
  pending: new Map(), // client_msg_id -> {chat_id, content, status, error, retryTimer}
  typing: new Map(), // chat_id -> Map(user_id -> {username, timer})
  typingSentAt: new Map(), // chat_id -> ms
  ws: null,
  wsOpen: false,
  everOpened: false,
  reconnectAttempt: 0,
  reconnectTimer: null,
  generation: 0, // bumped when the session ends; stale callbacks check it
};

// ---------------------------------------------------------------- storage

function store(key, value) {
  try {
    if (value === null) sessionStorage.removeItem(key);
    else sessionStorage.setItem(key, JSON.stringify(value));
  } catch {
    // Storage can be unavailable (private modes, quotas): the app still
    // works, it just forgets the session on reload.
  }
}

function load(key) {
  try {
    const raw = sessionStorage.getItem(key);
    return raw ? JSON.parse(raw) : null;
  } catch {
    return null;
  }
}

function savePending() {
  if (!state.user) return;
  const list = [...state.pending].map(([id, p]) => ({
    client_msg_id: id,
    chat_id: p.chat_id,
    content: p.content,
    status: p.status,
    error: p.error ?? null,
  }));
  store(PENDING_KEY + state.user.id, list.length ? list : null);
}

function restorePending() {
  state.pending.clear();
  for (const p of load(PENDING_KEY + state.user.id) ?? []) {
    state.pending.set(p.client_msg_id, {
      chat_id: p.chat_id,
      content: p.content,
      status: p.status === 'failed' ? 'failed' : 'pending',
      error: p.error,
    });
  }
}

function newClientMsgId() {
  // crypto.randomUUID needs a secure context; getRandomValues does not.
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return 'web-' + [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
}

// ---------------------------------------------------------------- HTTP

class ApiError extends Error {
  constructor(status, code, message, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

/** The server could not be reached at all (network down, server stopped). */
class Unreachable extends Error {}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (state.token) headers.Authorization = `Bearer ${state.token}`;
  let res;
  try {
    res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
      credentials: 'omit',
    });
  } catch {
    throw new Unreachable('The server cannot be reached.');
  }
  let data = null;
  if (res.status !== 204) {
    try {
      data = await res.json();
    } catch {
      data = null;
    }
  }
  if (!res.ok) {
    const err = new ApiError(
      res.status,
      data?.code ?? `http_${res.status}`,
      data?.error ?? `The server answered ${res.status}.`,
      Number(res.headers.get('Retry-After')) || null,
    );
    if (res.status === 401 && state.token && !path.startsWith('/login') && !path.startsWith('/register')) {
      sessionExpired();
    }
    if (res.status >= 502 && res.status <= 504 && data?.code === undefined) {
      // A proxy in front of a stopped server.
      throw new Unreachable('The server cannot be reached.');
    }
    throw err;
  }
  return data;
}

function describe(err) {
  if (err instanceof Unreachable) return 'The server cannot be reached. Check your connection.';
  const messages = {
    invalid_credentials: 'Wrong username or password.',
    username_taken: 'That username is taken.',
    invalid_username: 'Usernames are 1 to 32 characters: letters, digits, _ . -',
    invalid_password: 'Passwords are 8 to 128 characters.',
    password_required: 'Enter your password.',
    user_not_found: 'No such user.',
    invalid_target: 'You cannot start a chat with yourself.',
    invalid_title: 'Titles are 1 to 100 characters.',
    too_many_members: 'Too many members for one group.',
    forbidden: 'Only group admins can do that.',
    chat_not_found: 'That chat is gone, or you are no longer a member.',
  };
  if (err.code === 'rate_limited') {
    return err.retryAfter ? `Too many attempts. Try again in ${err.retryAfter} s.` : 'Too many attempts. Try again soon.';
  }
  return messages[err.code] ?? err.message ?? String(err);
}

// ---------------------------------------------------------------- views

function showLogin(notice) {
  $('app-view').hidden = true;
  $('login-view').hidden = false;
  setStatus(null);
  document.body.dataset.view = 'login';
  const box = $('login-notice');
  box.textContent = notice ?? '';
  box.hidden = !notice;
  document.title = 'shindensen';
  $('login-username').focus();
}

function setStatus(text, { offline = false, retry = false } = {}) {
  const box = $('status');
  box.replaceChildren();
  document.body.dataset.connection = text === null ? 'online' : offline ? 'offline' : 'connecting';
  if (text === null) {
    box.hidden = true;
    return;
  }
  box.append(text);
  if (retry) {
    box.append(' ', el('button', { type: 'button', class: 'link', id: 'retry-now', onclick: () => connectNow() }, 'Retry now'));
  }
  box.hidden = false;
}

function showError(id, err) {
  const box = $(id);
  box.textContent = err ? (typeof err === 'string' ? err : describe(err)) : '';
  box.hidden = !err;
}

// ---------------------------------------------------------------- session

async function submitLogin(event) {
  event.preventDefault();
  const form = event.currentTarget;
  const action = event.submitter?.value === 'register' ? 'register' : 'login';
  const username = $('login-username').value.trim();
  const password = $('login-password').value;
  const notice = $('login-notice');
  const fail = (text) => {
    notice.textContent = text;
    notice.hidden = false;
  };
  if (!/^[A-Za-z0-9_.-]{1,32}$/.test(username)) return fail(describe({ code: 'invalid_username' }));
  if (password.length < 8 || password.length > 128) return fail(describe({ code: 'invalid_password' }));
  for (const b of form.querySelectorAll('button')) b.disabled = true;
  try {
    const body = await api('POST', `/${action}`, { username, password });
    $('login-password').value = '';
    store(SESSION_KEY, { token: body.token, user: body.user });
    startSession(body.token, body.user);
  } catch (err) {
    fail(describe(err));
  } finally {
    for (const b of form.querySelectorAll('button')) b.disabled = false;
  }
}

function startSession(token, user) {
  state.generation += 1;
  state.token = token;
  state.user = user;
  state.lastSeenId = null;
  state.everOpened = false;
  state.reconnectAttempt = 0;
  restorePending();
  $('login-view').hidden = true;
  $('app-view').hidden = false;
  document.body.dataset.view = 'app';
  $('me-name').textContent = user.username;
  closeChat();
  renderChatList();
  connect();
}

/** Ends the session locally: socket closed, data dropped. */
function endSession() {
  state.generation += 1;
  clearTimeout(state.reconnectTimer);
  if (state.ws) {
    const ws = state.ws;
    state.ws = null;
    ws.close(1000);
  }
  state.wsOpen = false;
  for (const p of state.pending.values()) clearTimeout(p.retryTimer);
  for (const users of state.typing.values()) for (const t of users.values()) clearTimeout(t.timer);
  state.token = null;
  state.chats.clear();
  state.members.clear();
  state.timelines.clear();
  state.fetchingChats.clear();
  state.typing.clear();
  state.typingSentAt.clear();
  state.pending.clear();
  state.openChatId = null;
  store(SESSION_KEY, null);
}

/** 401 or close 4001: the token expired or was revoked. Unsent messages stay
 *  in sessionStorage and are sent once the same user logs in again. */
function sessionExpired() {
  if (!state.token) return;
  const username = state.user?.username ?? '';
  endSession();
  showLogin('Your session has expired. Please log in again.');
  $('login-username').value = username;
  if (username) $('login-password').focus();
}

async function logout() {
  const token = state.token;
  const user = state.user;
  endSession();
  if (user) store(PENDING_KEY + user.id, null);
  showLogin(null);
  if (token) {
    // Revokes the token where the server supports it; best effort.
    fetch('/logout', { method: 'POST', headers: { Authorization: `Bearer ${token}` } }).catch(() => {});
  }
}

// ---------------------------------------------------------------- connection

function connectNow() {
  state.reconnectAttempt = 0;
  connect();
}

/** Refreshes the chat list (which also tells a dead token from a dead
 *  server), then opens the socket with `since`. */
async function connect() {
  if (!state.token || state.ws) return;
  clearTimeout(state.reconnectTimer);
  state.reconnectTimer = null;
  const gen = state.generation;
  setStatus(state.everOpened ? 'Connection lost. Reconnecting…' : 'Connecting…');
  try {
    await refreshChats();
  } catch (err) {
    if (gen !== state.generation) return;
    if (err instanceof ApiError && err.status === 401) return; // back at the login
    scheduleReconnect(err instanceof Unreachable);
    return;
  }
  if (gen !== state.generation || state.ws) return;
  openSocket(gen);
}

function openSocket(gen) {
  const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const since = state.lastSeenId ?? 0;
  const url = `${proto}//${location.host}/ws?access_token=${encodeURIComponent(state.token)}&since=${since}`;
  const ws = new WebSocket(url);
  state.ws = ws;
  ws.addEventListener('open', () => {
    if (state.ws !== ws) return;
    state.wsOpen = true;
    state.everOpened = true;
    state.reconnectAttempt = 0;
    setStatus(null);
    flushPending();
    renderOpenChat();
    if (state.openChatId !== null) markRead(state.openChatId);
  });
  ws.addEventListener('message', (event) => {
    if (state.ws !== ws || gen !== state.generation) return;
    let frame;
    try {
      frame = JSON.parse(event.data);
    } catch {
      return;
    }
    handleFrame(frame);
  });
  ws.addEventListener('close', (event) => {
    if (state.ws !== ws) return;
    state.ws = null;
    state.wsOpen = false;
    renderOpenChat();
    if (gen !== state.generation) return;
    if (event.code === 4001) {
      sessionExpired();
      return;
    }
    scheduleReconnect(false, event.code);
  });
}

function scheduleReconnect(unreachable, closeCode) {
  clearTimeout(state.reconnectTimer);
  state.reconnectAttempt += 1;
  const base = Math.min(RECONNECT_MAX_MS, 250 * 2 ** (state.reconnectAttempt - 1));
  const delay = Math.round(base * (0.75 + Math.random() * 0.5));
  if (unreachable) {
    setStatus(`Server unreachable. Retrying in ${Math.ceil(delay / 1000)} s…`, { offline: true, retry: true });
  } else if (closeCode === 1001) {
    setStatus('The server is restarting. Reconnecting…');
  } else {
    setStatus('Connection lost. Reconnecting…', { retry: state.reconnectAttempt > 2 });
  }
  state.reconnectTimer = setTimeout(connect, delay);
}

function send(frame) {
  if (!state.wsOpen || !state.ws) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

// ---------------------------------------------------------------- chats

function chatName(chat) {
  if (!chat) return '';
  if (chat.type === 'group') return chat.title ?? 'Group';
  return chat.peer?.username ?? 'Direct chat';
}

function activityKey(chat) {
  return chat.last_message?.timestamp ?? chat.created_at ?? '';
}

/** Replaces the chat list with the server's, keeping anything newer that
 *  arrived live. On the first load it also sets the resume point. */
async function refreshChats() {
  const list = await api('GET', '/chats');
  const seen = new Set();
  let maxId = 0;
  for (const chat of list) {
    seen.add(chat.chat_id);
    maxId = Math.max(maxId, chat.last_message?.id ?? 0);
    const old = state.chats.get(chat.chat_id);
    if (old?.last_message && (chat.last_message?.id ?? 0) < old.last_message.id) {
      // We already received a newer message live; its count is ours.
      chat.last_message = old.last_message;
      chat.unread_count = old.unread_count;
    }
    state.chats.set(chat.chat_id, chat);
  }
  for (const id of [...state.chats.keys()]) {
    if (!seen.has(id)) forgetChat(id);
  }
  if (state.lastSeenId === null) state.lastSeenId = maxId;
  renderChatList();
  renderOpenChat();
}

/** Fetches one chat (with members) and stores it. */
async function fetchChat(chatId) {
  const chat = await api('GET', `/chats/${chatId}`);
  storeChat(chat);
  return chat;
}

function storeChat(chat) {
  const { members, ...summary } = chat;
  const old = state.chats.get(chat.chat_id);
  if (old?.last_message && (summary.last_message?.id ?? 0) < old.last_message.id) {
    summary.last_message = old.last_message;
    summary.unread_count = old.unread_count;
  }
  state.chats.set(chat.chat_id, summary);
  if (members) state.members.set(chat.chat_id, members);
}

function forgetChat(chatId) {
  state.chats.delete(chatId);
  state.members.delete(chatId);
  state.timelines.delete(chatId);
  state.typing.delete(chatId);
  for (const [id, p] of state.pending) {
    if (p.chat_id === chatId) {
      clearTimeout(p.retryTimer);
      state.pending.delete(id);
    }
  }
  savePending();
  if (state.openChatId === chatId) closeChat();
}

/** A frame for a chat we do not know yet (a new direct chat, or we were
 *  added to a group): fetch it, then apply what arrived meanwhile. */
function learnChat(chatId, frame) {
  const waiting = state.fetchingChats.get(chatId);
  if (waiting) {
    waiting.push(frame);
    return;
  }
  state.fetchingChats.set(chatId, [frame]);
  const gen = state.generation;
  fetchChat(chatId)
    .then(() => {
      if (gen !== state.generation) return;
      const frames = state.fetchingChats.get(chatId) ?? [];
      state.fetchingChats.delete(chatId);
      showError('sidebar-error', null);
      for (const f of frames) applyMessage(f);
      renderChatList();
    })
    .catch(() => {
      // Not a member any more (or unreachable: the next refresh finds it).
      state.fetchingChats.delete(chatId);
    });
}

function renderChatList() {
  const list = $('chat-list');
  const focusedId = document.activeElement?.closest?.('.chat-item')?.dataset.chatId;
  const chats = [...state.chats.values()].sort((a, b) => {
    const ka = activityKey(a);
    const kb = activityKey(b);
    if (ka !== kb) return ka < kb ? 1 : -1;
    return b.chat_id - a.chat_id;
  });
  list.replaceChildren(
    ...chats.map((chat) => {
      const last = chat.last_message;
      const preview = last
        ? last.kind && last.kind !== 'text'
          ? last.content
          : `${last.sender_id === state.user?.id ? 'You' : last.sender}: ${last.content}`
        : chat.type === 'group'
          ? `${chat.member_count ?? ''} members`
          : 'No messages yet';
      const unread = chat.unread_count ?? 0;
      return el(
        'li',
        {},
        el(
          'button',
          {
            type: 'button',
            class: 'chat-item',
            dataset: { chatId: String(chat.chat_id), unread: String(unread) },
            'aria-current': state.openChatId === chat.chat_id ? 'true' : null,
            'aria-label': `${chatName(chat)}${unread ? `, ${unread} unread` : ''}`,
            onclick: () => openChat(chat.chat_id),
          },
          el('span', { class: 'name' }, chatName(chat)),
          unread ? el('span', { class: 'unread', 'aria-hidden': 'true' }, String(unread)) : null,
          el('span', { class: 'preview' }, preview),
        ),
      );
    }),
  );
  $('chat-list-empty').hidden = chats.length > 0;
  if (focusedId) list.querySelector(`[data-chat-id="${CSS.escape(focusedId)}"]`)?.focus();
  const total = chats.reduce((n, c) => n + (c.unread_count ?? 0), 0);
  document.title = total ? `(${total}) shindensen` : 'shindensen';
}

// ---------------------------------------------------------------- messages

function timeline(chatId) {
  return state.timelines.get(chatId);
}

function mergeInto(chatId, messages) {
  const tl = timeline(chatId);
  if (!tl) return;
  for (const m of messages) tl.byId.set(m.id, m);
}

/** A message frame, live or replayed. */
function handleMessage(m) {
  if (state.lastSeenId === null || m.id > state.lastSeenId) state.lastSeenId = m.id;
  if (m.client_msg_id && m.sender_id === state.user.id && state.pending.has(m.client_msg_id)) {
    clearTimeout(state.pending.get(m.client_msg_id).retryTimer);
    state.pending.delete(m.client_msg_id);
    savePending();
  }
  const removedMe = m.kind === 'member_removed' && m.event?.user?.id === state.user.id;
  if (!state.chats.has(m.chat_id)) {
    if (removedMe) return;
    learnChat(m.chat_id, m);
    return;
  }
  if (removedMe) {
    // The last frame of that chat we get: it is no longer ours to read.
    const name = chatName(state.chats.get(m.chat_id));
    forgetChat(m.chat_id);
    showError('sidebar-error', m.sender_id === state.user.id ? `You left ${name}.` : `You were removed from ${name}.`);
  } else {
    applyMessage(m);
  }
  renderChatList();
}

/** Updates the chat summary, its timeline and open views for one message. */
function applyMessage(m) {
  const chat = state.chats.get(m.chat_id);
  if (!chat) return;
  const lastId = chat.last_message?.id ?? 0;
  if (m.id > lastId) {
    // Newer than what the summary counted: count it. (A replayed message the
    // chat list already included is not counted twice.)
    chat.last_message = m;
    const kind = m.kind ?? 'text';
    if (kind === 'text' && m.sender_id !== state.user.id && m.id > (chat.last_read_id ?? 0)) {
      chat.unread_count = (chat.unread_count ?? 0) + 1;
    }
  }
  if (m.kind === 'title_changed' && m.event?.title) chat.title = m.event.title;
  if (m.kind === 'member_added' && m.id > lastId) chat.member_count = (chat.member_count ?? 0) + 1;
  if (m.kind === 'member_removed' && m.id > lastId) chat.member_count = Math.max(0, (chat.member_count ?? 1) - 1);
  mergeInto(m.chat_id, [m]);
  stopTyping(m.chat_id, m.sender_id);
  if (m.kind && m.kind !== 'text' && state.members.has(m.chat_id)) {
    // Membership or roles changed: reload the member list.
    const gen = state.generation;
    fetchChat(m.chat_id)
      .then(() => gen === state.generation && renderOpenChat())
      .catch(() => {});
  }
  if (state.openChatId === m.chat_id) {
    renderOpenChat({ newMessage: m });
    markRead(m.chat_id);
  }
}

function handleAck(ack) {
  const p = state.pending.get(ack.client_msg_id);
  if (!p) return;
  clearTimeout(p.retryTimer);
  state.pending.delete(ack.client_msg_id);
  savePending();
  const tl = timeline(ack.chat_id);
  if (tl && !tl.byId.has(ack.id)) {
    // A resend answered with the original ack, whose message frame we did
    // not get on this connection: we know what it says.
    tl.byId.set(ack.id, {
      id: ack.id,
      chat_id: ack.chat_id,
      sender: state.user.username,
      sender_id: state.user.id,
      kind: 'text',
      content: p.content,
      timestamp: ack.timestamp,
    });
  }
  if (state.openChatId === ack.chat_id) renderOpenChat();
}

const RETRYABLE = new Set(['rate_limited', 'unavailable', 'internal_error']);

function handleError(frame) {
  const p = frame.client_msg_id ? state.pending.get(frame.client_msg_id) : null;
  if (!p) {
    if (frame.code === 'chat_not_found' && state.openChatId !== null) refreshChats().catch(() => {});
    return;
  }
  if (RETRYABLE.has(frame.code)) {
    clearTimeout(p.retryTimer);
    p.retryTimer = setTimeout(() => sendPending(frame.client_msg_id), 1000);
    return;
  }
  p.status = 'failed';
  p.error = frame.message || frame.code;
  savePending();
  if (state.openChatId === p.chat_id) renderOpenChat();
}

function sendPending(clientMsgId) {
  const p = state.pending.get(clientMsgId);
  if (!p || p.status !== 'pending') return;
  send({ type: 'send', chat_id: p.chat_id, content: p.content, client_msg_id: clientMsgId });
}

function flushPending() {
  for (const id of state.pending.keys()) sendPending(id);
}

function sendMessage(chatId, content) {
  const id = newClientMsgId();
  state.pending.set(id, { chat_id: chatId, content, status: 'pending', error: null });
  savePending();
  sendPending(id);
  renderOpenChat({ scrollToEnd: true });
}

function handleResync() {
  // The replay was capped: what lies between it and the live stream is not
  // in our timelines. Drop them (the open chat reloads its latest page) and
  // reload the chat list.
  state.timelines.clear();
  const gen = state.generation;
  refreshChats()
    .then(() => {
      if (gen !== state.generation) return;
      const max = Math.max(0, ...[...state.chats.values()].map((c) => c.last_message?.id ?? 0));
      state.lastSeenId = Math.max(state.lastSeenId ?? 0, max);
      if (state.openChatId !== null) openChat(state.openChatId);
    })
    .catch(() => {});
}

function handleRead(frame) {
  const members = state.members.get(frame.chat_id);
  const member = members?.find((m) => m.id === frame.user_id);
  if (member) member.last_read_id = Math.max(member.last_read_id ?? 0, frame.up_to);
  if (frame.user_id === state.user.id) {
    // Read on another device of ours.
    const chat = state.chats.get(frame.chat_id);
    if (chat) {
      chat.last_read_id = Math.max(chat.last_read_id ?? 0, frame.up_to);
      if (frame.up_to >= (chat.last_message?.id ?? 0)) chat.unread_count = 0;
      else fetchChat(frame.chat_id).then(renderChatList).catch(() => {});
      renderChatList();
    }
  }
  if (state.openChatId === frame.chat_id) renderOpenChat();
}

function handleFrame(frame) {
  switch (frame.type ?? 'message') {
    case 'message':
      return handleMessage(frame);
    case 'ack':
      return handleAck(frame);
    case 'error':
      return handleError(frame);
    case 'resync':
      return handleResync();
    case 'read':
      return handleRead(frame);
    case 'typing':
      return handleTyping(frame);
    default:
      // Unknown frame types are ignored (forward compatible).
      return undefined;
  }
}

// ---------------------------------------------------------------- typing

function handleTyping(frame) {
  if (frame.user_id === state.user.id) return;
  let users = state.typing.get(frame.chat_id);
  if (!users) state.typing.set(frame.chat_id, (users = new Map()));
  clearTimeout(users.get(frame.user_id)?.timer);
  users.set(frame.user_id, {
    username: frame.username,
    timer: setTimeout(() => stopTyping(frame.chat_id, frame.user_id), TYPING_SHOW_MS),
  });
  if (state.openChatId === frame.chat_id) renderTyping();
}

function stopTyping(chatId, userId) {
  const users = state.typing.get(chatId);
  if (!users?.has(userId)) return;
  clearTimeout(users.get(userId).timer);
  users.delete(userId);
  if (state.openChatId === chatId) renderTyping();
}

function renderTyping() {
  const users = [...(state.typing.get(state.openChatId)?.values() ?? [])].map((u) => u.username);
  let text = '';
  if (users.length === 1) text = `${users[0]} is typing…`;
  else if (users.length === 2) text = `${users[0]} and ${users[1]} are typing…`;
  else if (users.length > 2) text = 'Several people are typing…';
  $('typing').textContent = text;
}

function composerInput() {
  const chatId = state.openChatId;
  if (chatId === null || !$('composer-input').value.trim()) return;
  const now = Date.now();
  if (now - (state.typingSentAt.get(chatId) ?? 0) < TYPING_SEND_EVERY_MS) return;
  if (send({ type: 'typing', chat_id: chatId })) state.typingSentAt.set(chatId, now);
}

// ---------------------------------------------------------------- reading

/** Moves our read marker to the newest message of the open chat, when the
 *  page is visible. */
function markRead(chatId) {
  if (document.visibilityState !== 'visible' || state.openChatId !== chatId) return;
  const chat = state.chats.get(chatId);
  const tl = timeline(chatId);
  if (!chat || !tl || tl.byId.size === 0) return;
  const newest = Math.max(...tl.byId.keys());
  if (newest <= (chat.last_read_id ?? 0)) {
    if (chat.unread_count) {
      chat.unread_count = 0;
      renderChatList();
    }
    return;
  }
  const before = chat.last_read_id ?? 0;
  chat.last_read_id = newest;
  chat.unread_count = 0;
  const me = state.members.get(chatId)?.find((m) => m.id === state.user.id);
  if (me) me.last_read_id = Math.max(me.last_read_id ?? 0, newest);
  if (!send({ type: 'read', chat_id: chatId, up_to: newest })) {
    api('POST', `/chats/${chatId}/read`, { up_to: newest }).catch(() => {
      // Offline: the marker is sent again once we are back.
      if (chat.last_read_id === newest) chat.last_read_id = before;
    });
  }
  renderChatList();
}

// ---------------------------------------------------------------- open chat

async function openChat(chatId) {
  const chat = state.chats.get(chatId);
  if (!chat) return;
  state.openChatId = chatId;
  $('app-view').classList.add('chat-open');
  $('no-chat').hidden = true;
  $('chat').hidden = false;
  $('details').hidden = true;
  $('details-button').setAttribute('aria-expanded', 'false');
  showError('details-error', null);
  renderChatList();
  renderTyping();
  const gen = state.generation;
  let tl = timeline(chatId);
  if (!tl) {
    tl = { byId: new Map(), hasOlder: true, loadingOlder: false, loaded: false };
    state.timelines.set(chatId, tl);
  }
  renderOpenChat({ scrollToEnd: true });
  $('composer-input').focus();
  try {
    const [page] = await Promise.all([
      tl.loaded ? null : api('GET', `/chats/${chatId}/messages?limit=${PAGE}`),
      fetchChat(chatId),
    ]);
    if (gen !== state.generation) return;
    if (page) {
      for (const m of page) tl.byId.set(m.id, m);
      tl.hasOlder = page.length === PAGE;
      tl.loaded = true;
    }
  } catch (err) {
    if (gen !== state.generation) return;
    if (err instanceof ApiError && err.code === 'chat_not_found') {
      forgetChat(chatId);
      renderChatList();
      showError('sidebar-error', err);
      return;
    }
    if (!(err instanceof ApiError && err.status === 401)) showError('details-error', err);
  }
  if (state.openChatId !== chatId) return;
  renderChatList();
  renderOpenChat({ scrollToEnd: true });
  markRead(chatId);
}

function closeChat() {
  state.openChatId = null;
  $('app-view').classList.remove('chat-open');
  $('chat').hidden = true;
  $('no-chat').hidden = false;
  renderChatList();
}

async function loadOlder() {
  const chatId = state.openChatId;
  const tl = timeline(chatId);
  if (!tl || !tl.loaded || !tl.hasOlder || tl.loadingOlder || tl.byId.size === 0) return;
  tl.loadingOlder = true;
  const oldest = Math.min(...tl.byId.keys());
  const box = $('messages');
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const page = await api('GET', `/chats/${chatId}/messages?before=${oldest}&limit=${PAGE}`);
    for (const m of page) tl.byId.set(m.id, m);
    tl.hasOlder = page.length === PAGE;
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) showError('details-error', err);
  } finally {
    tl.loadingOlder = false;
  }
  if (state.openChatId !== chatId) return;
  renderOpenChat();
  box.scrollTop = box.scrollHeight - fromBottom;
}

/** Which other members have read up to which message: each reader is shown
 *  under the newest text message at or below their marker that they did not
 *  write themselves. */
function receiptsFor(chatId, ids, byId) {
  const readers = new Map();
  const textIds = ids.filter((id) => (byId.get(id).kind ?? 'text') === 'text');
  for (const member of state.members.get(chatId) ?? []) {
    if (member.id === state.user.id || !member.last_read_id) continue;
    let at = null;
    for (let i = textIds.length - 1; i >= 0; i--) {
      if (textIds[i] <= member.last_read_id && byId.get(textIds[i]).sender_id !== member.id) {
        at = textIds[i];
        break;
      }
    }
    if (at === null) continue;
    if (!readers.has(at)) readers.set(at, []);
    readers.get(at).push(member.username);
  }
  return readers;
}

function formatTime(ts) {
  const d = new Date(ts);
  if (Number.isNaN(d.getTime())) return '';
  return d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
}

function renderMessage(m, readers) {
  if (m.kind && m.kind !== 'text') {
    return el('li', { class: 'event', dataset: { id: String(m.id), kind: m.kind } }, m.content);
  }
  const mine = m.sender_id === state.user.id;
  return el(
    'li',
    { class: mine ? 'msg mine' : 'msg', dataset: { id: String(m.id), sender: m.sender } },
    el(
      'div',
      { class: 'meta' },
      el('span', { class: 'sender' }, mine ? 'You' : m.sender),
      el('time', { datetime: m.timestamp, title: new Date(m.timestamp).toLocaleString() }, formatTime(m.timestamp)),
    ),
    el('div', { class: 'body' }, m.content),
    readers ? el('div', { class: 'receipt' }, `Seen by ${readers.join(', ')}`) : null,
  );
}

function renderPending(id, p) {
  const failed = p.status === 'failed';
  return el(
    'li',
    { class: failed ? 'msg mine failed' : 'msg mine pending', dataset: { clientMsgId: id } },
    el('div', { class: 'body' }, p.content),
    el(
      'div',
      { class: 'state' },
      failed ? `Not sent: ${p.error ?? 'refused'} ` : state.wsOpen ? 'Sending…' : 'Waiting for the connection…',
      failed
        ? el(
            'button',
            {
              type: 'button',
              class: 'link',
              onclick: () => {
                state.pending.delete(id);
                savePending();
                renderOpenChat();
              },
            },
            'Discard',
          )
        : null,
    ),
  );
}

function renderOpenChat({ newMessage = null, scrollToEnd = false } = {}) {
  const chatId = state.openChatId;
  if (chatId === null) return;
  const chat = state.chats.get(chatId);
  if (!chat) return;
  const members = state.members.get(chatId);
  const isGroup = chat.type === 'group';
  $('chat-title').textContent = chatName(chat);
  $('chat-subtitle').textContent = isGroup
    ? `Group · ${members?.length ?? chat.member_count ?? '?'} members`
    : 'Direct chat';
  $('details-button').hidden = !isGroup;
  if (!isGroup) $('details').hidden = true;
  renderDetails(chat, members);

  const box = $('messages');
  const nearBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
  const tl = timeline(chatId);
  const byId = tl?.byId ?? new Map();
  const ids = [...byId.keys()].sort((a, b) => a - b);
  const readers = receiptsFor(chatId, ids, byId);
  const items = ids.map((id) => renderMessage(byId.get(id), readers.get(id)));
  for (const [id, p] of state.pending) {
    if (p.chat_id === chatId) items.push(renderPending(id, p));
  }
  $('message-list').replaceChildren(...items);
  $('older-button').hidden = !(tl?.loaded && tl.hasOlder);
  const mine = newMessage && newMessage.sender_id === state.user.id;
  if (scrollToEnd || nearBottom || mine) box.scrollTop = box.scrollHeight;
}

function renderDetails(chat, members) {
  if (chat.type !== 'group') return;
  const me = members?.find((m) => m.id === state.user.id);
  const admin = me?.role === 'admin';
  $('rename-form').hidden = !admin;
  $('add-member-form').hidden = !admin;
  if (document.activeElement !== $('rename-title')) $('rename-title').value = chat.title ?? '';
  $('member-list').replaceChildren(
    ...(members ?? []).map((m) =>
      el(
        'li',
        { dataset: { userId: String(m.id) } },
        el('span', { class: 'member-name' }, m.id === state.user.id ? `${m.username} (you)` : m.username),
        el('span', { class: 'role' }, m.role),
        admin && m.id !== state.user.id
          ? el(
              'button',
              {
                type: 'button',
                class: 'danger',
                'aria-label': `Remove ${m.username}`,
                onclick: () => removeMember(chat.chat_id, m.id),
              },
              'Remove',
            )
          : null,
      ),
    ),
  );
}

// ---------------------------------------------------------------- actions

async function guarded(errorBox, action) {
  showError(errorBox, null);
  try {
    await action();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) showError(errorBox, err);
  }
}

function startDirect(event) {
  event.preventDefault();
  const input = $('direct-username');
  const username = input.value.trim();
  if (!username) return;
  guarded('sidebar-error', async () => {
    const { chat_id: chatId } = await api('POST', '/chats/initiate', { target_username: username });
    await fetchChat(chatId);
    input.value = '';
    renderChatList();
    openChat(chatId);
  });
}

function createGroup(event) {
  event.preventDefault();
  const title = $('group-title').value.trim();
  const members = $('group-members')
    .value.split(/[\s,]+/)
    .map((s) => s.trim())
    .filter(Boolean);
  if (!title) return showError('sidebar-error', describe({ code: 'invalid_title' }));
  guarded('sidebar-error', async () => {
    const chat = await api('POST', '/chats', { type: 'group', title, members });
    storeChat(chat);
    $('group-title').value = '';
    $('group-members').value = '';
    $('group-create').open = false;
    renderChatList();
    openChat(chat.chat_id);
  });
}

function rename(event) {
  event.preventDefault();
  const chatId = state.openChatId;
  const title = $('rename-title').value.trim();
  if (chatId === null || !title) return;
  guarded('details-error', async () => {
    storeChat(await api('PATCH', `/chats/${chatId}`, { title }));
    $('rename-title').blur();
    renderChatList();
    renderOpenChat();
  });
}

function addMember(event) {
  event.preventDefault();
  const chatId = state.openChatId;
  const input = $('add-member-username');
  const username = input.value.trim();
  if (chatId === null || !username) return;
  guarded('details-error', async () => {
    storeChat(await api('POST', `/chats/${chatId}/members`, { username }));
    input.value = '';
    renderOpenChat();
  });
}

function removeMember(chatId, userId) {
  guarded('details-error', async () => {
    await api('DELETE', `/chats/${chatId}/members/${userId}`);
    if (userId === state.user.id) {
      const name = chatName(state.chats.get(chatId));
      forgetChat(chatId);
      renderChatList();
      showError('sidebar-error', `You left ${name}.`);
      return;
    }
    await fetchChat(chatId);
    renderOpenChat();
  });
}

function submitComposer(event) {
  event?.preventDefault();
  const input = $('composer-input');
  const content = input.value;
  if (state.openChatId === null || !content.trim()) return;
  input.value = '';
  sendMessage(state.openChatId, content);
  input.focus();
}

// ---------------------------------------------------------------- wiring

function wire() {
  $('login-form').addEventListener('submit', submitLogin);
  $('logout-button').addEventListener('click', logout);
  $('direct-form').addEventListener('submit', startDirect);
  $('group-form').addEventListener('submit', createGroup);
  $('rename-form').addEventListener('submit', rename);
  $('add-member-form').addEventListener('submit', addMember);
  $('composer').addEventListener('submit', submitComposer);
  $('leave-button').addEventListener('click', () => {
    if (state.openChatId !== null) removeMember(state.openChatId, state.user.id);
  });
  $('back-button').addEventListener('click', () => {
    const id = state.openChatId;
    closeChat();
    $('chat-list').querySelector(`[data-chat-id="${id}"]`)?.focus();
  });
  $('details-button').addEventListener('click', () => {
    const details = $('details');
    details.hidden = !details.hidden;
    $('details-button').setAttribute('aria-expanded', String(!details.hidden));
    if (!details.hidden) {
      [...details.querySelectorAll('input, button')].find((e) => e.offsetParent !== null)?.focus();
    }
  });
  $('older-button').addEventListener('click', loadOlder);
  $('messages').addEventListener('scroll', () => {
    if ($('messages').scrollTop < 40) loadOlder();
  });
  const input = $('composer-input');
  input.addEventListener('input', composerInput);
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitComposer();
    }
  });
  document.addEventListener('keydown', (event) => {
    if (event.key !== 'Escape' || state.openChatId === null) return;
    if (!$('details').hidden) {
      $('details').hidden = true;
      $('details-button').setAttribute('aria-expanded', 'false');
      $('details-button').focus();
    } else if (getComputedStyle($('back-button')).display !== 'none') {
      $('back-button').click();
    }
  });
  document.addEventListener('visibilitychange', () => {
    if (state.openChatId !== null) markRead(state.openChatId);
  });
  window.addEventListener('online', () => {
    if (state.token && !state.ws) connectNow();
  });
}

function boot() {
  wire();
  const saved = load(SESSION_KEY);
  if (saved?.token && saved?.user) startSession(saved.token, saved.user);
  else showLogin(null);
}

boot();
