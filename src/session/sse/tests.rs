use super::*;

fn data(text: &str) -> String {
    let mut out = BytesMut::new();
    put_data(&mut out, text);
    String::from_utf8(out.to_vec()).expect("utf-8")
}

#[test]
fn line_breaks_split_a_message_into_data_lines() {
    assert_eq!(data("{\"a\":1}"), "data: {\"a\":1}\n");
    assert_eq!(data("a\nb"), "data: a\ndata: b\n");
    assert_eq!(data("a\r\nb\rc\n"), "data: a\ndata: b\ndata: c\ndata: \n");
    assert_eq!(data(""), "data: \n");
    assert_eq!(data(" x"), "data:  x\n");
}

#[test]
fn positions_are_epoch_colon_offset() {
    assert_eq!(
        parse_position("1764600000123456:1764600000000-0").ok(),
        Some(("1764600000123456", "1764600000000-0"))
    );
    for bad in ["", ":", "x", "e:", ":1-0"] {
        assert!(parse_position(bad).is_err(), "{bad:?}");
    }
}

#[tokio::test]
async fn resumable_frames_become_events_with_ids() {
    use futures_util::{SinkExt, StreamExt};
    let (mut socket, mut body) = pipe(None);
    let welcome = r#"{"type":"welcome","session_id":"s","epoch":"17","offset":"5-0"}"#;
    // A send completes once the body has taken it: both at once.
    let (sent, first) = tokio::join!(socket.send(Message::Text(welcome.into())), body.next());
    sent.expect("send");
    let first = first.expect("chunk").expect("ok");
    assert_eq!(
        std::str::from_utf8(&first).expect("utf-8"),
        format!("retry: {RETRY_MS}\n\nevent: welcome\nid: 17:5-0\ndata: {welcome}\n\n")
    );
    let envelope = r#"{"type":"message","offset":"6-0","data":{"n":"a\nb"}}"#;
    let (sent, next) = tokio::join!(socket.send(Message::Text(envelope.into())), body.next());
    sent.expect("send");
    let next = next.expect("chunk").expect("ok");
    assert_eq!(
        std::str::from_utf8(&next).expect("utf-8"),
        "id: 17:6-0\ndata: {\"n\":\"a\\nb\"}\n\n"
    );
    let close = Message::Close(Some(axum::extract::ws::CloseFrame {
        code: 1013,
        reason: "again".into(),
    }));
    let (sent, last) = tokio::join!(socket.send(close), body.next());
    sent.expect("close");
    let last = last.expect("chunk").expect("ok");
    assert_eq!(
        std::str::from_utf8(&last).expect("utf-8"),
        "event: close\ndata: {\"code\":1013,\"reason\":\"again\"}\n\n"
    );
    assert!(body.next().await.is_none(), "the body ends after the close");
    assert!(socket.next().await.is_none());
}

#[tokio::test]
async fn a_keepalive_taken_by_the_body_is_a_pong_and_a_dropped_body_is_gone() {
    use futures_util::{SinkExt, StreamExt};
    let (mut socket, mut body) = pipe(None);
    let _ = body.next().await; // retry:
    let (sent, _) = tokio::join!(socket.send(Message::Ping(Bytes::new())), body.next());
    sent.expect("keepalive");
    assert!(matches!(socket.next().await, Some(Ok(Message::Pong(_)))));
    drop(body);
    assert!(socket.next().await.is_none());
    assert!(socket.send(Message::Text("x".into())).await.is_err());
}
