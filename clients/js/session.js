/**
 * Browser client for wsproxy sessions, `/{agent_id}/ws/{session_id}`:
 * reliable (the `wsproxy.v1` subprotocol: acknowledged client messages,
 * resume after a reconnect) or plain. With `transport: 'sse'` the same
 * session goes over HTTP instead: down by Server-Sent Events
 * (`GET /{agent_id}/sse/{session_id}`, the browser's own `EventSource`),
 * up by `fetch` (`POST` to the same path), with the same API.
 *
 * Dependency-free ES module, no build step. It needs what every current
 * browser has: `WebSocket` (or `EventSource` and `fetch` for SSE),
 * `crypto.getRandomValues` and `TextEncoder`.
 *
 *   import { openSession } from './session.js';
 *   const session = openSession({
 *     url: 'wss://gateway.example.com', agentId: 'web', sessionId, token,
 *     onMessage(data, { offset }) { render(data); },
 *     onResumeFailed({ reason }) { reloadStateFromBackend(reason); },
 *   });
 *   await session.ready;                       // the first welcome
 *   const ack = await session.send({ text: 'hi' });   // stored in Redis
 *
 * Wire protocol of a reliable session (the manual's "Reliable
 * sessions", docs/src/reliable-sessions.md, is the contract):
 *   connect  GET {url}/{agent}/ws/{session}?access_token=<token>[&epoch=<e>&offset=<o>]
 *            offering the subprotocol wsproxy.v1
 *   down     {"type":"welcome","session_id","epoch","offset","resumed"?,"replayed"?,"reason"?}
 *            {"type":"message","offset":"<ms>-<seq>","data":<json>}
 *            {"type":"ack","id","offset","duplicate"?}
 *            {"type":"error","error":"not_stored","id",...}, {"type":"error","error":<code>,...}
 *   up       {"type":"message","id":"<1-128 of A-Z a-z 0-9 - _ .>","data":<json>}
 * A plain session gets the backend's frames as they were published (text,
 * or binary for bytes that are not UTF-8) and sends JSON text.
 *
 * The same over SSE (the manual's "Sessions over HTTP", docs/src/sse.md):
 *   down     GET {url}/{agent}/sse/{session}?access_token=<token>&reliable=true[&last_event_id=<e>:<o>]
 *            event: welcome   data: the welcome above
 *            id: <epoch>:<offset>   data: <json>         (a message)
 *            event: close     data: {"code","reason"}    (then the stream ends)
 *            The EventSource reconnects by itself, sending Last-Event-ID.
 *   up       POST {url}/{agent}/sse/{session}?reliable=true, Authorization: Bearer <token>,
 *            body {"type":"message","id","data"}; the answer is the ack
 *            (200), or an error frame (409 id_conflict, 400, 503 not_stored)
 * Plain: the stream without reliable=true (each event's data is a frame,
 * `event: binary` a binary one in base64); a POST publishes its JSON body.
 *
 * @module session
 */

/** The subprotocol of reliable sessions. */
export const PROTOCOL = 'wsproxy.v1';

/** The server's rule for agent, session and client message ids. */
const ID_RE = /^[A-Za-z0-9_.-]{1,128}$/;

/** Longest epoch or offset the server accepts back (longer: 400). */
const MAX_POSITION_LEN = 64;

/** `WebSocket.OPEN`, spelled out so that any WebSocket implementation works. */
const OPEN = 1;
/** `EventSource.CLOSED`: the EventSource gave up and will not reconnect. */
const ES_CLOSED = 2;
/**
 * Close codes from which a session does not come back, over either
 * transport: wsproxy itself never sends them, only a backend's control
 * `disconnect` (usually with the token revoked), which ends the session.
 */
function isBackendClose(code) {
  return code >= 4000 && code <= 4999;
}

const DEFAULT_BACKOFF = { initialMs: 500, maxMs: 30_000, maxAttempts: Infinity };
/**
 * SSE: how long a reliable message answered `429 rate_limited` without a
 * Retry-After waits before it goes again; doubled for each 429 in a row.
 * Not backoff.initialMs: the server refuses when the session's messages
 * are more than AUTH_TIMEOUT_SECS (seconds) ahead of its rate, so a retry
 * within half a second would mostly be refused again.
 */
const RATE_LIMITED_BACKOFF_MS = 1000;

/**
 * A Retry-After header (delay-seconds or an HTTP date) in ms, or
 * undefined without a usable one (or without `headers`: a minimal fetch).
 */
function retryAfterMs(headers) {
  const value = headers && typeof headers.get === 'function' ? headers.get('retry-after') : null;
  if (typeof value !== 'string' || value.trim() === '') return undefined;
  if (/^\s*\d+\s*$/.test(value)) return Number(value) * 1000;
  const at = Date.parse(value);
  return Number.isNaN(at) ? undefined : Math.max(0, at - Date.now());
}
/**
 * A connection that lasted this long (from its welcome, or its open in
 * plain mode) resets the backoff when it drops; one that dropped sooner
 * counts as a failed attempt. The Rust client's `STABLE_AFTER`.
 */
const STABLE_AFTER_MS = 10_000;
const DEFAULT_MAX_UNACKED = 1000;
/**
 * A plain send refuses while the socket holds this much not yet sent (its
 * `bufferedAmount`): the bound a reliable session has in maxUnacked.
 */
const DEFAULT_MAX_BUFFERED_BYTES = 1_048_576;
/** The server's default WS_MAX_MESSAGE_BYTES; a bigger frame is closed with 1009. */
const DEFAULT_MAX_MESSAGE_BYTES = 1_048_576;
const DEFAULT_OPEN_TIMEOUT_MS = 15_000;
/** A token function that hangs must not stall the session: past this, the attempt failed. */
const DEFAULT_TOKEN_TIMEOUT_MS = 10_000;
/**
 * Consecutive attempts whose reliable handshake failed while a plain one
 * worked, before the session concludes the server has reliable sessions
 * off. One is not enough: the server may have come up between the two, or
 * be reloading its Redis library (reliable joins fail meanwhile).
 */
const UNAVAILABLE_AFTER = 3;

/**
 * @typedef {'connecting'|'open'|'backoff'|'closed'} SessionState
 *   `connecting`: a connection attempt is under way (until the welcome, or
 *   the socket's open in plain mode); `open`: messages flow; `backoff`:
 *   waiting before the next attempt; `closed`: for good (after `close()`
 *   or a fatal error).
 */

/**
 * @typedef {object} Welcome the first frame of a reliable connection
 * @property {'welcome'} type
 * @property {string} session_id
 * @property {string} epoch the history's epoch
 * @property {string} offset the history's newest offset when the connection joined
 * @property {boolean} [resumed] present when the client asked to resume
 * @property {number} [replayed] with `resumed: true`: how many messages follow as replay
 * @property {string} [reason] with `resumed: false`: `trimmed`, `epoch_changed`,
 *   `expired`, `unknown_offset` or `unreplayable`
 */

/**
 * @typedef {object} MessageInfo
 * @property {string} [offset] the message's offset (reliable mode)
 * @property {string} [epoch] the history's epoch (reliable mode)
 * @property {boolean} [replayed] true for a message replayed on resume
 */

/**
 * @typedef {object} Ack the server has stored a client message
 * @property {string} id the message's id
 * @property {string} offset its entry id in the stream `wsproxy:up:{n}`
 * @property {boolean} duplicate true when this was a resend the server had
 *   already stored (it was not stored again; `offset` is the first copy's)
 */

