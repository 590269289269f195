/**
 * Browser client helpers for wsproxy's topic pub/sub.
 *
 * Dependency-free ES module. It needs only what every current browser has:
 * `fetch`, `WebSocket`, `atob`, `TextDecoder` (and, optionally,
 * `sessionStorage`).
 *
 *   import { createAuthenticatedWebSocket, subscribe, publish } from './jwt_utils.js';
 *
 * Wire protocol reminder (see the server's contract):
 *   POST /auth/token  {"username","password","session_id"?} -> {"token","expires_in","session_id"}
 *   GET  /ws?access_token=<jwt>   (WebSocket upgrade)
 *   text frames: register-name:{name}, subscribe:{topic}[|{session}],
 *                unsubscribe:{topic}[|{session}], publish-json:{json}, ping
 *                (without |{session}: the connection's own session)
 *
 * @module jwt_utils
 */

/** Key under which the token is mirrored in `sessionStorage`. */
const STORAGE_KEY = 'wsproxy.jwt';

/**
 * A stored token is only reused to open a new connection when it is valid for
 * at least this long; otherwise a fresh one is requested (the server closes a
 * connection with code 1008 as soon as its token expires).
 */
const REUSE_MIN_REMAINING_MS = 30_000;

const DEFAULT_REQUEST_TIMEOUT_MS = 10_000;
const DEFAULT_OPEN_TIMEOUT_MS = 15_000;

/** In-memory copy; the source of truth when `sessionStorage` is unusable. */
let memoryToken = null;

/** The session each connection opened by this module is bound to. */
const connectionSessions = new WeakMap();

/** Per-connection state for request/reply helpers (subscribe, ...). */
const pendingByConnection = new WeakMap();

function storage() {
  // Accessing sessionStorage throws in some sandboxed iframes and when storage
  // is disabled, so every access goes through this guard.
  try {
    return typeof sessionStorage !== 'undefined' ? sessionStorage : null;
  } catch {
    return null;
  }
}

/**
 * Decode the payload (claims) of a JWT without verifying it. Verification is
 * the server's job; the client only reads `exp`, `sid` and `sub`.
 *
 * @param {string} token
 * @returns {object|null} the claims, or null if the token is not a decodable JWT
 */
export function decodeJwtPayload(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    let b64 = parts[1].replace(/-/g, '+').replace(/_/g, '/');
    b64 += '='.repeat((4 - (b64.length % 4)) % 4);
    const binary = atob(b64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    const claims = JSON.parse(new TextDecoder().decode(bytes));
    return claims !== null && typeof claims === 'object' && !Array.isArray(claims) ? claims : null;
  } catch {
    return null;
  }
}

/** Milliseconds until the token expires; Infinity without an `exp` claim; -Infinity if undecodable. */
function remainingMs(token) {
  const claims = decodeJwtPayload(token);
  if (!claims) return -Infinity;
  if (claims.exp === undefined) return Infinity;
  if (typeof claims.exp !== 'number') return -Infinity;
  return claims.exp * 1000 - Date.now();
}

/**
 * Holds the current access token (in memory, mirrored to `sessionStorage`
 * so it survives a reload of the same tab but is not shared between tabs).
 */
