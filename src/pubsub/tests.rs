use super::*;

#[test]
fn names_that_could_change_a_channel_are_refused() {
    for bad in ["", "a:b", "a*", "a b", "a|b", "é", &"x".repeat(129)] {
        assert!(!valid_name(bad), "{bad:?}");
    }
    assert!(valid_name("NetworkConnectedEvent"));
    assert!(valid_name("session-user.123_x"));
}

#[test]
fn commands_are_split_and_their_topics_and_sessions_checked() {
    use Command::*;
    assert_eq!(parse_command("ping"), Ok(Ping));
    assert_eq!(
        parse_command("register-name: Zoë "),
        Ok(RegisterName(" Zoë "))
    );
    assert_eq!(
        parse_command("register-session: s-1 "),
        Ok(RegisterSession("s-1"))
    );
    assert_eq!(
        parse_command("subscribe: t.1 | s_2 "),
        Ok(Subscribe {
            topic: "t.1",
            session: Some("s_2")
        })
    );
    assert_eq!(
        parse_command("unsubscribe:t|s"),
        Ok(Unsubscribe {
            topic: "t",
            session: Some("s")
        })
    );
    // Without a session: the connection's own (checked by the hub).
    assert_eq!(
        parse_command("subscribe: t.1 "),
        Ok(Subscribe {
            topic: "t.1",
            session: None
        })
    );
    assert_eq!(
        parse_command("unsubscribe:t"),
        Ok(Unsubscribe {
            topic: "t",
            session: None
        })
    );
    assert_eq!(parse_command("publish-json:{}"), Ok(PublishJson("{}")));
    let refused = |line| parse_command(line).map_err(|e| (e.command, e.error));
    assert_eq!(refused("pong"), Err(("pong", "unknown_command")));
    assert_eq!(refused("ping:"), Err(("ping", "unknown_command")));
    let long = "x".repeat(40);
    assert_eq!(refused(&long), Err((&long[..32], "unknown_command")));
    // At most 32 bytes, cut at a character boundary (the whole line
    // was echoed when byte 32 fell inside a character).
    let wide = format!("x{}", "é".repeat(20));
    assert_eq!(refused(&wide), Err((&wide[..31], "unknown_command")));
    let verb = format!("{wide}:x");
    assert_eq!(refused(&verb), Err((&wide[..31], "unknown_command")));
    assert_eq!(
        refused("subscribe:t|"),
        Err(("subscribe", "invalid_session"))
    );
    assert_eq!(refused("subscribe:"), Err(("subscribe", "invalid_topic")));
    assert_eq!(
        refused("subscribe:a*|s"),
        Err(("subscribe", "invalid_topic"))
    );
    assert_eq!(refused("subscribe:|s"), Err(("subscribe", "invalid_topic")));
    assert_eq!(
        refused("unsubscribe:t|s|x"),
        Err(("unsubscribe", "invalid_session"))
    );
    assert_eq!(
        refused("register-session:a:b"),
        Err(("register-session", "invalid_session"))
    );
}

#[test]
fn delivered_messages_keep_the_payload_verbatim() {
    let raw = r#"{"topic":"t","payload":{"b":1, "a":[1,2]}}"#;
    let p: Publish<'_> = serde_json::from_str(raw).expect("parse");
    let mut d = Delivered {
        publisher_name: "c",
        publisher_sub: None,
        topic: &p.topic,
        payload: p.payload,
        timestamp: "2024-01-24T10:25:37Z",
        session_id: "s",
    };
    assert_eq!(
        serde_json::to_string(&d).expect("encode"),
        r#"{"publisher_name":"c","topic":"t","payload":{"b":1, "a":[1,2]},"timestamp":"2024-01-24T10:25:37Z","session_id":"s"}"#
    );
    d.publisher_sub = Some("alice");
    assert_eq!(
        serde_json::to_string(&d).expect("encode"),
        r#"{"publisher_name":"c","publisher_sub":"alice","topic":"t","payload":{"b":1, "a":[1,2]},"timestamp":"2024-01-24T10:25:37Z","session_id":"s"}"#
    );
}