/**
 * @typedef {object} ResumeFailure
 * @property {string} reason `trimmed`, `epoch_changed`, `expired`, `unknown_offset` or
 *   `unreplayable` (a history entry the server cannot send)
 * @property {string} epoch the history's epoch now
 * @property {string} offset where the session continues: messages after it are delivered
 * @property {{epoch: string, offset: string}} from the position the resume asked for
 */

/**
 * @typedef {object} Position where a reliable session stands: what to
 *   resume from
 * @property {string} epoch
 * @property {string} offset the last offset delivered (or, before any
 *   message, the welcome's)
 */

/**
 * @typedef {object} SessionOptions
 * @property {string} url `ws://host:port` or `wss://host:port` (an `http(s)://`
 *   URL is taken as the same with `ws(s)://`); a path prefix is kept
 * @property {string} agentId 1-128 of `A-Z a-z 0-9 - _ .`
 * @property {string} sessionId 1-128 of `A-Z a-z 0-9 - _ .`
 * @property {string|(() => string|Promise<string>)} token the session token
 *   (the one the backend stored with `SETEX session:{id}:auth`), or a
 *   function called before every connection attempt to get it
 * @property {boolean} [reliable=true] ask for `wsproxy.v1`; false: a plain session
 * @property {(data: *, info: MessageInfo) => void} onMessage each message, in
 *   order, once: the parsed `data` of reliable messages; in plain mode the
 *   frame as it came (a string, or an ArrayBuffer for a binary frame)
 * @property {(failure: ResumeFailure) => void} [onResumeFailed] required in
 *   reliable mode: a resume was refused, messages were missed; reload the
 *   application's state from its backend
 * @property {(ack: Ack) => void} [onAck] each acknowledgement (besides the
 *   promise `send` returned)
 * @property {(state: SessionState, info: object) => void} [onStateChange]
 *   `info` has `welcome` (on `open`, reliable), `attempt` (on
 *   `connecting`), `delayMs`, `attempt`, `code`, `reason` (on `backoff`),
 *   `error` (on a fatal `closed`). With transport sse the EventSource's own
 *   reconnect goes from `open` to `connecting` (with `code` and `reason`
 *   of the stream's `event: close`, or 1006), with no `backoff`
 * @property {(error: SessionError) => void} [onError] failed attempts
 *   (`connect_failed`, `connect_timeout`, `token_failed`), frames the
 *   server refused (`server_error`) or that break the protocol
 *   (`protocol_error`), and fatal errors (`error.fatal`:
 *   `reliable_unavailable`, `gave_up`, `invalid_url`, and `server_closed`:
 *   a close code 4000-4999, or over SSE an `event: close` with one, the
 *   backend ending the session with a control `disconnect`). Without it they go to
 *   `console.warn`. A browser fails a handshake whose 101 selects no
 *   subprotocol, which looks like any failed attempt: after each failed
 *   reliable handshake the session opens a plain connection with the same
 *   token (and closes it at once); when that works three attempts in a
 *   row, the server has reliable sessions off: `reliable_unavailable`.
 *   Transport sse adds `post_failed` (a POST got no answer, or an
 *   unexpected one; it is sent again) and `rate_limited` (a POST got
 *   429: the session sends faster than the server's rate; it is sent
 *   again after `delayMs`)
 * @property {{initialMs?: number, maxMs?: number, maxAttempts?: number}} [backoff]
 *   delay before reconnecting: `min(maxMs, initialMs * 2^n)` for the n-th
 *   consecutive failed attempt (n = 0 after a drop of a connection that
 *   lasted 10 s), of which a random part, up to half, is taken off
 *   (jitter). A connection dropped within 10 s of its welcome counts as a
 *   failed attempt. Defaults 500, 30000; `maxAttempts` (default Infinity)
 *   consecutive failed attempts end the session (`gave_up`)
 * @property {number} [maxUnacked=1000] client messages kept until
 *   acknowledged (sent or waiting for a connection); `send` beyond it
 *   rejects at once with `queue_full`
 * @property {number} [maxBufferedBytes=1048576] plain mode over WebSocket: `send` rejects at
 *   once with `queue_full` while the socket's `bufferedAmount` (bytes it has
 *   not sent yet) is this or more
 * @property {number} [maxMessageBytes=1048576] largest frame `send` sends
 *   (the server's `WS_MAX_MESSAGE_BYTES`); bigger rejects with `too_large`
 * @property {number} [openTimeoutMs=15000] one attempt's limit, up to the
 *   welcome (0: none)
 * @property {number} [tokenTimeoutMs=10000] how long a `token` function may
 *   take; past it the attempt failed (`token_failed`) and the backoff
 *   applies, and a late answer is ignored (0: no limit)
 * @property {Position} [resumeFrom] resume from here on the first
 *   connection (a position saved from `session.position`, or `{epoch,
 *   offset: '0-0'}` for the whole history)
 * @property {'websocket'|'sse'} [transport='websocket'] `sse`: down by
 *   Server-Sent Events (`EventSource`, token as `?access_token=`), up by
 *   `fetch` POST (`Authorization: Bearer`); see the README
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global one)
 * @property {typeof EventSource} [EventSource] the EventSource class for
 *   `transport: 'sse'` (default: the global one)
 * @property {typeof fetch} [fetch] the fetch function for `transport: 'sse'`
 *   (default: the global one)
 */

/**
 * An error of this module; `code` says which (see {@link SessionOptions}
 * `onError`, and {@link Session#send}).
 */
export class SessionError extends Error {
  /**
   * @param {string} code
   * @param {string} message
   * @param {object} [details] extra fields (`id`, `reply`, `attempt`, `cause`, ...)
   */
  constructor(code, message, details = {}) {
    super(message);
    this.name = 'SessionError';
    /** @type {string} */
    this.code = code;
    /** @type {boolean} true when the session is closed because of it */
    this.fatal = false;
    Object.assign(this, details);
  }
}

/**
 * An offset `<ms>-<seq>` as two BigInts (the seq part can exceed 2^53).
 * @param {string} offset
 * @returns {[bigint, bigint]|null}
 */
function parseOffset(offset) {
  if (typeof offset !== 'string') return null;
  const m = /^(\d{1,20})-(\d{1,20})$/.exec(offset);
  return m ? [BigInt(m[1]), BigInt(m[2])] : null;
}

/**
 * Orders two offsets of one history.
 * @param {string} a
 * @param {string} b
 * @returns {number} negative, 0 or positive, like a sort comparator
 * @throws {TypeError} if either is not an offset
 */
export function compareOffsets(a, b) {
  const x = parseOffset(a);
  const y = parseOffset(b);
  if (!x || !y) throw new TypeError(`not offsets: ${JSON.stringify(a)}, ${JSON.stringify(b)}`);
  return x[0] !== y[0] ? (x[0] < y[0] ? -1 : 1) : x[1] === y[1] ? 0 : x[1] < y[1] ? -1 : 1;
}

