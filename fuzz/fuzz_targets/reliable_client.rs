//! What a reliable (`wsproxy.v1`) client sends: its frames
//! (`reliable::parse_client_message`) and its resume position
//! (`?epoch=&offset=`, `reliable::resume_from`, and offsets as
//! `history::parse_offset` reads them).
//!
//! Input: byte 0 picks the part.
//! - even: the rest is a client's text frame (UTF-8 only);
//! - odd: bits 1 and 2 say whether `epoch` and `offset` are sent; the rest
//!   is the epoch, a NUL, then the offset (UTF-8, lossy).
//!
//! Checked: a frame is accepted exactly when serde_json reads an object
//! with `type` `"message"`, an id of the documented characters and a
//! `data`, each key once, and what is stored is that data as sent; a
//! position is taken only whole (both parts, each non-empty and at most 64
//! bytes) and as sent; an offset is two decimal numbers, read as Redis
//! writes them.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wsproxy::session::history::parse_offset;
use wsproxy::session::reliable::{parse_client_message, resume_from};

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

fn frame(text: &str) {
    let parsed = parse_client_message(text);
    let reference: Option<Value> = serde_json::from_str(text).ok();
    // (Unknown fields are ignored, however often they come.)
    let fields = ["type", "id", "data"];
    let unique = serde_json::from_str::<Keys>(text).is_ok_and(|k| {
        let mut known: Vec<&String> = k.0.iter().filter(|k| fields.contains(&k.as_str())).collect();
        let n = known.len();
        known.sort();
        known.dedup();
        known.len() == n
    });
    let expected = reference
        .as_ref()
        .filter(|v| unique && v["type"] == "message")
        .and_then(|v| Some((v["id"].as_str()?, v.get("data")?)))
        .filter(|(id, _)| wsproxy::keys::valid_id(id));
    match (&parsed, expected) {
        (Ok(m), Some((id, data))) => {
            assert_eq!(&*m.id, id);
            let stored: Value = serde_json::from_str(m.data.get()).expect("data is JSON");
            assert_eq!(&stored, data);
            assert!(text.contains(m.data.get()));
        }
        (Ok(m), None) => {
            // Only data serde_json will not hold in a Value (a number out
            // of f64's range, a lone surrogate) may explain that.
            assert!(reference.is_none(), "accepted {text:?}");
            assert!(wsproxy::keys::valid_id(&m.id) && m.r#type == "message");
        }
        (Err(_), Some(_)) => panic!("refused {text:?}"),
        (Err(_), None) => {}
    }
}

fn position(flags: u8, rest: &[u8]) {
    let rest = String::from_utf8_lossy(rest);
    let (e, o) = rest.split_once('\0').unwrap_or((&rest, ""));
    let epoch = (flags & 2 != 0).then_some(e);
    let offset = (flags & 4 != 0).then_some(o);
    let fits = |s: &str| !s.is_empty() && s.len() <= 64;
    match resume_from(epoch, offset) {
        Ok(None) => assert!(epoch.is_none_or(str::is_empty) && offset.is_none_or(str::is_empty)),
        Ok(Some((e, o))) => {
            assert_eq!((Some(e), Some(o)), (epoch, offset));
            assert!(fits(e) && fits(o), "{e:?} {o:?}");
        }
        Err(err) => {
            assert_eq!((err.status.as_u16(), err.code), (400, "invalid_query"));
            assert!(!(epoch.is_some_and(fits) && offset.is_some_and(fits)));
        }
    }
    for s in [e, o] {
        // As Redis writes a stream id: <ms>-<seq>, decimal, no sign.
        let (ms, seq) = s.split_once('-').unwrap_or((s, ""));
        let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
        match parse_offset(s) {
            Some((a, b)) => {
                assert!(digits(ms) && digits(seq), "{s:?}");
                assert_eq!((ms.parse(), seq.parse()), (Ok(a), Ok(b)));
            }
            None => assert!(
                !(digits(ms) && digits(seq)) || ms.parse::<u64>().is_err() || seq.parse::<u64>().is_err(),
                "{s:?}"
            ),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    if flags & 1 == 0 {
        if let Ok(text) = std::str::from_utf8(rest) {
            frame(text);
        }
    } else {
        position(flags, rest);
    }
});
