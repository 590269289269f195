//! The JSON of a `/ws` `publish-json:` command (`pubsub::Publish`): what
//! a client publishes, and what its topic's subscribers then receive.
//!
//! Input: a flags byte (bit 0: the connection has a name, `Client1`; bits
//! 1-7: the payload limit, in 8-byte steps), then the command's JSON.
//!
//! Checked against serde_json's own reading of the same text: a message
//! of the documented shape is accepted exactly when its topic and session
//! are names, its payload within the limit and its publisher printable;
//! what subscribers receive is JSON that says what was published, with the
//! payload byte for byte as sent.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsproxy::pubsub::{Publish, valid_name};

const NOW: &str = "2024-01-24T10:25:37Z";

/// How serde_json reads a field: absent (or null, for the optional ones),
/// a string, or something else.
fn text(v: &Value, key: &str) -> Result<Option<String>, ()> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(()),
    }
}

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

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Ok(json) = std::str::from_utf8(rest) else {
        return;
    };
    let name = (flags & 1 != 0).then_some("Client1");
    let limit = usize::from(flags >> 1) * 8;
    let parsed = Publish::parse(json, limit);
    let reference: Option<Value> = serde_json::from_str(json).ok();

    // What serde_json says a message of the documented shape carries.
    // (Unknown fields are ignored, however often they come.)
    let fields = ["publisher_name", "topic", "payload", "timestamp", "session_id"];
    let unique = serde_json::from_str::<Keys>(json).is_ok_and(|k| {
        let mut known: Vec<&String> = k.0.iter().filter(|k| fields.contains(&k.as_str())).collect();
        let n = known.len();
        known.sort();
        known.dedup();
        known.len() == n
    });
    let shape = reference.as_ref().filter(|v| v.is_object() && unique).and_then(|v| {
        let topic = text(v, "topic").ok()??;
        let payload = v.get("payload")?;
        Some((
            topic,
            payload.clone(),
            text(v, "session_id").ok()?,
            text(v, "publisher_name").ok()?,
            text(v, "timestamp").ok()?,
        ))
    });

    match (&parsed, &shape) {
        (Ok(msg), Some((topic, payload, session, publisher, timestamp))) => {
            assert_eq!(&*msg.topic, topic);
            assert!(valid_name(topic), "{topic:?}");
            assert!(session.as_deref().is_none_or(valid_name), "{session:?}");
            assert!(msg.payload.get().len() <= limit);
            let Ok(who) = msg.publisher(name) else {
                let who = publisher.as_deref().or(name).unwrap_or("anonymous");
                assert!(who.is_empty() || who.len() > 128 || who.chars().any(char::is_control));
                return;
            };
            assert_eq!(who, publisher.as_deref().or(name).unwrap_or("anonymous"));
            let session = session.as_deref().unwrap_or("bound-session");
            // The verified subject, when there is one, is wsproxy's: never
            // what the message says.
            let subject = (json.len() % 2 == 0).then_some("alice");
            let body = msg.delivered(who, subject, session, NOW).expect("encodes");
            let got: Value = serde_json::from_str(&body).expect("subscribers get JSON");
            assert_eq!(got["topic"], topic.as_str());
            assert_eq!(got["session_id"], session);
            assert_eq!(got["publisher_name"], who);
            match subject {
                Some(s) => assert_eq!(got["publisher_sub"], s),
                None => assert!(got.get("publisher_sub").is_none(), "{body}"),
            }
            assert_eq!(got["timestamp"], timestamp.as_deref().unwrap_or(NOW));
            assert_eq!(&got["payload"], payload);
            // The payload passes through as written.
            assert!(body.contains(msg.payload.get()));
            assert!(json.contains(msg.payload.get()));
        }
        (Ok(_), None) => {
            // Accepted although serde_json reads no such message: only a
            // payload it will not hold in a Value (a number out of f64's
            // range, a lone surrogate) may explain that.
            assert!(reference.is_none(), "accepted {json:?}");
        }
        (Err(e), Some((topic, _, session, _, _))) => match e.error {
            "payload_too_large" => assert!(limit < json.len()),
            "invalid_topic" => assert!(!valid_name(topic)),
            "invalid_session" => assert!(session.as_deref().is_some_and(|s| !valid_name(s))),
            other => panic!("{json:?} refused with {other}: {}", e.message),
        },
        (Err(e), None) => assert!(!e.message.is_empty()),
    }
});