/** A fresh client message id (crypto.randomUUID exists only on https pages and localhost). */
function newId() {
  if (typeof crypto.randomUUID === 'function') return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

let encoder = null;
/** True when `text` is more than `max` bytes of UTF-8. */
function longerThan(text, max) {
  // A UTF-16 code unit is 1 to 3 bytes of UTF-8: most frames need no encoding.
  if (text.length * 3 <= max) return false;
  if (text.length > max) return true;
  encoder ??= new TextEncoder();
  return encoder.encode(text).length > max;
}

/** The fatal error of a server that does not offer reliable sessions. */
function unavailable(how) {
  return new SessionError(
    'reliable_unavailable',
    `the server did not select the ${PROTOCOL} subprotocol (${how}): reliable sessions are off there ` +
      '(RELIABLE_SESSIONS=true enables them); open the session with reliable: false for a plain one',
  );
}

/** The fatal error of a close code 4000-4999 (see isBackendClose). */
function backendClosed(code, reason) {
  return new SessionError('server_closed', `the backend closed the session (code ${code}${reason ? ', ' + reason : ''})`, { closeCode: code, closeReason: reason });
}

/** Calls an application callback; what it throws must not break the session. */
function invoke(fn, ...args) {
  if (typeof fn !== 'function') return;
  try {
    fn(...args);
  } catch (e) {
    if (typeof globalThis.reportError === 'function') globalThis.reportError(e);
    else setTimeout(() => {
      throw e;
    });
  }
}

function positiveNumber(value, name, fallback) {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !(value > 0)) throw new TypeError(`${name} must be a positive number`);
  return value;
}

/**
 * A session: one connection at a time, reconnected until {@link Session#close}.
 * Make one with {@link openSession}.
 */
export class Session {
  /** @type {object} validated options */
  #o;
  /** @type {WebSocket|EventSource|null} the current socket (an EventSource with transport sse) */
  #ws = null;
  /** @type {SessionState} */
  #state = 'connecting';
  #closed = false;
  /** True once the current socket is usable (welcomed, or open in plain mode). */
  #live = false;
  /** True once the current socket's handshake succeeded. */
  #opened = false;
  /** The current attempt's URL without a position: what a plain probe opens. */
  #plainUrl = null;
  /** @type {WebSocket|null} a plain probe after a failed reliable handshake */
  #probeWs = null;
  /** Consecutive attempts where only the plain probe got through. */
  #plainOnly = 0;
  /** @type {string|null} */
  #epoch = null;
  /** @type {string|null} the last offset delivered, or the welcome's */
  #offset = null;
  /** @type {[bigint, bigint]|null} `#offset`, parsed */
  #last = null;
  /** Messages of the current welcome's replay still to come. */
  #replayLeft = 0;
  /**
   * Consecutive failed attempts, including connections dropped within
   * STABLE_AFTER_MS of their welcome.
   */
  #failures = 0;
  /** When the current socket became usable (Date.now()). */
  #establishedAt = 0;
  #backoffTimer = null;
  #openTimer = null;
  /** Client messages not yet acknowledged, by id, in send order. */
  #unacked = new Map();
  #duplicatesDropped = 0;
  /** SSE: the current attempt's token, for the POSTs. */
  #token = null;
  /** SSE: the last `event: close` of the current stream, `{code, reason}`. */
  #lastClose = null;
  /** SSE: a POST of client messages is under way. */
  #posting = false;
  /** SSE: retries the POSTs after a failed one. */
  #postTimer = null;
  /** SSE: consecutive failed POSTs. */
  #postFailures = 0;
  /** SSE: consecutive POSTs of one message answered 429 rate_limited. */
  #rateLimited = 0;
  /** SSE: #postTimer waits out a 429: a new stream does not cut it short. */
  #pacing = false;
  #readyResolve;
  #readyReject;

  /**
   * Resolves with the first welcome (plain mode: with null once the first
   * socket opened); rejects if the session is closed first, or with the
   * fatal error (`reliable_unavailable`, `gave_up`, `invalid_url`,
   * `server_closed`).
   * @type {Promise<Welcome|null>}
   */
  ready;

