//! The `/ws` line protocol's parser: never a panic; what it accepts names
//! topics and sessions that cannot change a Redis channel, and what it
//! refuses echoes at most 32 bytes of an unknown verb.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::pubsub::{Command, parse_command, valid_name};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    match parse_command(line) {
        Ok(Command::Ping) => assert_eq!(line, "ping"),
        Ok(Command::RegisterName(name)) => {
            assert_eq!(Some(name), line.strip_prefix("register-name:"));
        }
        Ok(Command::RegisterSession(session)) => {
            assert!(valid_name(session), "{session:?}");
            assert!(line.starts_with("register-session:"));
        }
        Ok(Command::Subscribe { topic, session }) | Ok(Command::Unsubscribe { topic, session }) => {
            assert!(valid_name(topic), "{topic:?}");
            assert!(line.starts_with("subscribe:") || line.starts_with("unsubscribe:"));
            // A session is named exactly when the line has a `|`.
            assert_eq!(session.is_some(), line.contains('|'), "{line:?}");
            // Neither can hold the other's separator, nor a channel's.
            for name in [Some(topic), session].into_iter().flatten() {
                assert!(valid_name(name), "{name:?}");
                assert!(!name.contains([':', '|', '*', '?', '[', ']', ' ']));
            }
        }
        Ok(Command::PublishJson(json)) => {
            assert_eq!(Some(json), line.strip_prefix("publish-json:"));
        }
        Err(e) => {
            assert!(!e.message.is_empty());
            match e.error {
                "unknown_command" => {
                    assert!(e.command.len() <= 32, "{} bytes echoed", e.command.len());
                    assert!(line.starts_with(e.command));
                }
                "invalid_command" | "invalid_topic" | "invalid_session" => {
                    assert!(
                        line.starts_with(e.command) && line[e.command.len()..].starts_with(':')
                    );
                }
                other => panic!("unexpected error code {other}"),
            }
        }
    }
});