export const jwtManager = {
  /**
   * @returns {string|null} the stored token, expired or not
   */
  getToken() {
    if (memoryToken) return memoryToken;
    const s = storage();
    if (s) {
      try {
        memoryToken = s.getItem(STORAGE_KEY);
      } catch {
        /* storage unusable: memory only */
      }
    }
    return memoryToken;
  },

  /**
   * Store a token (replacing any previous one).
   * @param {string} token
   */
  setToken(token) {
    if (typeof token !== 'string' || token === '') {
      throw new TypeError('setToken expects a non-empty string');
    }
    memoryToken = token;
    const s = storage();
    if (s) {
      try {
        s.setItem(STORAGE_KEY, token);
      } catch {
        /* quota or disabled storage: memory only */
      }
    }
  },

  /** Forget the stored token (e.g. on logout). */
  clearToken() {
    memoryToken = null;
    const s = storage();
    if (s) {
      try {
        s.removeItem(STORAGE_KEY);
      } catch {
        /* ignore */
      }
    }
  },

  /**
   * True when a token is stored, its payload decodes, and its `exp` claim
   * (seconds since the epoch) is in the future. A token without `exp` never
   * expires. The signature is not checked here; the server does that.
   * @returns {boolean}
   */
  isAuthenticated() {
    const token = this.getToken();
    return token !== null && remainingMs(token) > 0;
  },

  /**
   * The decoded claims of the stored token (`sub`, `sid`, `exp`, ...), or null.
   * @returns {object|null}
   */
  getClaims() {
    const token = this.getToken();
    return token ? decodeJwtPayload(token) : null;
  },

  /**
   * Ask the server for a token with `POST authUrl`, store it and return it.
   *
   * @param {string} authUrl e.g. `http://127.0.0.1:8080/auth/token`
   * @param {string} username
   * @param {string} password
   * @param {string} [sessionId] session to bind into the token; when omitted
   *   the server uses `session-{username}`
   * @returns {Promise<string>} the token
   * @throws {Error} with the server's error message (`err.status` is the HTTP
   *   status, `err.code` the server's error code such as
   *   `invalid_credentials`), or a network/CORS failure description
   */
  async fetchToken(authUrl, username, password, sessionId) {
    const body = { username, password };
    if (sessionId !== undefined && sessionId !== null && sessionId !== '') {
      body.session_id = sessionId;
    }
    let response;
    try {
      response = await fetch(authUrl, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'application/json' },
        body: JSON.stringify(body),
        // The token travels in the body; no cookies are involved, so CORS
        // works with `Access-Control-Allow-Origin: *` as well.
        credentials: 'omit',
        cache: 'no-store',
      });
    } catch (cause) {
      const err = new Error(
        `token request to ${authUrl} failed: ${cause && cause.message ? cause.message : cause} ` +
          '(server unreachable, or this page\'s origin is not in CORS_ALLOWED_ORIGINS)',
      );
      err.cause = cause;
      throw err;
    }

    let data = null;
    try {
      data = await response.json();
    } catch {
      /* not JSON: handled below */
    }

    if (!response.ok) {
      const detail =
        (data && (data.message || data.error)) ||
        `HTTP ${response.status}${response.statusText ? ' ' + response.statusText : ''}`;
      const err = new Error(detail);
      err.status = response.status;
      err.code = data && typeof data.error === 'string' ? data.error : undefined;
      err.response = data;
      throw err;
    }
    if (!data || typeof data.token !== 'string' || data.token === '') {
      const err = new Error(`token response from ${authUrl} has no "token" field`);
      err.status = response.status;
      err.response = data;
      throw err;
    }
    this.setToken(data.token);
    return data.token;
  },
};