  /** @param {SessionOptions} options */
  constructor(options) {
    if (!options || typeof options !== 'object') throw new TypeError('openSession expects an options object');
    const o = { ...options };
    if (typeof o.url !== 'string' || !/^(wss?|https?):\/\/[^/?#]/i.test(o.url) || /[?#]/.test(o.url)) {
      throw new TypeError(`url must be ws://host:port or wss://host:port (got ${JSON.stringify(o.url)})`);
    }
    o.base = o.url.replace(/^http/i, 'ws').replace(/\/+$/, '');
    o.httpBase = o.base.replace(/^ws/i, 'http');
    o.transport = o.transport ?? 'websocket';
    if (o.transport !== 'websocket' && o.transport !== 'sse') {
      throw new TypeError(`transport must be 'websocket' or 'sse' (got ${JSON.stringify(o.transport)})`);
    }
    for (const key of ['agentId', 'sessionId']) {
      if (typeof o[key] !== 'string' || !ID_RE.test(o[key])) {
        throw new TypeError(`${key} must be 1-128 characters of A-Z a-z 0-9 - _ . (got ${JSON.stringify(o[key])})`);
      }
    }
    if (typeof o.token !== 'function' && (typeof o.token !== 'string' || o.token === '')) {
      throw new TypeError('token must be a non-empty string or a function that returns one');
    }
    o.reliable = o.reliable ?? true;
    if (typeof o.onMessage !== 'function') throw new TypeError('onMessage is required');
    if (o.reliable && typeof o.onResumeFailed !== 'function') {
      // A refused resume means missed messages: the application must hear of it.
      throw new TypeError('onResumeFailed is required for a reliable session');
    }
    const b = o.backoff ?? {};
    o.backoff = {
      initialMs: positiveNumber(b.initialMs, 'backoff.initialMs', DEFAULT_BACKOFF.initialMs),
      maxMs: positiveNumber(b.maxMs, 'backoff.maxMs', DEFAULT_BACKOFF.maxMs),
      maxAttempts: positiveNumber(b.maxAttempts, 'backoff.maxAttempts', DEFAULT_BACKOFF.maxAttempts),
    };
    o.maxUnacked = positiveNumber(o.maxUnacked, 'maxUnacked', DEFAULT_MAX_UNACKED);
    o.maxBufferedBytes = positiveNumber(o.maxBufferedBytes, 'maxBufferedBytes', DEFAULT_MAX_BUFFERED_BYTES);
    o.maxMessageBytes = positiveNumber(o.maxMessageBytes, 'maxMessageBytes', DEFAULT_MAX_MESSAGE_BYTES);
    o.openTimeoutMs = o.openTimeoutMs ?? DEFAULT_OPEN_TIMEOUT_MS;
    if (typeof o.openTimeoutMs !== 'number' || !(o.openTimeoutMs >= 0)) {
      throw new TypeError('openTimeoutMs must be a number >= 0');
    }
    o.tokenTimeoutMs = o.tokenTimeoutMs ?? DEFAULT_TOKEN_TIMEOUT_MS;
    if (typeof o.tokenTimeoutMs !== 'number' || !(o.tokenTimeoutMs >= 0)) {
      throw new TypeError('tokenTimeoutMs must be a number >= 0');
    }
    if (o.transport === 'sse') {
      o.EventSource = o.EventSource ?? globalThis.EventSource;
      if (typeof o.EventSource !== 'function') throw new TypeError('no EventSource class');
      o.fetch = o.fetch ?? (typeof globalThis.fetch === 'function' ? globalThis.fetch.bind(globalThis) : undefined);
      if (typeof o.fetch !== 'function') throw new TypeError('no fetch function');
    } else {
      o.WebSocket = o.WebSocket ?? globalThis.WebSocket;
      if (typeof o.WebSocket !== 'function') throw new TypeError('no WebSocket class');
    }
    if (o.resumeFrom !== undefined) {
      const { epoch, offset } = o.resumeFrom ?? {};
      if (!o.reliable) throw new TypeError('resumeFrom needs a reliable session');
      if (typeof epoch !== 'string' || epoch === '' || epoch.length > MAX_POSITION_LEN) {
        throw new TypeError(`resumeFrom.epoch must be 1-${MAX_POSITION_LEN} characters`);
      }
      if (typeof offset !== 'string' || offset.length > MAX_POSITION_LEN || !parseOffset(offset)) {
        throw new TypeError('resumeFrom.offset must be an offset, <ms>-<seq>');
      }
      this.#epoch = epoch;
      this.#setOffset(offset);
    }
    this.#o = o;
    this.ready = new Promise((resolve, reject) => {
      this.#readyResolve = resolve;
      this.#readyReject = reject;
    });
    // An application that never awaits `ready` must not see an unhandled rejection.
    this.ready.catch(() => {});
    this.#connect();
  }

  /** @returns {SessionState} */
  get state() {
    return this.#state;
  }

  /**
   * Where the session stands: save it (e.g. in `sessionStorage`) to resume
   * after a page reload with `resumeFrom`. Null before the first welcome and
   * in plain mode.
   * @returns {Position|null}
   */
  get position() {
    return this.#epoch !== null && this.#offset !== null ? { epoch: this.#epoch, offset: this.#offset } : null;
  }

  /** @returns {number} client messages waiting for their acknowledgement */
  get unacked() {
    return this.#unacked.size;
  }

  /** @returns {number} down messages dropped because their offset was not newer than the last one delivered */
  get duplicatesDropped() {
    return this.#duplicatesDropped;
  }

  /**
   * Sends a message to the backend.
   *
   * Reliable mode: wraps it as `{"type":"message","id":<id>,"data":data}`
   * and keeps it until the server acknowledges it; if the connection drops
   * first, it is sent again with the same id, in order, after the next
   * welcome (the server stores a resend once). Sent while disconnected, it
   * waits for the connection.
   *
   * Plain mode: sends `JSON.stringify(data)` on the open socket, with no
   * acknowledgement (the promise resolves at once); a refused frame comes
   * back as an `{"type":"error",...}` message to `onMessage`. While the
   * socket has `maxBufferedBytes` not yet sent, it rejects with
   * `queue_full` instead.
   *
   * Transport sse: the same, by `fetch` POST. Reliable messages go one
   * POST at a time in send order, each answered with its ack; one without
   * an answer is sent again with its id, and so is one answered `429
   * rate_limited` (after Retry-After, else 1 s growing), ahead of later
   * ones. A plain send resolves when the server answered
   * `{"status":"published"}`.
   *
   * @param {*} data any JSON-serialisable value
   * @param {{id?: string}} [options] `id`: the message's id (1-128 of
   *   `A-Z a-z 0-9 - _ .`), to resend a message across page loads; default a
   *   random UUID
   * @returns {Promise<Ack|void>} resolves with the acknowledgement; rejects
   *   with a {@link SessionError} whose `code` is `not_stored` (Redis could
   *   not take it; `reply` is the server's frame), `queue_full`
   *   (`maxUnacked` messages wait already; plain: `maxBufferedBytes` wait
   *   in the socket), `too_large`, `invalid_data`,
   *   `invalid_id`, `duplicate_id` (that id waits already), `closed` (the
   *   session was closed first; the message may or may not have been
   *   stored), `reliable_unavailable`, `gave_up` or `server_closed` (the
   *   session failed), or in plain mode `not_connected`; with transport sse
   *   also `id_conflict` and `invalid_message` (the server refused the
   *   POST), and in plain mode `post_failed` and `rate_limited` (429:
   *   the session sends faster than the server's rate; not resent)
   */
  send(data, options = {}) {
    if (this.#closed) return Promise.reject(new SessionError('closed', 'the session is closed'));
    let json;
    try {
      json = JSON.stringify(data);
    } catch (cause) {
      return Promise.reject(new SessionError('invalid_data', `the message is not JSON-serialisable: ${cause.message}`, { cause }));
    }
    if (json === undefined) {
      return Promise.reject(new SessionError('invalid_data', `the message is not JSON-serialisable (${typeof data})`));
    }
    if (!this.#o.reliable) return this.#sendPlain(json);

    const id = options.id ?? newId();
    if (typeof id !== 'string' || !ID_RE.test(id)) {
      return Promise.reject(new SessionError('invalid_id', `a message id is 1-128 characters of A-Z a-z 0-9 - _ . (got ${JSON.stringify(id)})`));
    }
    if (this.#unacked.has(id)) {
      return Promise.reject(new SessionError('duplicate_id', `a message with id ${id} is waiting for its acknowledgement already`, { id }));
    }
    if (this.#unacked.size >= this.#o.maxUnacked) {
      return Promise.reject(new SessionError('queue_full', `${this.#unacked.size} messages wait for their acknowledgement (maxUnacked)`, { id }));
    }
    const frame = `{"type":"message","id":${JSON.stringify(id)},"data":${json}}`;
    if (longerThan(frame, this.#o.maxMessageBytes)) {
      return Promise.reject(new SessionError('too_large', `the message is larger than ${this.#o.maxMessageBytes} bytes (maxMessageBytes)`, { id }));
    }
    return new Promise((resolve, reject) => {
      const entry = { id, frame, resolve, reject, sentOn: null };
      this.#unacked.set(id, entry);
      if (this.#o.transport === 'sse') this.#pump();
      else if (this.#live) this.#transmit(entry);
    });
  }

  /**
   * Closes the session for good: the socket (code 1000), any pending
   * reconnect. Messages still waiting for their acknowledgement are
   * rejected with `closed`.
   */
  close() {
    this.#shutdown(new SessionError('closed', 'the session was closed'));
  }

  /* ---- connection lifecycle ------------------------------------------- */

  async #connect() {
    if (this.#closed) return;
    this.#setState('connecting', { attempt: this.#failures + 1 });
    let token = this.#o.token;
    if (typeof token === 'function') {
      const { tokenTimeoutMs } = this.#o;
      let timer = null;
      try {
        // A token function that never settles (a hung request) would
        // otherwise stall the session for ever, in `connecting`.
        const late = new Promise((_, reject) => {
          if (tokenTimeoutMs > 0) {
            timer = setTimeout(() => reject(new Error(`the token function did not answer within ${tokenTimeoutMs} ms (tokenTimeoutMs)`)), tokenTimeoutMs);
          }
        });
        token = await Promise.race([token(), late]);
      } catch (cause) {
        if (!this.#closed) {
          this.#attemptFailed(new SessionError('token_failed', `could not get a token: ${cause && cause.message ? cause.message : cause}`, { cause }));
        }
        return;
      } finally {
        clearTimeout(timer);
      }
      if (this.#closed) return;
      if (typeof token !== 'string' || token === '') {
        this.#attemptFailed(new SessionError('token_failed', 'the token function gave no token'));
        return;
      }
    }
    if (this.#o.transport === 'sse') {
      this.#connectSse(token);
      return;
    }
    const { base, agentId, sessionId, reliable } = this.#o;
    this.#plainUrl = `${base}/${agentId}/ws/${sessionId}?access_token=${encodeURIComponent(token)}`;
    let url = this.#plainUrl;
    if (reliable && this.#epoch !== null && this.#offset !== null) {
      url += `&epoch=${encodeURIComponent(this.#epoch)}&offset=${encodeURIComponent(this.#offset)}`;
    }
    let ws;
    try {
      ws = reliable ? new this.#o.WebSocket(url, [PROTOCOL]) : new this.#o.WebSocket(url);
    } catch (cause) {
      // A URL the browser refuses will not get better by retrying.
      this.#fail(new SessionError('invalid_url', `cannot open a WebSocket to ${base}/${agentId}/ws/${sessionId}: ${cause.message}`, { cause }));
      return;
    }
    ws.binaryType = 'arraybuffer';
    this.#ws = ws;
    this.#live = false;
    this.#opened = false;
    ws.onopen = () => this.#onOpen(ws);
    ws.onmessage = (ev) => this.#onFrame(ws, ev.data);
    ws.onclose = (ev) => this.#onClose(ws, ev.code, ev.reason);
    ws.onerror = null; // a close event follows every error
    if (this.#o.openTimeoutMs > 0) {
      this.#openTimer = setTimeout(() => {
        this.#openTimer = null;
        if (this.#ws !== ws || this.#live) return;
        this.#abandon(ws);
        this.#attemptFailed(new SessionError('connect_timeout', `no ${reliable ? 'welcome' : 'open'} within ${this.#o.openTimeoutMs} ms`));
      }, this.#o.openTimeoutMs);
    }
  }

  #onOpen(ws) {
    if (ws !== this.#ws) return;
    this.#opened = true;
    if (!this.#o.reliable) {
      this.#established({});
      return;
    }
    if (ws.protocol !== PROTOCOL) {
      // The server answered 101 without selecting wsproxy.v1: a plain
      // session. Browsers (and Node's `ws`) fail such a handshake instead,
      // see #probe; a WebSocket class that accepts it gets here. Retrying
      // would get the same answer.
      this.#fail(unavailable(`it selected ${ws.protocol ? JSON.stringify(ws.protocol) : 'none'}`));
    }
    // Otherwise the welcome comes next.
  }

  #onClose(ws, code, reason) {
    if (ws !== this.#ws) return;
    if (code === 1009) {
      // The server refused a frame as too big. It answers a connection's
      // messages in order, so that was the oldest one sent on this socket
      // and not acknowledged; resending it would only repeat this.
      for (const entry of this.#unacked.values()) {
        if (entry.sentOn !== ws) continue;
        this.#unacked.delete(entry.id);
        entry.reject(new SessionError('too_large', 'the server closed the connection with 1009: the message is larger than its WS_MAX_MESSAGE_BYTES', { id: entry.id }));
        break;
      }
    }
    this.#detach(ws);
    const wasLive = this.#live;
    this.#ws = null;
    this.#live = false;
    if (isBackendClose(code)) {
      // The backend ended the session (control `disconnect`), as over SSE:
      // a reconnect would be refused (a revoked token) or undo its decision.
      this.#fail(backendClosed(code, reason));
      return;
    }
    if (wasLive) {
      this.#dropped(`code ${code}${reason ? ', ' + reason : ''}`, { closeCode: code, closeReason: reason }, { code, reason });
      return;
    }
    // Browsers hide why an upgrade was refused (401, 403 and an
    // unreachable server all look alike: code 1006).
    const error = new SessionError('connect_failed', `connection attempt failed (code ${code}${reason ? ', ' + reason : ''})`, { closeCode: code, closeReason: reason });
    if (this.#o.reliable && !this.#opened) this.#probe(error, { code, reason });
    else this.#attemptFailed(error, { code, reason });
  }

  /**
   * A reliable attempt failed in its handshake. A browser fails the
   * handshake when the server selects no subprotocol (the WHATWG rule: one
   * was offered, none came back), and that looks exactly like an
   * unreachable server or a refused token. A plain connection with the
   * same token tells them apart: if it opens, the server is there and
   * takes the token, but (when that repeats, see UNAVAILABLE_AFTER) has
   * reliable sessions off. It is closed at once.
   */
  #probe(error, info) {
    let ws;
    try {
      ws = new this.#o.WebSocket(this.#plainUrl);
    } catch {
      this.#attemptFailed(error, info);
      return;
    }
    this.#probeWs = ws;
    let timer = null;
    const done = (opened) => {
      if (this.#probeWs !== ws) return;
      this.#probeWs = null;
      clearTimeout(timer);
      this.#detach(ws);
      try {
        ws.close(1000);
      } catch {
        /* already closing */
      }
      if (this.#closed) return;
      this.#plainOnly = opened ? this.#plainOnly + 1 : 0;
      if (this.#plainOnly >= UNAVAILABLE_AFTER) {
        this.#fail(unavailable(`${this.#plainOnly} handshakes offering it failed in a row, plain ones with the same token succeeded`));
        return;
      }
      if (opened) {
        error.message += `; a plain connection succeeded: the server may have reliable sessions off (${this.#plainOnly} of ${UNAVAILABLE_AFTER})`;
        error.plainOpened = true;
      }
      this.#attemptFailed(error, info);
    };
    ws.onopen = () => done(true);
    ws.onclose = () => done(false);
    if (this.#o.openTimeoutMs > 0) timer = setTimeout(() => done(false), this.#o.openTimeoutMs);
  }

  /** The current socket is usable: welcomed (reliable) or open (plain). */
  #established(info) {
    // A callback (onResumeFailed) may have closed the session.
    if (this.#closed) return;
    clearTimeout(this.#openTimer);
    this.#openTimer = null;
    this.#live = true;
    // #failures is reset only when this connection drops after
    // STABLE_AFTER_MS (#dropped): a server that welcomes and then drops
    // at once must not be retried at the first backoff step for ever.
    this.#establishedAt = Date.now();
    this.#plainOnly = 0;
    this.#setState('open', info);
    this.#readyResolve(info.welcome ?? null);
    if (this.#o.transport === 'sse') {
      // Retry what failed now, rather than at the end of its backoff; but
      // a 429's wait stands (the session's pace is the server's, not the
      // stream's).
      if (!this.#pacing) {
        clearTimeout(this.#postTimer);
        this.#postTimer = null;
      }
      this.#pump();
    } else {
      for (const entry of this.#unacked.values()) this.#transmit(entry);
    }
  }

  /**
   * A usable connection dropped. One that lasted STABLE_AFTER_MS resets
   * the backoff; one that dropped sooner is a failed attempt (its delay
   * grows, and it counts towards maxAttempts).
   * @returns {boolean} whether the drop counted as a failed attempt
   */
  #dropped(why, details, info, report = null) {
    const lasted = Date.now() - this.#establishedAt;
    if (lasted >= STABLE_AFTER_MS) {
      this.#failures = 0;
      if (report) this.#report(report);
      this.#scheduleReconnect(info);
      return false;
    }
    const error = report ?? new SessionError('connect_failed', '');
    error.message = `the connection dropped ${lasted} ms after it opened, under ${STABLE_AFTER_MS} ms (${why})`;
    Object.assign(error, details);
    this.#attemptFailed(error, info);
    return true;
  }

  #attemptFailed(error, info = {}) {
    this.#failures += 1;
    error.attempt = this.#failures;
    this.#report(error);
    if (this.#failures >= this.#o.backoff.maxAttempts) {
      this.#fail(new SessionError('gave_up', `gave up after ${this.#failures} failed connection attempts; the last: ${error.message}`, { cause: error }));
      return;
    }
    this.#scheduleReconnect(info);
  }

  #scheduleReconnect(info) {
    // A callback (onError) may have closed the session.
    if (this.#closed) return;
    const { initialMs, maxMs } = this.#o.backoff;
    const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#failures, 52));
    // Half fixed, half random: clients dropped together do not come back together.
    const delayMs = Math.round(ceiling / 2 + Math.random() * (ceiling / 2));
    this.#setState('backoff', { ...info, attempt: this.#failures + 1, delayMs });
    this.#backoffTimer = setTimeout(() => {
      this.#backoffTimer = null;
      this.#connect();
    }, delayMs);
  }

  #fail(error) {
    error.fatal = true;
    this.#report(error);
    this.#shutdown(error);
  }

  #shutdown(error) {
    if (this.#closed) return;
    this.#closed = true;
    clearTimeout(this.#backoffTimer);
    clearTimeout(this.#openTimer);
    clearTimeout(this.#postTimer);
    this.#backoffTimer = this.#openTimer = this.#postTimer = null;
    if (this.#ws) this.#abandon(this.#ws);
    if (this.#probeWs) {
      const probe = this.#probeWs;
      this.#probeWs = null;
      this.#abandon(probe);
    }
    this.#live = false;
    const waiting = [...this.#unacked.values()];
    this.#unacked.clear();
    for (const entry of waiting) entry.reject(error);
    this.#readyReject(error);
    this.#setState('closed', error.fatal ? { error } : {});
  }

  /** Stops listening to a socket and closes it. */
  #abandon(ws) {
    this.#detach(ws);
    if (this.#ws === ws) this.#ws = null;
    try {
      ws.close(1000);
    } catch {
      /* already closing */
    }
  }

  #detach(ws) {
    ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
    for (const entry of this.#unacked.values()) if (entry.sentOn === ws) entry.sentOn = null;
  }

  #transmit(entry) {
    const ws = this.#ws;
    if (!ws || ws.readyState !== OPEN) return;
    ws.send(entry.frame);
    entry.sentOn = ws;
  }

  #sendPlain(json) {
    if (this.#o.transport === 'sse') return this.#postPlain(json);
    const ws = this.#ws;
    if (!this.#live || !ws || ws.readyState !== OPEN) {
      return Promise.reject(new SessionError('not_connected', 'a plain session sends only while connected (there are no acknowledgements to resend by)'));
    }
    if (longerThan(json, this.#o.maxMessageBytes)) {
      return Promise.reject(new SessionError('too_large', `the message is larger than ${this.#o.maxMessageBytes} bytes (maxMessageBytes)`));
    }
    // The socket queues whatever it is given: a page sending faster than
    // the network takes it would grow without bound. The application
    // hears of it, as of a full maxUnacked, and can wait and send again.
    if (ws.bufferedAmount >= this.#o.maxBufferedBytes) {
      return Promise.reject(new SessionError('queue_full', `${ws.bufferedAmount} bytes wait in the socket, not yet sent (maxBufferedBytes)`));
    }
    ws.send(json);
    return Promise.resolve();
  }

  /* ---- transport sse: EventSource down, fetch POST up ------------------ */

  /** The session's path over HTTP. */
  #ssePath() {
    const { httpBase, agentId, sessionId } = this.#o;
    return `${httpBase}/${agentId}/sse/${sessionId}`;
  }

  #connectSse(token) {
    const { reliable } = this.#o;
    this.#token = token;
    let url = `${this.#ssePath()}?access_token=${encodeURIComponent(token)}`;
    if (reliable) {
      url += '&reliable=true';
      // Our own position, for a stream this module (re)opens; the
      // EventSource's own reconnects send Last-Event-ID, which wins.
      if (this.#epoch !== null && this.#offset !== null) {
        url += `&last_event_id=${encodeURIComponent(`${this.#epoch}:${this.#offset}`)}`;
      }
    }
    let es;
    try {
      es = new this.#o.EventSource(url);
    } catch (cause) {
      this.#fail(new SessionError('invalid_url', `cannot open an EventSource to ${this.#ssePath()}: ${cause.message}`, { cause }));
      return;
    }
    this.#ws = es;
    this.#live = false;
    this.#opened = false;
    this.#lastClose = null;
    es.onopen = () => this.#onSseOpen(es);
    es.onmessage = (ev) => this.#onSseMessage(es, ev);
    es.onerror = () => this.#onSseError(es, url);
    // Named events have no on* property; the handlers check `es` is current.
    es.addEventListener('welcome', (ev) => this.#onSseWelcome(es, ev));
    es.addEventListener('close', (ev) => this.#onSseClose(es, ev));
    es.addEventListener('binary', (ev) => this.#onSseBinary(es, ev));
    this.#startOpenTimer(es);
  }

  /** One attempt's limit, up to the welcome (plain: the stream's start). */
  #startOpenTimer(es) {
    clearTimeout(this.#openTimer);
    this.#openTimer = null;
    if (!(this.#o.openTimeoutMs > 0)) return;
    this.#openTimer = setTimeout(() => {
      this.#openTimer = null;
      if (this.#ws !== es || this.#live) return;
      this.#abandon(es);
      this.#attemptFailed(new SessionError('connect_timeout', `no ${this.#o.reliable ? 'welcome' : 'stream'} within ${this.#o.openTimeoutMs} ms`));
    }, this.#o.openTimeoutMs);
  }

  #onSseOpen(es) {
    if (es !== this.#ws) return;
    this.#opened = true;
    // A plain stream is usable once it answered; a reliable one at its welcome.
    if (!this.#o.reliable) this.#established({});
  }

  #onSseWelcome(es, ev) {
    if (es !== this.#ws || !this.#o.reliable) return;
    let welcome = null;
    try {
      welcome = JSON.parse(ev.data);
    } catch {
      /* reported below */
    }
    if (!welcome || welcome.type !== 'welcome') {
      this.#report(new SessionError('protocol_error', `a welcome event that is not a welcome: ${String(ev.data).slice(0, 200)}`));
      return;
    }
    this.#onWelcome(es, welcome);
  }

  #onSseMessage(es, ev) {
    if (es !== this.#ws) return;
    if (!this.#o.reliable) {
      invoke(this.#o.onMessage, ev.data, {});
      return;
    }
    // The event's id is `<epoch>:<offset>`; its data the backend's JSON.
    const id = String(ev.lastEventId);
    const colon = id.indexOf(':');
    const epoch = colon > 0 ? id.slice(0, colon) : null;
    let data;
    try {
      data = JSON.parse(ev.data);
    } catch {
      this.#report(new SessionError('protocol_error', `a message that is not JSON: ${String(ev.data).slice(0, 200)}`));
      return;
    }
    if (epoch !== this.#epoch) {
      this.#report(new SessionError('protocol_error', `a message of another epoch (id ${JSON.stringify(id)}, welcome's epoch ${this.#epoch})`));
      return;
    }
    this.#onMessage({ type: 'message', offset: id.slice(colon + 1), data });
  }

  /** A frame that is not UTF-8 reaches a plain stream as base64: an ArrayBuffer, as on a WebSocket. */
  #onSseBinary(es, ev) {
    if (es !== this.#ws || this.#o.reliable) return;
    let bytes;
    try {
      bytes = Uint8Array.from(atob(String(ev.data).replace(/\n/g, '')), (c) => c.charCodeAt(0));
    } catch {
      this.#report(new SessionError('protocol_error', 'a binary event that is not base64'));
      return;
    }
    invoke(this.#o.onMessage, bytes.buffer, {});
  }

  /**
   * `event: close`: the server ends the stream. Codes 4000-4999 are the
   * backend's (a control `disconnect`, often with the token revoked): the
   * session ends, as on a WebSocket. Others (1001 shutdown, 1008 slow consumer, 1013) are
   * followed by the EventSource's own reconnect, which resumes.
   */
  #onSseClose(es, ev) {
    if (es !== this.#ws) return;
    let close = null;
    try {
      close = JSON.parse(ev.data);
    } catch {
      /* below */
    }
    const code = close && Number.isInteger(close.code) ? close.code : 1005;
    const reason = close && typeof close.reason === 'string' ? close.reason : '';
    this.#lastClose = { code, reason };
    if (isBackendClose(code)) this.#fail(backendClosed(code, reason));
  }

  #onSseError(es, url) {
    if (es !== this.#ws) return;
    const wasLive = this.#live;
    this.#live = false;
    const { code, reason } = this.#lastClose ?? { code: 1006, reason: '' };
    this.#lastClose = null;
    if (es.readyState === ES_CLOSED) {
      // The EventSource gave up (an HTTP error, not an event stream): this
      // module reconnects, after the backoff, with its own position.
      this.#detach(es);
      this.#ws = null;
      this.#sseRefused(url, wasLive);
      return;
    }
    if (this.#o.reliable && this.#replayLeft > 0) {
      // Dropped in a replay: until the first replayed message arrives, the
      // EventSource's Last-Event-ID is the welcome's (the newest offset),
      // and its own reconnect would skip the replay. Reconnect from the
      // last message delivered instead.
      this.#abandon(es);
      if (wasLive) this.#dropped(`code ${code}${reason ? ', ' + reason : ''}`, { closeCode: code, closeReason: reason }, { code, reason });
      else this.#scheduleReconnect({ code, reason });
      return;
    }
    // The EventSource reconnects by itself (after the server's retry:),
    // with Last-Event-ID.
    if (wasLive && Date.now() - this.#establishedAt >= STABLE_AFTER_MS) {
      this.#failures = 0;
    } else {
      this.#failures += 1;
      this.#report(new SessionError('connect_failed', `the event stream failed (attempt ${this.#failures})`, { attempt: this.#failures }));
      if (this.#failures >= this.#o.backoff.maxAttempts) {
        this.#fail(new SessionError('gave_up', `gave up after ${this.#failures} failed connection attempts`));
        return;
      }
    }
    this.#opened = false;
    this.#setState('connecting', { attempt: this.#failures + 1, code, reason });
    this.#startOpenTimer(es);
  }

  /**
   * Browsers hide why an EventSource failed; a `fetch` of the same URL
   * says (and is cancelled at once if it gets a stream).
   */
  async #sseRefused(url, wasLive) {
    let status = 0;
    let body = null;
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), 5_000);
    try {
      const res = await this.#o.fetch(url, { signal: ctl.signal, headers: { accept: 'text/event-stream' } });
      status = res.status;
      if (!res.ok) body = await res.json().catch(() => null);
    } catch {
      /* unreachable: status 0 */
    } finally {
      clearTimeout(timer);
      ctl.abort();
    }
    if (this.#closed) return;
    if (body && body.error === 'reliable_sessions_off') {
      this.#fail(new SessionError('reliable_unavailable', `the server refused a reliable stream: ${body.message || body.error}; open the session with reliable: false for a plain one`, { status, reply: body }));
      return;
    }
    const why = status ? `HTTP ${status}${body && body.error ? ' ' + body.error : ''}` : 'the server is unreachable';
    const error = new SessionError('connect_failed', `the event stream failed (${why})`, { status, reply: body });
    if (wasLive) {
      this.#dropped(why, { status, reply: body }, { status }, error);
    } else {
      this.#attemptFailed(error, { status });
    }
  }

  /**
   * Sends the client messages waiting for their acknowledgement, one POST
   * at a time and in order (a WebSocket's order), while the stream is
   * live. A POST that fails without an answer is retried after the
   * backoff, or at the next welcome, with the same id: the server stores
   * a resend once.
   */
  async #pump() {
    if (this.#posting || !this.#live || this.#closed || this.#postTimer !== null) return;
    this.#posting = true;
    try {
      for (;;) {
        if (!this.#live || this.#closed) return;
        const entry = this.#unacked.values().next().value;
        if (!entry) return;
        const answer = await this.#post(`${this.#ssePath()}?reliable=true`, entry.frame);
        if (this.#unacked.get(entry.id) !== entry) continue; // settled meanwhile (close())
        const reply = answer.body;
        if (answer.status === 200 && reply && reply.type === 'ack' && reply.id === entry.id) {
          this.#postFailures = this.#rateLimited = 0;
          this.#onAck(reply);
          continue;
        }
        const code = reply && typeof reply.error === 'string' ? reply.error : null;
        if (answer.status === 429 && code === 'rate_limited') {
          // The session sends faster than the server's WS_CLIENT_MESSAGE_RATE:
          // nothing is wrong with the message or the stream, so this is
          // no post_failed and the stream stays. The same id goes again
          // after Retry-After, or 1 s, 2 s, ... (at most backoff.maxMs);
          // later messages wait behind it, so the order holds.
          this.#rateLimited += 1;
          const delayMs = answer.retryAfterMs ?? Math.min(this.#o.backoff.maxMs, RATE_LIMITED_BACKOFF_MS * 2 ** Math.min(this.#rateLimited - 1, 52));
          this.#report(new SessionError('rate_limited', `message ${entry.id} was refused for now (${reply.message || 'the session sends too fast'}); it is sent again in ${delayMs} ms`, { id: entry.id, status: 429, reply, delayMs }));
          if (this.#closed) return; // onError closed the session
          this.#pacing = true;
          this.#postTimer = setTimeout(() => {
            this.#postTimer = null;
            this.#pacing = false;
            this.#pump();
          }, delayMs);
          return;
        }
        const refused = { 400: 'invalid_message', 409: 'id_conflict', 413: 'too_large', 503: 'not_stored' }[answer.status];
        if (refused && code) {
          // The server's answer for this message: resending would get it again.
          this.#postFailures = this.#rateLimited = 0;
          this.#unacked.delete(entry.id);
          const name = answer.status === 413 ? 'too_large' : code;
          entry.reject(new SessionError(name, reply.message || `the server refused the message: ${code}`, { id: entry.id, reply, status: answer.status }));
          continue;
        }
        this.#postFailures += 1;
        this.#report(new SessionError('post_failed', `sending message ${entry.id} failed (${answer.status ? 'HTTP ' + answer.status + (code ? ' ' + code : '') : answer.error}); it is sent again`, { id: entry.id, status: answer.status, reply }));
        const { initialMs, maxMs } = this.#o.backoff;
        const ceiling = Math.min(maxMs, initialMs * 2 ** Math.min(this.#postFailures - 1, 52));
        this.#postTimer = setTimeout(() => {
          this.#postTimer = null;
          this.#pump();
        }, Math.round(ceiling / 2 + Math.random() * (ceiling / 2)));
        return;
      }
    } finally {
      this.#posting = false;
    }
  }

  /**
   * One POST with the token; `{status, body, retryAfterMs}` (the latter
   * from a Retry-After header, else undefined), status 0 (and `error`)
   * when no answer came.
   */
  async #post(url, body) {
    const ctl = new AbortController();
    const timer = this.#o.openTimeoutMs > 0 ? setTimeout(() => ctl.abort(), this.#o.openTimeoutMs) : null;
    try {
      const res = await this.#o.fetch(url, {
        method: 'POST',
        headers: { authorization: `Bearer ${this.#token}`, 'content-type': 'application/json' },
        body,
        signal: ctl.signal,
      });
      const text = await res.text();
      let parsed = null;
      try {
        parsed = JSON.parse(text);
      } catch {
        /* not JSON: a proxy's page */
      }
      return { status: res.status, body: parsed, retryAfterMs: retryAfterMs(res.headers) };
    } catch (cause) {
      return { status: 0, body: null, error: cause && cause.message ? cause.message : String(cause) };
    } finally {
      clearTimeout(timer);
    }
  }

  async #postPlain(json) {
    if (!this.#live) {
      throw new SessionError('not_connected', 'a plain session sends only while connected (there are no acknowledgements to resend by)');
    }
    if (longerThan(json, this.#o.maxMessageBytes)) {
      throw new SessionError('too_large', `the message is larger than ${this.#o.maxMessageBytes} bytes (maxMessageBytes)`);
    }
    const answer = await this.#post(this.#ssePath(), json);
    const code = answer.body && answer.body.error;
    if (answer.status === 429 && code === 'rate_limited') {
      // Over the session's pace. A plain message has no id to resend it
      // by safely, so the caller decides (retryAfterMs when the server
      // said); the stream is fine and stays.
      const { message } = answer.body;
      throw new SessionError('rate_limited', `the server refused the message for now: ${message || 'the session sends too fast'}`, { status: 429, reply: answer.body, retryAfterMs: answer.retryAfterMs });
    }
    if (answer.status !== 200) {
      throw new SessionError('post_failed', `the POST failed (${answer.status ? 'HTTP ' + answer.status + (code ? ' ' + code : '') : answer.error})`, { status: answer.status, reply: answer.body });
    }
  }

  /* ---- frames ------------------------------------------------------------ */

  #onFrame(ws, data) {
    if (ws !== this.#ws) return;
    if (!this.#o.reliable) {
      invoke(this.#o.onMessage, data, {});
      return;
    }
    let msg = null;
    if (typeof data === 'string') {
      try {
        msg = JSON.parse(data);
      } catch {
        /* reported below */
      }
    }
    if (!msg || typeof msg !== 'object' || typeof msg.type !== 'string') {
      this.#report(new SessionError('protocol_error', `a frame that is not a wsproxy.v1 message: ${typeof data === 'string' ? data.slice(0, 200) : 'binary'}`));
      return;
    }
    switch (msg.type) {
      case 'welcome':
        this.#onWelcome(ws, msg);
        break;
      case 'message':
        this.#onMessage(msg);
        break;
      case 'ack':
        this.#onAck(msg);
        break;
      case 'error':
        this.#onError(msg);
        break;
      default:
      // A frame type of a newer server: nothing to do with it.
    }
  }

  #onWelcome(ws, welcome) {
    if (this.#live) {
      this.#report(new SessionError('protocol_error', 'a second welcome on one connection'));
      return;
    }
    if (typeof welcome.epoch !== 'string' || !parseOffset(welcome.offset)) {
      this.#abandon(ws);
      this.#attemptFailed(new SessionError('protocol_error', `a welcome without epoch or offset: ${JSON.stringify(welcome)}`));
      return;
    }
    const from = this.position;
    this.#epoch = welcome.epoch;
    if (welcome.resumed === true && this.#offset !== null) {
      // The replay follows: every message after our offset. Keep the
      // offset until each arrives, so a drop during the replay resumes
      // from the last one delivered.
      this.#replayLeft = Number(welcome.replayed) || 0;
    } else {
      this.#setOffset(welcome.offset);
      this.#replayLeft = 0;
    }
    if (welcome.resumed === false) {
      invoke(this.#o.onResumeFailed, { reason: welcome.reason, epoch: welcome.epoch, offset: welcome.offset, from });
    } else if (welcome.resumed !== true && from !== null) {
      // Asked to resume and not answered (a server or proxy that dropped
      // the position): the session goes on from the welcome's offset, and
      // what came in between is as lost as after a refusal.
      invoke(this.#o.onResumeFailed, { reason: 'not_answered', epoch: welcome.epoch, offset: welcome.offset, from });
    }
    this.#established({ welcome });
  }

  #onMessage(msg) {
    const offset = parseOffset(msg.offset);
    if (!this.#live || !offset) {
      this.#report(new SessionError('protocol_error', `a message ${this.#live ? 'without an offset' : 'before the welcome'}: ${JSON.stringify(msg).slice(0, 200)}`));
      return;
    }
    const replayed = this.#replayLeft > 0;
    if (replayed) this.#replayLeft -= 1;
    if (this.#last && (offset[0] < this.#last[0] || (offset[0] === this.#last[0] && offset[1] <= this.#last[1]))) {
      // Already delivered: the server should never send this, but "once"
      // is this module's promise to the application.
      this.#duplicatesDropped += 1;
      return;
    }
    this.#offset = msg.offset;
    this.#last = offset;
    invoke(this.#o.onMessage, msg.data, { offset: msg.offset, epoch: this.#epoch, replayed });
  }

  #onAck(msg) {
    const entry = typeof msg.id === 'string' ? this.#unacked.get(msg.id) : undefined;
    // No entry: an acknowledgement of a message already settled (rejected by close()).
    if (!entry) return;
    this.#unacked.delete(msg.id);
    const ack = { id: msg.id, offset: msg.offset, duplicate: msg.duplicate === true };
    entry.resolve(ack);
    invoke(this.#o.onAck, ack);
  }

  #onError(msg) {
    const entry = msg.error === 'not_stored' && typeof msg.id === 'string' ? this.#unacked.get(msg.id) : undefined;
    if (entry) {
      this.#unacked.delete(msg.id);
      entry.reject(new SessionError('not_stored', msg.message || 'the server could not store the message', { id: msg.id, reply: msg }));
      return;
    }
    this.#report(new SessionError('server_error', `the server refused a frame: ${msg.error}${msg.message ? ' (' + msg.message + ')' : ''}`, { reply: msg }));
  }

  /* ---- helpers ------------------------------------------------------------ */

  #setOffset(offset) {
    this.#offset = offset;
    this.#last = parseOffset(offset);
  }

  #setState(state, info = {}) {
    this.#state = state;
    invoke(this.#o.onStateChange, state, info);
  }

  #report(error) {
    if (typeof this.#o.onError === 'function') invoke(this.#o.onError, error);
    else console.warn(`wsproxy session ${this.#o.sessionId}: ${error.code}: ${error.message}`);
  }
}

/**
 * Opens a session and keeps it connected until `close()`: see
 * {@link SessionOptions}. Connecting starts at once; `session.ready`
 * resolves with the first welcome.
 *
 * @param {SessionOptions} options
 * @returns {Session}
 * @throws {TypeError} for a bad option (a missing callback, an id the
 *   server would refuse, ...)
 */
export function openSession(options) {
  return new Session(options);
}
