//! The one table of WebSocket close codes wsproxy sends (RFC 6455 section
//! 7.4.1), for the session and pub/sub driver and the proxy's tunnel alike.

/// The server is shutting down (or the proxy cut a client off: to the
/// backend, its client went away).
pub const GOING_AWAY: u16 = 1001;
/// The client broke the protocol (an unmasked frame, reserved bits, a bad
/// control frame, fragments out of order...).
pub const PROTOCOL: u16 = 1002;
/// Data that is not what it claims: text that is not UTF-8, compressed
/// data that does not inflate.
pub const INVALID_DATA: u16 = 1007;
/// Policy: a slow consumer, an expired token, a client over its rate.
pub const POLICY: u16 = 1008;
/// A message over the size limit.
pub const TOO_BIG: u16 = 1009;
/// Unexpected condition: a heartbeat that went unanswered.
pub const INTERNAL: u16 = 1011;
/// Try again later: a reliable session whose messages stopped because
/// wsproxy lost Redis; reconnecting resumes it from history.
pub const TRY_AGAIN_LATER: u16 = 1013;
/// Never sent: what a disconnect event reports when the client left
/// without a close frame (RFC 6455 section 7.1.5).
pub const ABNORMAL: u16 = 1006;
