//! The parser of `wsproxy:control` messages (anything a backend, or
//! anyone who can publish on Redis, sends): never a panic; what it accepts
//! names a session that cannot change a channel, a close code a server may
//! send and a reason that fits a close frame.
//!
//! Checked against serde_json's own reading of the same bytes: a message
//! is accepted exactly when it is an object of the documented keys (each
//! once) with `type` `"disconnect"`, a valid `session_id`, and `code` and
//! `reason` absent, null or valid; and then it says what the JSON says.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsproxy::session::control::{Command, DEFAULT_CODE, MAX_CONTROL_BYTES, MAX_REASON_BYTES, parse};

/// The top-level keys of an object, duplicates kept.
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = m.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(V)
    }
}

/// What the message should be read as, by the README's description.
fn expected(data: &[u8]) -> Option<(String, u16, String)> {
    if data.len() > MAX_CONTROL_BYTES {
        return None;
    }
    let v: Value = serde_json::from_slice(data).ok()?;
    let keys = serde_json::from_slice::<Keys>(data).ok()?.0;
    let known = ["type", "session_id", "code", "reason"];
    for (i, k) in keys.iter().enumerate() {
        if !known.contains(&k.as_str()) || keys[..i].contains(k) {
            return None;
        }
    }
    if v["type"] != "disconnect" {
        return None;
    }
    let session = v["session_id"].as_str().filter(|s| wsproxy::keys::valid_id(s))?;
    let code = match &v["code"] {
        Value::Null => DEFAULT_CODE,
        c => u16::try_from(c.as_u64()?).ok()?,
    };
    if !(code == 1000 || code == 1008 || (3000..=4999).contains(&code)) {
        return None;
    }
    let reason = match &v["reason"] {
        Value::Null => "disconnected by the backend",
        r => r.as_str().filter(|r| r.len() <= MAX_REASON_BYTES)?,
    };
    Some((session.to_owned(), code, reason.to_owned()))
}

fuzz_target!(|data: &[u8]| {
    let parsed = parse(data);
    match (&parsed, expected(data)) {
        (Ok(Command::Disconnect { session_id, order }), Some((session, code, reason))) => {
            assert_eq!((session_id, order.code, &order.reason), (&session, code, &reason));
        }
        (Ok(Command::Disconnect { session_id, order }), None) => {
            // Only JSON serde_json will not hold in a Value could explain
            // this; the promises hold in any case.
            assert!(serde_json::from_slice::<Value>(data).is_err(), "accepted {data:?}");
            assert!(wsproxy::keys::valid_id(session_id), "{session_id:?}");
            assert!(
                order.code == 1000 || order.code == 1008 || (3000..=4999).contains(&order.code),
                "{}",
                order.code
            );
            assert!(order.reason.len() <= MAX_REASON_BYTES);
        }
        (Err(e), Some(_)) => panic!("refused ({e}): {:?}", String::from_utf8_lossy(data)),
        (Err(e), None) => assert!(!e.to_string().is_empty()),
    }
});
