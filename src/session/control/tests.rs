use super::rejoin::{digest, rejoin_point};
use super::*;

fn order(code: u16) -> CloseOrder {
    CloseOrder {
        code,
        reason: "r".into(),
    }
}

#[tokio::test(start_paused = true)]
async fn an_admission_finds_the_disconnects_that_came_after_it_began() {
    let recent = Recent::new(Duration::from_secs(5));
    let earlier = Instant::now();
    recent.record("s1", &order(4001));
    // A disconnect before the admission began is not its own: the
    // backend may have made a new token since.
    tokio::time::advance(Duration::from_millis(10)).await;
    let began = Instant::now();
    assert_eq!(recent.since("s1", began), None);
    assert_eq!(recent.since("s1", earlier), Some(order(4001)));
    assert_eq!(recent.since("s2", earlier), None);
    recent.record("s1", &order(4002));
    assert_eq!(recent.since("s1", began), Some(order(4002)));
    // Forgotten once no admission can still be under way.
    tokio::time::advance(Duration::from_secs(6)).await;
    recent.record("s3", &order(4003));
    assert_eq!(recent.since("s1", began), None);
    assert_eq!(recent.inner.lock().expect("lock").queue.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_newer_disconnect_at_the_same_instant_outlives_the_older_one() {
    let recent = Recent::new(Duration::from_secs(5));
    let began = Instant::now();
    // The clock does not move: every disconnect gets the same instant.
    recent.record("s1", &order(4001));
    recent.record("s1", &order(4002));
    // The cap pushes the first one out, not the second.
    for i in 0..RECENT_MAX - 1 {
        recent.record(&format!("other{i}"), &order(4000));
    }
    assert_eq!(recent.since("s1", began), Some(order(4002)));
}

#[test]
fn recent_disconnects_are_bounded() {
    let recent = Recent::new(Duration::from_secs(3600));
    for i in 0..RECENT_MAX + 10 {
        recent.record(&format!("s{i}"), &order(4000));
    }
    let inner = recent.inner.lock().expect("lock");
    assert_eq!(inner.queue.len(), RECENT_MAX);
    assert_eq!(inner.last.len(), RECENT_MAX);
    assert!(!inner.last.contains_key("s0"));
}

#[test]
fn stream_ids_parse_and_order_as_redis_orders_them() {
    assert_eq!(
        StreamId::parse(b"1700000000000-3"),
        Some(StreamId(1_700_000_000_000, 3))
    );
    assert!(StreamId(1, 10) > StreamId(1, 9));
    assert!(StreamId(2, 0) > StreamId(1, 99));
    assert_eq!(StreamId::parse(b"0-0"), Some(StreamId::default()));
    assert_eq!(StreamId(12, 3).to_string(), "12-3");
    // A command in the old form is no wake-up.
    for other in [
        &b"{\"type\":\"disconnect\"}"[..],
        b"12",
        b"-1-0",
        b"1-",
        b"+1-0",
        b"99999999999999999999999-0",
        b"",
    ] {
        assert_eq!(StreamId::parse(other), None, "{other:?}");
    }
}

#[test]
fn unread_entries_are_lost_only_when_trimming_or_deleting_passed_the_position() {
    let info = |first: Option<u64>, last: u64, deleted: Option<u64>| LogInfo {
        first: first.map(|f| StreamId(f, 0)),
        last: StreamId(last, 0),
        max_deleted: deleted.map(|d| StreamId(d, 0)),
    };
    let at = StreamId(10, 0);
    // The position is still there, or the stream starts after it but
    // the position is no entry (the start): nothing lost.
    assert!(!lost_after(true, at, info(Some(5), 20, None)));
    assert!(!lost_after(true, at, info(Some(10), 20, Some(3))));
    assert!(!lost_after(false, at, info(Some(15), 20, None)));
    // The entry read last was trimmed away.
    assert!(lost_after(true, at, info(Some(15), 20, None)));
    // Something after it was deleted.
    assert!(lost_after(false, at, info(Some(5), 20, Some(12))));
    // Emptied: lost only if it had entries after the position.
    assert!(!lost_after(true, at, info(None, 10, None)));
    assert!(lost_after(true, at, info(None, 12, None)));
}

#[test]
fn the_control_library_names_this_deployments_stream_and_channel() {
    let lua = library(crate::keys::Keys::Standalone);
    assert!(
        lua.contains("'XADD', keys[1], 'MAXLEN', '~', 100000, '*', 'c'"),
        "{lua}"
    );
    assert!(
        lua.contains("if keys[1] ~= 'wsproxy:control:log' then"),
        "{lua}"
    );
    assert!(
        lua.contains("redis.call('PUBLISH', 'wsproxy:control', id)"),
        "{lua}"
    );
    assert!(lua.contains("if #command > 4096 then"), "{lua}");
    let lua = library(crate::keys::Keys::ClusterSharded);
    assert!(
        lua.contains("if keys[1] ~= '{wsproxy:control}:log' then"),
        "{lua}"
    );
    assert!(
        lua.contains("redis.call('SPUBLISH', 'wsproxy:control', id)"),
        "{lua}"
    );
    assert!(!lua.contains("__"), "a placeholder is left: {lua}");
}

#[test]
fn a_disconnect_takes_defaults_and_limits() {
    assert_eq!(
        parse(br#"{"type":"disconnect","session_id":"s1"}"#),
        Ok(Command::Disconnect {
            session_id: "s1".into(),
            order: CloseOrder {
                code: 4000,
                reason: "disconnected by the backend".into()
            }
        })
    );
    let Ok(Command::Disconnect { order, .. }) =
        parse(br#"{"type":"disconnect","session_id":"s1","code":4001,"reason":"revoked"}"#)
    else {
        panic!("valid");
    };
    assert_eq!((order.code, order.reason.as_str()), (4001, "revoked"));
    for code in [1000, 1008, 3000, 4999] {
        let msg = format!(r#"{{"type":"disconnect","session_id":"s","code":{code}}}"#);
        assert!(parse(msg.as_bytes()).is_ok(), "{code}");
    }
}

#[test]
fn malformed_commands_are_refused_by_cause() {
    let long_reason = format!(
        r#"{{"type":"disconnect","session_id":"s","reason":"{}"}}"#,
        "x".repeat(124)
    );
    let huge = format!(
        r#"{{"type":"disconnect","session_id":"{}"}}"#,
        "s".repeat(5000)
    );
    type Expect = fn(&ControlError) -> bool;
    let cases: [(&[u8], Expect); 12] = [
        (b"", |e| matches!(e, ControlError::Shape(_))),
        (b"not json", |e| matches!(e, ControlError::Shape(_))),
        (b"[1,2]", |e| matches!(e, ControlError::Shape(_))),
        (br#"{"session_id":"s"}"#, |e| {
            matches!(e, ControlError::Shape(_))
        }),
        (br#"{"type":"reboot","session_id":"s"}"#, |e| {
            matches!(e, ControlError::UnknownType(_))
        }),
        (br#"{"type":"disconnect"}"#, |e| {
            *e == ControlError::SessionId
        }),
        (br#"{"type":"disconnect","session_id":"a:b"}"#, |e| {
            *e == ControlError::SessionId
        }),
        (
            br#"{"type":"disconnect","session_id":"s","code":1006}"#,
            |e| *e == ControlError::Code(1006),
        ),
        (
            br#"{"type":"disconnect","session_id":"s","code":70000}"#,
            |e| matches!(e, ControlError::Shape(_)),
        ),
        (
            br#"{"type":"disconnect","session_id":"s","extra":1}"#,
            |e| matches!(e, ControlError::Shape(_)),
        ),
        (long_reason.as_bytes(), |e| *e == ControlError::Reason),
        (huge.as_bytes(), |e| *e == ControlError::TooLong),
    ];
    for (input, expected) in cases {
        let e = parse(input).expect_err("malformed");
        assert!(expected(&e), "{:?}: {e:?}", String::from_utf8_lossy(input));
    }
}

#[test]
fn a_stream_behind_the_position_is_rejoined_after_the_newest_entry_applied() {
    let id = |ms: u64| StreamId(ms, 0);
    let applied: VecDeque<(StreamId, u64)> = [(id(10), 1), (id(20), 2), (id(30), 3)].into();
    // A lagging replica: its last entry is one applied.
    assert_eq!(
        rejoin_point(&applied, &[(id(20), 2), (id(10), 1)]),
        Some(id(20))
    );
    // Entries written since, with ids below the position, come after the
    // newest one applied: they are read.
    assert_eq!(
        rejoin_point(&applied, &[(id(25), 9), (id(21), 8), (id(20), 2)]),
        Some(id(20))
    );
    // The same id with another command is not the one applied.
    assert_eq!(
        rejoin_point(&applied, &[(id(20), 7), (id(10), 1)]),
        Some(id(10))
    );
    // Nothing applied among them, none older: look further back (or, at
    // the stream's start, read it all).
    assert_eq!(rejoin_point(&applied, &[(id(25), 9), (id(15), 8)]), None);
    assert_eq!(rejoin_point(&applied, &[]), None);
    // Older than everything remembered: taken as applied.
    assert_eq!(
        rejoin_point(&applied, &[(id(12), 9), (id(5), 8)]),
        Some(id(5))
    );
    // Nothing remembered (only the start position was ever taken): the
    // stream's newest entry.
    assert_eq!(
        rejoin_point(&VecDeque::new(), &[(id(12), 9), (id(5), 8)]),
        Some(id(12))
    );
    assert_eq!(digest(Some(b"a")), digest(Some(b"a")));
    assert_ne!(digest(Some(b"a")), digest(Some(b"b")));
    assert_ne!(digest(Some(b"")), digest(None));
}
