//! The parser of `wsproxy:control` messages (anything a backend, or
//! anyone who can publish on Redis, sends): never a panic; what it accepts
//! names a session that cannot change a channel, a close code a server may
//! send and a reason that fits a close frame.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::control::{Command, MAX_REASON_BYTES, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Command::Disconnect { session_id, order }) => {
            assert!(wsproxy::keys::valid_id(&session_id), "{session_id:?}");
            assert!(
                order.code == 1000 || order.code == 1008 || (3000..=4999).contains(&order.code),
                "{}",
                order.code
            );
            assert!(order.reason.len() <= MAX_REASON_BYTES);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