/** Replace the token in a URL by a placeholder (for error messages). */
function redact(url) {
  return url.replace(/([?&]access_token=)[^&#]*/, '$1<redacted>');
}

function withToken(wsUrl, token) {
  const sep = wsUrl.includes('?') ? '&' : '?';
  return `${wsUrl}${sep}access_token=${encodeURIComponent(token)}`;
}

function openSocket(url, timeoutMs) {
  return new Promise((resolve, reject) => {
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (cause) {
      const err = new Error(`cannot open WebSocket to ${redact(url)}: ${cause.message}`);
      err.cause = cause;
      reject(err);
      return;
    }
    let settled = false;
    let timer = null;
    const finish = (err) => {
      if (settled) return;
      settled = true;
      if (timer) clearTimeout(timer);
      ws.removeEventListener('open', onOpen);
      ws.removeEventListener('error', onError);
      ws.removeEventListener('close', onClose);
      if (err) {
        try {
          ws.close();
        } catch {
          /* ignore */
        }
        reject(err);
      } else {
        resolve(ws);
      }
    };
    const onOpen = () => finish(null);
    // Browsers hide the HTTP status of a refused upgrade (401/403); all we
    // get is an error event followed by close code 1006.
    const onError = () =>
      finish(new Error(`WebSocket connection to ${redact(url)} failed before it opened`));
    const onClose = (ev) =>
      finish(
        new Error(
          `WebSocket to ${redact(url)} closed before it opened (code ${ev.code}` +
            `${ev.reason ? ', ' + ev.reason : ''})`,
        ),
      );
    ws.addEventListener('open', onOpen);
    ws.addEventListener('error', onError);
    ws.addEventListener('close', onClose);
    if (timeoutMs > 0) {
      timer = setTimeout(
        () => finish(new Error(`WebSocket to ${redact(url)} did not open within ${timeoutMs} ms`)),
        timeoutMs,
      );
    }
  });
}

/**
 * Open a WebSocket to wsproxy authenticated with a JWT.
 *
 * A stored token is reused when it is still valid (for at least 30 s) and was
 * issued for the same user and session; otherwise a new one is requested from
 * `authUrl`. If a reused token is refused at the handshake, a fresh token is
 * fetched and the connection is tried once more.
 *
 * The token is passed as the `access_token` query parameter, because browsers
 * cannot set an `Authorization` header on a WebSocket.
 *
 * @param {string} wsUrl e.g. `ws://127.0.0.1:8080/ws`
 * @param {string} authUrl e.g. `http://127.0.0.1:8080/auth/token`
 * @param {string} username
 * @param {string} password
 * @param {string} [sessionId] the session this connection is bound to
 * @param {{openTimeoutMs?: number}} [options] `openTimeoutMs` (default
 *   15000; 0 disables) bounds how long the handshake may take
 * @returns {Promise<WebSocket>} resolves with the open socket; rejects if the
 *   token request fails or the socket errors/closes before opening
 */
export async function createAuthenticatedWebSocket(
  wsUrl,
  authUrl,
  username,
  password,
  sessionId,
  options = {},
) {
  const openTimeoutMs = options.openTimeoutMs ?? DEFAULT_OPEN_TIMEOUT_MS;

  let token = jwtManager.getToken();
  let reused = false;
  if (token && remainingMs(token) > REUSE_MIN_REMAINING_MS) {
    const claims = decodeJwtPayload(token);
    const sameUser = claims.sub === undefined || claims.sub === username;
    const sameSession = !sessionId || claims.sid === sessionId;
    reused = sameUser && sameSession;
  }
  if (!reused) {
    token = await jwtManager.fetchToken(authUrl, username, password, sessionId);
  }

  let ws;
  try {
    ws = await openSocket(withToken(wsUrl, token), openTimeoutMs);
  } catch (err) {
    if (!reused) throw err;
    // The cached token may have been revoked (e.g. the server's secret
    // changed): try once with a fresh one.
    jwtManager.clearToken();
    token = await jwtManager.fetchToken(authUrl, username, password, sessionId);
    ws = await openSocket(withToken(wsUrl, token), openTimeoutMs);
  }
  const sid = decodeJwtPayload(token)?.sid ?? sessionId;
  if (sid) connectionSessions.set(ws, sid);
  return ws;
}

/**
 * The session a socket from {@link createAuthenticatedWebSocket} is bound to
 * (the token's `sid` claim).
 * @param {WebSocket} ws
 * @returns {string|undefined}
 */
export function sessionOf(ws) {
  return connectionSessions.get(ws);
}

/* ---- request/reply helpers ---------------------------------------------- */

/**
 * Reply types the server sends for each command verb, and how a reply is
 * matched to the request that caused it.
 */
const REPLY_FOR = {
  subscribe: {
    type: 'subscribed',
    matches: (req, msg) =>
      msg.topic === req.topic && (req.session === undefined || msg.session_id === req.session),
  },
  unsubscribe: {
    type: 'unsubscribed',
    matches: (req, msg) =>
      msg.topic === req.topic && (req.session === undefined || msg.session_id === req.session),
  },
  'register-name': { type: 'registered', matches: (req, msg) => msg.name === req.name },
};

function connectionState(ws) {
  let state = pendingByConnection.get(ws);
  if (state) return state;
  state = { pending: [] };
  const onMessage = (ev) => {
    if (typeof ev.data !== 'string' || ev.data[0] !== '{') return;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      return;
    }
    if (!msg || typeof msg.type !== 'string') return;
    if (msg.type === 'error') {
      // Errors do not repeat the topic; the server answers the commands of
      // one connection in order, so the oldest pending request of that verb
      // is the one that failed.
      const i = state.pending.findIndex((r) => r.verb === msg.command);
      if (i >= 0) {
        const [req] = state.pending.splice(i, 1);
        const err = new Error(
          `${req.verb} refused: ${msg.error}${msg.message ? ' (' + msg.message + ')' : ''}`,
        );
        err.code = msg.error;
        err.reply = msg;
        req.reject(err);
      }
      return;
    }
    const i = state.pending.findIndex(
      (r) => REPLY_FOR[r.verb].type === msg.type && REPLY_FOR[r.verb].matches(r, msg),
    );
    if (i >= 0) {
      const [req] = state.pending.splice(i, 1);
      req.resolve(msg);
    }
  };
  const onClose = (ev) => {
    const waiting = state.pending.splice(0);
    for (const req of waiting) {
      req.reject(new Error(`connection closed (code ${ev.code}) before the ${req.verb} reply`));
    }
  };
  ws.addEventListener('message', onMessage);
  ws.addEventListener('close', onClose);
  pendingByConnection.set(ws, state);
  return state;
}

function request(ws, verb, frame, fields, timeoutMs) {
  return new Promise((resolve, reject) => {
    // 1 === WebSocket.OPEN (spelled out so this also works with Node's `ws`).
    if (!ws || ws.readyState !== 1) {
      reject(new Error(`cannot ${verb}: the WebSocket is not open`));
      return;
    }
    const state = connectionState(ws);
    let timer = null;
    const req = {
      verb,
      ...fields,
      resolve: (msg) => {
        clearTimeout(timer);
        resolve(msg);
      },
      reject: (err) => {
        clearTimeout(timer);
        reject(err);
      },
    };
    if (timeoutMs > 0) {
      timer = setTimeout(() => {
        const i = state.pending.indexOf(req);
        if (i >= 0) state.pending.splice(i, 1);
        reject(new Error(`no reply to ${verb} within ${timeoutMs} ms`));
      }, timeoutMs);
    }
    state.pending.push(req);
    try {
      ws.send(frame);
    } catch (err) {
      const i = state.pending.indexOf(req);
      if (i >= 0) state.pending.splice(i, 1);
      req.reject(err);
    }
  });
}

/**
 * Subscribe to a topic and wait until the server confirms that the
 * subscription is live (a message published after the returned promise
 * resolves is delivered).
 *
 * Delivered messages arrive as ordinary `message` events on `ws`, as JSON
 * text: `{"publisher_name","topic","payload","timestamp","session_id"}`,
 * plus `"publisher_sub"` (the publisher's verified token subject, set by
 * the server; trust it, not `publisher_name`) when the publisher has a token.
 *
 * @param {WebSocket} ws an open socket
 * @param {string} topic 1-128 chars of `[A-Za-z0-9_.-]`
 * @param {string} [sessionId] defaults to the socket's session (see {@link sessionOf}),
 *   or, when that is not known here, to the one the server bound the connection to
 * @param {{timeoutMs?: number}} [options] default 10000; 0 waits forever
 * @returns {Promise<{type: 'subscribed', topic: string, session_id: string}>}
 *   rejects with an Error whose `code` is the server's error code (e.g.
 *   `session_mismatch`, `invalid_topic`) and `reply` the full error object
 */
export function subscribe(ws, topic, sessionId, options = {}) {
  // Without a session known here, the server uses the connection's own
  // (its token's, or the one registered); it refuses with `not_registered`
  // when there is none.
  const session = sessionId ?? sessionOf(ws);
  return request(
    ws,
    'subscribe',
    session ? `subscribe:${topic}|${session}` : `subscribe:${topic}`,
    { topic, session },
    options.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
  );
}

/**
 * Unsubscribe from a topic and wait for the server's confirmation.
 *
 * @param {WebSocket} ws
 * @param {string} topic
 * @param {string} [sessionId] defaults to the socket's session
 * @param {{timeoutMs?: number}} [options]
 * @returns {Promise<{type: 'unsubscribed', topic: string, session_id: string}>}
 */
export function unsubscribe(ws, topic, sessionId, options = {}) {
  const session = sessionId ?? sessionOf(ws);
  return request(
    ws,
    'unsubscribe',
    session ? `unsubscribe:${topic}|${session}` : `unsubscribe:${topic}`,
    { topic, session },
    options.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
  );
}

/**
 * Register the name the server puts in `publisher_name` when a published
 * message does not carry one.
 *
 * @param {WebSocket} ws
 * @param {string} name
 * @param {{timeoutMs?: number}} [options]
 * @returns {Promise<{type: 'registered', name: string}>}
 */
export function registerName(ws, name, options = {}) {
  return request(
    ws,
    'register-name',
    `register-name:${name}`,
    { name },
    options.timeoutMs ?? DEFAULT_REQUEST_TIMEOUT_MS,
  );
}

/**
 * Publish a message to a topic. The server sends no reply on success; a
 * refused publish produces an `{"type":"error","command":"publish-json",...}`
 * message on `ws`.
 *
 * @param {WebSocket} ws an open socket
 * @param {{topic: string, payload: *, publisher_name?: string,
 *          timestamp?: string, session_id?: string}} message
 *   `payload` is any JSON value. Omitted `publisher_name`, `timestamp` and
 *   `session_id` are filled in by the server (registered name, current time,
 *   the connection's session).
 * @returns {string} the frame that was sent
 * @throws {TypeError} if the message lacks a topic or payload
 * @throws {Error} if the socket is not open
 */
export function publish(ws, message) {
  if (!message || typeof message !== 'object') throw new TypeError('publish expects a message object');
  if (typeof message.topic !== 'string' || message.topic === '') {
    throw new TypeError('publish: message.topic must be a non-empty string');
  }
  if (message.payload === undefined) throw new TypeError('publish: message.payload is required');
  if (!ws || ws.readyState !== 1) throw new Error('cannot publish: the WebSocket is not open');
  const body = { topic: message.topic, payload: message.payload };
  for (const key of ['publisher_name', 'timestamp', 'session_id']) {
    if (message[key] !== undefined && message[key] !== null) body[key] = message[key];
  }
  const frame = `publish-json:${JSON.stringify(body)}`;
  ws.send(frame);
  return frame;
}
