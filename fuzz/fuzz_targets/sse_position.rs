//! `sse::parse_position`: the SSE stream's resume position, as a client
//! sends it in `Last-Event-ID` or `?last_event_id=` (`<epoch>:<offset>`,
//! an event's id).
//!
//! Input: the whole input is the id (UTF-8, lossy).
//!
//! Checked: never a panic; an id is accepted exactly when it has a colon
//! and its two halves, split at the first colon, pass the check a
//! reliable WebSocket's `?epoch=&offset=` pass (`reliable::resume_from`:
//! both non-empty, each at most 64 bytes); what is accepted is those two
//! halves as sent, slices of the id, which join again into the id and
//! parse again to the same halves; a refusal is `400 invalid_query`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::session::reliable::resume_from;
use wsproxy::session::sse::parse_position;

fuzz_target!(|data: &[u8]| {
    let id = String::from_utf8_lossy(data);
    let id = id.as_ref();
    // What a WebSocket resume with the same two halves would get.
    let expected = id
        .split_once(':')
        .and_then(|(e, o)| resume_from(Some(e), Some(o)).ok().flatten());
    match parse_position(id) {
        Ok((epoch, offset)) => {
            assert_eq!(Some((epoch, offset)), id.split_once(':'), "{id:?}");
            assert_eq!(Some((epoch, offset)), expected, "{id:?}");
            assert!(!epoch.is_empty() && !offset.is_empty(), "{id:?}");
            assert!(epoch.len() <= 64 && offset.len() <= 64, "{id:?}");
            assert!(!epoch.contains(':'), "{id:?}");
            // Slices of the id, not copies: the epoch starts it, the
            // offset ends it.
            assert_eq!(epoch.as_ptr(), id.as_ptr());
            assert_eq!(
                offset.as_bytes().as_ptr_range().end,
                id.as_bytes().as_ptr_range().end
            );
            // The position the stream's welcome echoes joins them again.
            let joined = format!("{epoch}:{offset}");
            assert_eq!(joined, id);
            assert_eq!(parse_position(&joined).ok(), Some((epoch, offset)));
        }
        Err(err) => {
            assert_eq!(
                (err.status.as_u16(), err.code),
                (400, "invalid_query"),
                "{id:?}"
            );
            assert_eq!(expected, None, "refused {id:?}");
        }
    }
});
