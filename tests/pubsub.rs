//! Topic pub/sub (`/ws`, `POST /auth/token`) end to end: real Redis, real
//! sockets, wsproxy in-process.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsproxy::config::{Config, JwtConfig};

const SECRET: &str = "an-integration-test-secret-of-32+bytes";

fn jwt() -> JwtConfig {
    JwtConfig {
        secret: SECRET.as_bytes().to_vec(),
        issuer: "wsproxy".into(),
        audience: "wsproxy".into(),
        ttl: Duration::from_secs(600),
    }
}

/// A users file with alice/wonderland and bob/builder.
fn users_file() -> std::path::PathBuf {
    users_file_of(&[("alice", "wonderland", None), ("bob", "builder", None)])
}

/// A users file of `(user, password, sessions)`: the sessions, when given,
/// are the line's third field.
fn users_file_of(users: &[(&str, &str, Option<&str>)]) -> std::path::PathBuf {
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("{}.users", unique("wsproxy-test")));
    let mut text = String::from("# test users\n");
    for (u, p, sessions) in users {
        let hash = wsproxy::auth::users::hash_password(p).expect("hash");
        match sessions {
            Some(list) => text.push_str(&format!("{u}:{hash}:{list}\n")),
            None => text.push_str(&format!("{u}:{hash}\n")),
        }
    }
    std::fs::write(&path, text).expect("write users file");
    path
}

fn with_auth(c: &mut Config) {
    c.jwt = Some(jwt());
    c.users_file = Some(users_file());
}

fn anonymous(c: &mut Config) {
    c.pubsub.allow_anonymous = true;
}

async fn ws(server: &Server, token: Option<&str>) -> Result<Ws, (u16, serde_json::Value)> {
    let mut req = format!("ws://{}/ws", server.addr)
        .into_client_request()
        .expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
    }
    connect_request(req).await
}

async fn command(ws: &mut Ws, line: &str) -> serde_json::Value {
    send_text(ws, line).await;
    serde_json::from_str(&next_text(ws).await).expect("JSON reply")
}

async fn token(
    server: &Server,
    user: &str,
    password: &str,
    session: Option<&str>,
) -> (u16, serde_json::Value) {
    let body = match session {
        Some(s) => serde_json::json!({ "username": user, "password": password, "session_id": s }),
        None => serde_json::json!({ "username": user, "password": password }),
    };
    let (status, text) = http_post_json(server.addr, "/auth/token", &body.to_string())
        .await
        .expect("POST /auth/token");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test]
async fn commands_are_confirmed_and_messages_have_the_seed_format() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), anonymous).await;
    let session = unique("sess");
    let mut a = ws(&server, None).await.expect("anonymous allowed");
    let mut b = ws(&server, None).await.expect("anonymous allowed");

    let r = command(&mut a, "register-name:Client1").await;
    assert_eq!(
        (r["type"].as_str(), r["name"].as_str()),
        (Some("registered"), Some("Client1"))
    );
    let r = command(&mut a, &format!("register-session:{session}")).await;
    assert_eq!(r["session_id"], session.as_str());
    let r = command(
        &mut a,
        &format!("subscribe:NetworkConnectedEvent|{session}"),
    )
    .await;
    assert_eq!(r["type"], "subscribed");
    assert_eq!(r["topic"], "NetworkConnectedEvent");
    send_text(&mut b, "ping").await;
    assert_eq!(next_text(&mut b).await, "pong");

    // Published right after the confirmation: no sleep needed.
    let msg = serde_json::json!({
        "publisher_name": "Client2",
        "topic": "NetworkConnectedEvent",
        "payload": "Network connected",
        "timestamp": "2024-01-24T10:25:37Z",
        "session_id": session,
    });
    send_text(&mut b, &format!("publish-json:{msg}")).await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut a).await).expect("json");
    assert_eq!(got, msg);
    let keys: Vec<&String> = got.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 5, "exactly the seed's fields: {got}");

    // Fields left out are filled in: name, timestamp, session.
    send_text(
        &mut a,
        r#"publish-json:{"topic":"NetworkConnectedEvent","payload":{"up":true}}"#,
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut a).await).expect("json");
    assert_eq!(got["publisher_name"], "Client1");
    assert_eq!(got["session_id"], session.as_str());
    assert_eq!(got["payload"], serde_json::json!({"up": true}));
    assert!(
        got["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{got}"
    );

    // Unsubscribed: nothing more arrives.
    let r = command(
        &mut a,
        &format!("unsubscribe:NetworkConnectedEvent|{session}"),
    )
    .await;
    assert_eq!(r["type"], "unsubscribed");
    send_text(&mut b, &format!("publish-json:{msg}")).await;
    assert_silent(&mut a, Duration::from_millis(300)).await;
    assert!(server.metric("wsproxy_pubsub_published_total").await >= 3.0);
    assert!(server.metric("wsproxy_pubsub_delivered_total").await >= 2.0);
}

#[tokio::test]
async fn sessions_are_isolated_and_bound() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        anonymous(c);
    })
    .await;
    let (s1, s2) = (unique("s"), unique("s"));
    let (_, t1) = token(&server, "alice", "wonderland", Some(&s1)).await;
    let t1 = t1["token"].as_str().expect("token").to_owned();
    let mut alice = ws(&server, Some(&t1)).await.expect("valid token");
    let mut other = ws(&server, None).await.expect("anonymous");
    assert_eq!(
        command(&mut alice, &format!("subscribe:T|{s1}")).await["type"],
        "subscribed"
    );
    assert_eq!(
        command(&mut other, &format!("subscribe:T|{s2}")).await["type"],
        "subscribed"
    );

    // The token's session is the only one alice may use.
    let r = command(&mut alice, &format!("subscribe:T|{s2}")).await;
    assert_eq!(
        (r["type"].as_str(), r["error"].as_str()),
        (Some("error"), Some("session_mismatch"))
    );
    let r = command(&mut alice, &format!("register-session:{s2}")).await;
    assert_eq!(r["error"], "session_mismatch");
    let r = command(
        &mut alice,
        &format!(r#"publish-json:{{"topic":"T","payload":"x","session_id":"{s2}"}}"#),
    )
    .await;
    assert_eq!(r["error"], "session_mismatch");
    // An anonymous client is bound by its first session.
    let r = command(&mut other, &format!("subscribe:U|{s1}")).await;
    assert_eq!(r["error"], "session_mismatch");

    // Same topic, other session: nothing crosses.
    send_text(
        &mut other,
        r#"publish-json:{"topic":"T","payload":"for s2"}"#,
    )
    .await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&next_text(&mut other).await).expect("json")["payload"],
        "for s2"
    );
    assert_silent(&mut alice, Duration::from_millis(300)).await;
    // Alice's connection still works after every refusal.
    send_text(
        &mut alice,
        r#"publish-json:{"topic":"T","payload":"for s1"}"#,
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut alice).await).expect("json");
    assert_eq!(
        (got["payload"].as_str(), got["publisher_name"].as_str()),
        (Some("for s1"), Some("alice"))
    );
    assert_silent(&mut other, Duration::from_millis(300)).await;
}

/// `subscribe:{topic}` and `unsubscribe:{topic}` name the connection's
/// own session: the token's, or the one an anonymous client registered.
#[tokio::test]
async fn a_topic_without_a_session_is_in_the_connections_own() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        anonymous(c);
    })
    .await;
    let s1 = unique("s");
    let (_, t1) = token(&server, "alice", "wonderland", Some(&s1)).await;
    let t1 = t1["token"].as_str().expect("token").to_owned();
    let mut alice = ws(&server, Some(&t1)).await.expect("valid token");
    let r = command(&mut alice, "subscribe:NetworkConnectedEvent").await;
    assert_eq!(
        (
            r["type"].as_str(),
            r["topic"].as_str(),
            r["session_id"].as_str()
        ),
        (
            Some("subscribed"),
            Some("NetworkConnectedEvent"),
            Some(s1.as_str())
        ),
        "{r}"
    );
    // A client that names the session gets the same messages (a token
    // holder: anonymous clients' sessions are apart from token holders').
    let (_, t2) = token(&server, "bob", "builder", Some(&s1)).await;
    let t2 = t2["token"].as_str().expect("token").to_owned();
    let mut bob = ws(&server, Some(&t2)).await.expect("valid token");
    let r = command(&mut bob, &format!("subscribe:NetworkConnectedEvent|{s1}")).await;
    assert_eq!(r["type"], "subscribed");
    send_text(
        &mut bob,
        r#"publish-json:{"topic":"NetworkConnectedEvent","payload":"up"}"#,
    )
    .await;
    for client in [&mut alice, &mut bob] {
        let got: serde_json::Value = serde_json::from_str(&next_text(client).await).expect("json");
        assert_eq!(
            (got["payload"].as_str(), got["session_id"].as_str()),
            (Some("up"), Some(s1.as_str()))
        );
    }
    let r = command(&mut alice, "unsubscribe:NetworkConnectedEvent").await;
    assert_eq!(
        (r["type"].as_str(), r["session_id"].as_str()),
        (Some("unsubscribed"), Some(s1.as_str()))
    );
    send_text(
        &mut bob,
        r#"publish-json:{"topic":"NetworkConnectedEvent","payload":"again"}"#,
    )
    .await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&next_text(&mut bob).await).expect("json")["payload"],
        "again"
    );
    assert_silent(&mut alice, Duration::from_millis(300)).await;

    // Anonymous and not yet bound: there is no session to default to.
    let mut carol = ws(&server, None).await.expect("anonymous");
    let r = command(&mut carol, "subscribe:T").await;
    assert_eq!(
        (r["error"].as_str(), r["command"].as_str()),
        (Some("not_registered"), Some("subscribe")),
        "{r}"
    );
    let r = command(&mut carol, &format!("register-session:{s1}")).await;
    assert_eq!(r["type"], "registered");
    assert_eq!(
        command(&mut carol, "subscribe:T").await["session_id"],
        s1.as_str()
    );
}

#[tokio::test]
async fn malformed_commands_get_errors_and_the_connection_stays_open() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        anonymous(c);
        c.pubsub.max_subscriptions = 2;
        c.pubsub.max_payload_bytes = 100;
    })
    .await;
    let session = unique("s");
    let mut sub = redis.subscribe(&format!("pubsub:{session}:T")).await;
    let mut c = ws(&server, None).await.expect("anonymous");
    for (line, code) in [
        ("hello", "unknown_command"),
        ("frobnicate:x", "unknown_command"),
        ("subscribe:T", "not_registered"),
        (&format!("subscribe:|{session}") as &str, "invalid_topic"),
        (&format!("subscribe:a*b|{session}"), "invalid_topic"),
        ("subscribe:T|bad:session", "invalid_session"),
        ("publish-json:{not json", "invalid_json"),
        (r#"publish-json:{"payload":"no topic"}"#, "invalid_json"),
        (
            r#"publish-json:{"topic":"T","payload":"no session yet"}"#,
            "not_registered",
        ),
        ("register-name:", "invalid_command"),
    ] {
        let r = command(&mut c, line).await;
        assert_eq!(
            (r["type"].as_str(), r["error"].as_str()),
            (Some("error"), Some(code)),
            "{line}: {r}"
        );
        assert!(r["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = "x".repeat(200);
    let r = command(
        &mut c,
        &format!(r#"publish-json:{{"topic":"T","payload":"{big}","session_id":"{session}"}}"#),
    )
    .await;
    assert_eq!(r["error"], "payload_too_large");
    assert_eq!(
        command(&mut c, &format!("subscribe:A|{session}")).await["type"],
        "subscribed"
    );
    assert_eq!(
        command(&mut c, &format!("subscribe:B|{session}")).await["type"],
        "subscribed"
    );
    assert_eq!(
        command(&mut c, &format!("subscribe:C|{session}")).await["error"],
        "too_many_subscriptions"
    );
    c.send(Message::binary(vec![1u8])).await.expect("binary");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&next_text(&mut c).await).expect("json")["error"],
        "invalid_command"
    );
    // Nothing above reached Redis; a valid publish does, and the socket still works.
    send_text(&mut c, r#"publish-json:{"topic":"T","payload":"ok"}"#).await;
    let mut stream = sub.on_message();
    let first: serde_json::Value =
        serde_json::from_str(&next_published(&mut stream).await).expect("json");
    assert_eq!(first["payload"], "ok");
    assert!(
        server
            .metric("wsproxy_pubsub_refused_total{reason=\"unknown_command\"}")
            .await
            >= 2.0
    );
}

#[tokio::test]
async fn token_endpoint_issues_and_refuses() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), with_auth).await;
    let (status, body) = token(&server, "alice", "wonderland", Some("session-x")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["expires_in"], 600);
    assert_eq!(body["session_id"], "session-x");
    let claims =
        wsproxy::auth::jwt::verify(&jwt(), body["token"].as_str().expect("token")).expect("valid");
    assert_eq!(
        (claims.sub.as_str(), claims.sid.as_str()),
        ("alice", "session-x")
    );
    assert_eq!(
        (claims.iss.as_str(), claims.aud.as_str()),
        ("wsproxy", "wsproxy")
    );
    // Default session follows the seed's convention.
    let (_, body) = token(&server, "bob", "builder", None).await;
    assert_eq!(body["session_id"], "session-bob");

    let (status, body) = token(&server, "alice", "nope", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credentials"))
    );
    let (status, body) = token(&server, "nobody", "nope", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credentials"))
    );
    for bad in [
        "",
        "{",
        r#"{"username":"alice"}"#,
        r#"{"username":1,"password":"x"}"#,
    ] {
        let (status, body) = http_post_json(server.addr, "/auth/token", bad)
            .await
            .expect("POST");
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body.contains("invalid_request"), "{body}");
    }
    let (status, body) = token(&server, "alice", "wonderland", Some("bad:session")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request"))
    );

    // Without JWT_SECRET/USERS_FILE the endpoint says so.
    let bare = Server::start(&redis.url()).await;
    let (status, body) = token(&bare, "alice", "wonderland", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("auth_not_configured"))
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("JWT_SECRET and USERS_FILE are not set"),
        "{message}"
    );
    // ... and so does /ws, rather than pointing at that endpoint.
    let (status, body) = ws(&bare, None).await.expect_err("no token");
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("missing_token"))
    );
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("JWT_SECRET") && !message.contains("get one from POST /auth/token"),
        "{message}"
    );
    // With a secret but no users file, only USERS_FILE is missing.
    let half = Server::start_with(&redis.url(), |c| c.jwt = Some(jwt())).await;
    let (status, body) = token(&half, "alice", "wonderland", None).await;
    assert_eq!(status, 503);
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("USERS_FILE is not set"), "{message}");
}

fn forged(claims: serde_json::Value, alg: jsonwebtoken::Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(alg),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("encode")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn bad_tokens_are_refused_before_the_upgrade() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), with_auth).await;
    let err = ws(&server, None)
        .await
        .expect_err("anonymous is off by default");
    assert_eq!(
        (err.0, err.1["error"].as_str()),
        (401, Some("missing_token"))
    );

    let claims = |exp: u64, iss: &str, aud: &str| serde_json::json!({"sub": "mallory", "sid": "s", "exp": exp, "iat": now(), "iss": iss, "aud": aud});
    let hs = jsonwebtoken::Algorithm::HS256;
    let good = forged(
        claims(now() + 600, "wsproxy", "wsproxy"),
        hs,
        SECRET.as_bytes(),
    );
    assert!(
        ws(&server, Some(&good)).await.is_ok(),
        "a correct token is accepted"
    );
    let header = |alg: &str| {
        use std::fmt::Write as _;
        let raw = format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#);
        // base64url without padding
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for chunk in raw.as_bytes().chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..=chunk.len() {
                let _ = out.write_char(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        out
    };
    let body = good.split('.').nth(1).expect("payload part").to_owned();
    let alg_none = format!("{}.{}.", header("none"), body);
    let cases = [
        (
            "expired",
            forged(
                claims(now() - 120, "wsproxy", "wsproxy"),
                hs,
                SECRET.as_bytes(),
            ),
        ),
        (
            "wrong secret",
            forged(
                claims(now() + 600, "wsproxy", "wsproxy"),
                hs,
                b"another-secret-another-secret-xxxx",
            ),
        ),
        (
            "wrong issuer",
            forged(
                claims(now() + 600, "evil", "wsproxy"),
                hs,
                SECRET.as_bytes(),
            ),
        ),
        (
            "wrong audience",
            forged(
                claims(now() + 600, "wsproxy", "other"),
                hs,
                SECRET.as_bytes(),
            ),
        ),
        (
            "HS512",
            forged(
                claims(now() + 600, "wsproxy", "wsproxy"),
                jsonwebtoken::Algorithm::HS512,
                SECRET.as_bytes(),
            ),
        ),
        ("alg none", alg_none),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (what, t) in cases {
        let err = ws(&server, Some(&t)).await.expect_err(what);
        assert_eq!(
            (err.0, err.1["error"].as_str()),
            (403, Some("invalid_token")),
            "{what}"
        );
    }
    // Browsers: the token as a query parameter.
    let url = format!("ws://{}/ws?access_token={good}", server.addr);
    assert!(
        connect_request(url.into_client_request().expect("req"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_connection_is_closed_when_its_token_expires() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        if let Some(j) = c.jwt.as_mut() {
            j.ttl = Duration::from_secs(2);
        }
    })
    .await;
    let (_, body) = token(&server, "alice", "wonderland", None).await;
    let mut c = ws(&server, body["token"].as_str())
        .await
        .expect("fresh token");
    assert_eq!(close_code(&mut c).await, 1008);
    // Counted once the close handshake is over.
    server
        .wait_metric("wsproxy_disconnects_total{reason=\"token_expired\"}", 1.0)
        .await;
}

#[tokio::test]
async fn clients_on_two_instances_see_each_other() {
    let redis = Redis::start().await;
    let one = Server::start_with(&redis.url(), anonymous).await;
    let two = Server::start_with(&redis.url(), anonymous).await;
    let session = unique("s");
    let mut a = ws(&one, None).await.expect("a");
    let mut b = ws(&two, None).await.expect("b");
    assert_eq!(
        command(&mut a, &format!("subscribe:News|{session}")).await["type"],
        "subscribed"
    );
    assert_eq!(
        command(&mut b, &format!("subscribe:News|{session}")).await["type"],
        "subscribed"
    );
    for i in 0..20 {
        send_text(
            &mut a,
            &format!(r#"publish-json:{{"topic":"News","payload":{i}}}"#),
        )
        .await;
    }
    for i in 0..20 {
        for c in [&mut a, &mut b] {
            let got: serde_json::Value = serde_json::from_str(&next_text(c).await).expect("json");
            assert_eq!(got["payload"], i);
        }
    }
}

// --- issue 11: hardening ---

/// A JWT with a hand-written header (any JSON), signed with `secret`.
fn with_header(header: &str, claims: serde_json::Value, secret: &[u8]) -> String {
    use base64::Engine;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let signing = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = jsonwebtoken::crypto::sign(
        signing.as_bytes(),
        &jsonwebtoken::EncodingKey::from_secret(secret),
        jsonwebtoken::Algorithm::HS256,
    )
    .expect("sign");
    format!("{signing}.{sig}")
}

/// Defects 7 and 8: `nbf` in the future and critical header extensions are
/// refused; an `exp` of 2^64-1 is a valid, long-lived token, not a panic.
#[tokio::test]
async fn nbf_crit_and_a_huge_exp_on_ws() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), with_auth).await;
    let claims = |nbf: u64, exp: u64| serde_json::json!({"sub": "alice", "sid": "s1", "exp": exp, "nbf": nbf, "iat": now(), "iss": "wsproxy", "aud": "wsproxy"});
    let hs = r#"{"alg":"HS256","typ":"JWT"}"#;
    let good = with_header(hs, claims(now() - 5, now() + 600), SECRET.as_bytes());
    assert!(
        ws(&server, Some(&good)).await.is_ok(),
        "the signer is right"
    );
    let early = with_header(hs, claims(now() + 3600, now() + 7200), SECRET.as_bytes());
    let crit = with_header(
        r#"{"alg":"HS256","typ":"JWT","crit":["exp-ext"],"exp-ext":true}"#,
        claims(now() - 5, now() + 600),
        SECRET.as_bytes(),
    );
    for (what, t) in [("nbf", early), ("crit", crit)] {
        let err = ws(&server, Some(&t)).await.expect_err(what);
        assert_eq!(
            (err.0, err.1["error"].as_str()),
            (403, Some("invalid_token")),
            "{what}"
        );
    }
    let forever = forged(
        serde_json::json!({"sub": "alice", "sid": "s1", "exp": u64::MAX, "iat": now(), "iss": "wsproxy", "aud": "wsproxy"}),
        jsonwebtoken::Algorithm::HS256,
        SECRET.as_bytes(),
    );
    let mut c = ws(&server, Some(&forever)).await.expect("accepted");
    assert_eq!(
        command(&mut c, "register-session:s1").await["type"],
        "registered"
    );
}

/// Defect 4: the token endpoint bounds the time and size of its body, and
/// answers a server that issues no tokens before reading it.
#[tokio::test]
async fn token_request_bodies_are_bounded_in_time_and_size() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        c.auth_timeout = Duration::from_secs(1);
    })
    .await;
    let bare = Server::start(&redis.url()).await;
    let head = |extra: &str| {
        format!(
            "POST /auth/token HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n{extra}\r\n"
        )
    };
    // Each case: the server, what is sent (and then nothing more), the status.
    for (srv, request, want) in [
        (&server, head("Content-Length: 100\r\n") + "{", 408),
        (
            &server,
            head("Content-Length: 99999999999999\r\n") + "{",
            413,
        ),
        (
            &server,
            head("Transfer-Encoding: chunked\r\n") + "FFFFFFFFFFFFFFFF\r\n{",
            408,
        ),
        (
            &server,
            head("Transfer-Encoding: chunked\r\n") + "10\r\n{",
            408,
        ),
        (&bare, head("Content-Length: 100\r\n") + "{", 503),
    ] {
        let started = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(srv.addr)
            .await
            .expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        // The answer comes, and the connection ends, well within the wait.
        tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut raw))
            .await
            .unwrap_or_else(|_| panic!("still open after 4 s: {request:?}"))
            .expect("read");
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with(&format!("HTTP/1.1 {want}")),
            "{request:?}: {text}"
        );
        assert!(text.contains("\"error\""), "a JSON body: {text}");
        assert!(started.elapsed() < Duration::from_secs(3), "{request:?}");
    }
}

/// "Also noticed": 405s on /ws and /auth/token have a JSON body and Allow.
#[tokio::test]
async fn wrong_methods_get_a_json_405() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), with_auth).await;
    for (request, allow) in [
        (
            "POST /ws HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "GET",
        ),
        (
            "GET /auth/token HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "POST",
        ),
        (
            "DELETE /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            "GET",
        ),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        s.read_to_string(&mut raw).await.expect("read");
        assert!(raw.starts_with("HTTP/1.1 405"), "{raw}");
        assert!(
            raw.to_ascii_lowercase()
                .contains(&format!("allow: {}", allow.to_ascii_lowercase())),
            "{raw}"
        );
        assert!(raw.contains("\"error\":\"method_not_allowed\""), "{raw}");
    }
}

/// Defects 11 and 12 on `/ws`.
#[tokio::test]
async fn ws_refuses_bad_keys_and_foreign_origins() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), anonymous).await;
    let upgrade = |key: &str, extra: &str| {
        format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n{extra}\r\n"
        )
    };
    let (status, body) = http_request(server.addr, &upgrade("!!", ""))
        .await
        .expect("answer");
    assert_eq!(status, 400, "{body}");
    let good = "dGhlIHNhbXBsZSBub25jZQ==";
    let (status, body) = http_request(
        server.addr,
        &upgrade(good, "Origin: https://evil.example\r\n"),
    )
    .await
    .expect("answer");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin_not_allowed"), "{body}");
    assert_eq!(
        http_status(server.addr, &upgrade(good, "Origin: http://x\r\n")).await,
        101,
        "the server's own origin"
    );
}

/// Defect 5: control characters a client chose (a username, a JWT header)
/// are escaped in text logs, so they cannot forge a line or move a
/// terminal's cursor.
#[tokio::test]
async fn client_chosen_values_cannot_forge_log_lines() {
    // This test's runtime has one thread: the server's tasks log through it.
    let (logs, _guard) = LogCapture::start();
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), with_auth).await;
    let forged_line = "\nINFO wsproxy: forged line\x1b[2J";
    let (status, _) = token(&server, &format!("mallory{forged_line}"), "x", Some("s1")).await;
    assert_eq!(status, 401);
    let bad = with_header(
        &format!(
            r#"{{"alg":"HS256{}","typ":"JWT"}}"#,
            forged_line.replace('\n', "\\n").replace('\x1b', "\\u001b")
        ),
        serde_json::json!({"sub": "m", "sid": "s", "exp": now() + 60, "iss": "wsproxy", "aud": "wsproxy"}),
        SECRET.as_bytes(),
    );
    assert_eq!(ws(&server, Some(&bad)).await.expect_err("refused").0, 403);
    let logged = logs.text();
    assert!(logged.contains("wrong credentials"), "{logged}");
    assert!(logged.contains("refused /ws: invalid token"), "{logged}");
    for line in logged.lines() {
        assert!(
            !line.starts_with("INFO wsproxy: forged"),
            "forged: {logged}"
        );
    }
    assert!(
        !logged.contains('\x1b'),
        "an escape sequence passed: {logged}"
    );
}

/// `publisher_name` is what a publisher calls itself; `publisher_sub` is
/// its verified token's subject, set by wsproxy alone: a token holder
/// that names itself "alice" (or writes a `publisher_sub` of its own) is
/// still seen as bob. Anonymous connections' messages carry none.
#[tokio::test]
async fn publisher_sub_is_the_token_subject_whatever_the_publisher_says() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        anonymous(c);
    })
    .await;
    let session = unique("sess");
    let (_, alice) = token(&server, "alice", "wonderland", Some(&session)).await;
    let (_, bob) = token(&server, "bob", "builder", Some(&session)).await;
    let mut a = ws(&server, alice["token"].as_str()).await.expect("alice");
    let mut b = ws(&server, bob["token"].as_str()).await.expect("bob");
    let r = command(&mut a, &format!("subscribe:T|{session}")).await;
    assert_eq!(r["type"], "subscribed", "{r}");

    let r = command(&mut b, "register-name:alice").await;
    assert_eq!(r["type"], "registered", "{r}");
    send_text(
        &mut b,
        r#"publish-json:{"topic":"T","payload":1,"publisher_sub":"alice"}"#,
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut a).await).expect("json");
    assert_eq!(
        (
            got["publisher_name"].as_str(),
            got["publisher_sub"].as_str()
        ),
        (Some("alice"), Some("bob")),
        "{got}"
    );
    send_text(
        &mut b,
        r#"publish-json:{"topic":"T","payload":2,"publisher_name":"carol"}"#,
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut a).await).expect("json");
    assert_eq!(
        (
            got["publisher_name"].as_str(),
            got["publisher_sub"].as_str()
        ),
        (Some("carol"), Some("bob")),
        "{got}"
    );

    // An anonymous publisher: no publisher_sub, whatever it writes.
    let other = unique("anon");
    let mut c = ws(&server, None).await.expect("anonymous allowed");
    let mut d = ws(&server, None).await.expect("anonymous allowed");
    let r = command(&mut c, &format!("subscribe:T|{other}")).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    send_text(
        &mut d,
        &format!(r#"publish-json:{{"topic":"T","payload":3,"session_id":"{other}","publisher_sub":"alice"}}"#),
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut c).await).expect("json");
    assert_eq!(got["payload"], 3, "{got}");
    assert!(got.get("publisher_sub").is_none(), "{got}");
}

/// `CORS_ALLOWED_ORIGINS` takes what `WS_ALLOWED_ORIGINS` takes: a
/// `scheme://*.domain` entry answers the preflight of a subdomain's page
/// (it used to be accepted at start-up and then match nothing).
#[tokio::test]
async fn token_cors_takes_subdomain_wildcards_like_websocket_origins() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        c.cors_origins =
            wsproxy::origin::AllowedOrigins::parse(["https://*.app.example", "https://b.example/"])
                .expect("valid origins");
    })
    .await;
    let preflight = |origin: &str| {
        format!(
            "OPTIONS /auth/token HTTP/1.1\r\nHost: t\r\nOrigin: {origin}\r\n\
             Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\
             Connection: close\r\n\r\n"
        )
    };
    for (origin, allowed) in [
        ("https://eu.app.example", true),
        ("https://b.example", true),
        ("https://app.example", false),
        ("http://eu.app.example", false),
        ("https://evil.example", false),
    ] {
        let mut s = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        s.write_all(preflight(origin).as_bytes())
            .await
            .expect("write");
        let mut raw = Vec::new();
        within(WAIT, "the preflight's answer", s.read_to_end(&mut raw))
            .await
            .expect("read");
        let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
        assert_eq!(
            head.contains(&format!("access-control-allow-origin: {origin}")),
            allowed,
            "{origin}: {head}"
        );
    }
}

/// A user whose USERS_FILE line lists sessions gets tokens for those only:
/// `403 session_forbidden` for any other (alice could sign herself into
/// bob's session before), also for the default `session-{user}` when the
/// list leaves it out; a user without a list still gets any session.
#[tokio::test]
async fn session_lists_limit_the_tokens_a_user_gets() {
    let redis = Redis::start().await;
    let users = users_file_of(&[
        ("alice", "wonderland", Some("session-alice,team-7-*")),
        ("bob", "builder", None),
        ("carol", "chess", Some("team-7-*")),
    ]);
    let server = Server::start_with(&redis.url(), |c| {
        c.jwt = Some(jwt());
        c.users_file = Some(users);
    })
    .await;

    for asked in ["session-bob", "team-8-x", "session-alice2", "team-7"] {
        let (status, body) = token(&server, "alice", "wonderland", Some(asked)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("session_forbidden")),
            "{asked}: {body}"
        );
        assert!(body["token"].is_null(), "{body}");
        assert!(
            body["message"].as_str().is_some_and(|m| m.contains(asked)),
            "{body}"
        );
    }
    // The password is checked first: a wrong one is a 401 whatever the
    // session, so the lists say nothing to who does not know it.
    let (status, body) = token(&server, "alice", "nope", Some("session-bob")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_credentials"))
    );

    // Her own sessions: the default one, and the pattern's.
    let (status, body) = token(&server, "alice", "wonderland", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["session_id"], "session-alice");
    let t = body["token"].as_str().expect("token").to_owned();
    let claims = wsproxy::auth::jwt::verify(&jwt(), &t).expect("valid");
    assert_eq!(
        (claims.sub.as_str(), claims.sid.as_str()),
        ("alice", "session-alice")
    );
    let mut alice = ws(&server, Some(&t)).await.expect("her token is good");
    assert_eq!(
        command(&mut alice, "subscribe:T").await["session_id"],
        "session-alice"
    );
    let (status, body) = token(&server, "alice", "wonderland", Some("team-7-room.1")).await;
    assert_eq!(
        (status, body["session_id"].as_str()),
        (200, Some("team-7-room.1")),
        "{body}"
    );

    // A list without the default session: no session_id, no token.
    let (status, body) = token(&server, "carol", "chess", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("session_forbidden")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("session-carol")),
        "{body}"
    );
    let (status, _) = token(&server, "carol", "chess", Some("team-7-a")).await;
    assert_eq!(status, 200);

    // No list: any session, as before.
    for asked in [Some("session-alice"), Some("anything.else"), None] {
        let (status, body) = token(&server, "bob", "builder", asked).await;
        assert_eq!(status, 200, "{asked:?}: {body}");
        assert_eq!(
            body["session_id"].as_str(),
            Some(asked.unwrap_or("session-bob"))
        );
    }
}

/// With PUBSUB_ALLOW_ANONYMOUS=true and JWT_SECRET set, an anonymous client
/// that names a token holder's session is in a session of that name among
/// anonymous clients only: it neither reads the token holder's messages
/// nor reaches the token holder with its own, while two anonymous clients
/// still reach each other.
#[tokio::test]
async fn anonymous_clients_never_share_a_token_holders_session() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), |c| {
        with_auth(c);
        anonymous(c);
    })
    .await;
    let session = unique("session-bob");
    let (status, body) = token(&server, "bob", "builder", Some(&session)).await;
    assert_eq!(status, 200, "{body}");
    let t = body["token"].as_str().expect("token").to_owned();
    let mut bob = ws(&server, Some(&t)).await.expect("bob's token");
    let mut eve = ws(&server, None).await.expect("anonymous");
    let mut mallory = ws(&server, None).await.expect("anonymous");
    for (who, c) in [
        ("bob", &mut bob),
        ("eve", &mut eve),
        ("mallory", &mut mallory),
    ] {
        let r = command(c, &format!("subscribe:T|{session}")).await;
        assert_eq!(r["type"], "subscribed", "{who}: {r}");
    }
    // What Redis sees: bob's channel and the anonymous clients' own.
    let mut tokens_channel = redis.subscribe(&format!("pubsub:{session}:T")).await;
    let mut anonymous_channel = redis.subscribe(&format!("pubsub:anon:{session}:T")).await;

    send_text(
        &mut bob,
        &format!(
            r#"publish-json:{{"topic":"T","payload":"for bob's eyes","session_id":"{session}"}}"#
        ),
    )
    .await;
    let got: serde_json::Value = serde_json::from_str(&next_text(&mut bob).await).expect("json");
    assert_eq!(got["payload"], "for bob's eyes");
    assert!(
        next_published(&mut tokens_channel.on_message())
            .await
            .contains("for bob's eyes")
    );
    assert_silent(&mut eve, Duration::from_millis(300)).await;
    assert_silent(&mut mallory, Duration::from_millis(100)).await;

    send_text(
        &mut eve,
        &format!(r#"publish-json:{{"topic":"T","payload":"from eve","session_id":"{session}"}}"#),
    )
    .await;
    // The other anonymous client gets it (and eve her own) ...
    for c in [&mut mallory, &mut eve] {
        let got: serde_json::Value = serde_json::from_str(&next_text(c).await).expect("json");
        assert_eq!(
            (got["payload"].as_str(), got["session_id"].as_str()),
            (Some("from eve"), Some(session.as_str()))
        );
        assert!(got.get("publisher_sub").is_none(), "{got}");
    }
    assert!(
        next_published(&mut anonymous_channel.on_message())
            .await
            .contains("from eve")
    );
    // ... bob does not.
    assert_silent(&mut bob, Duration::from_millis(300)).await;
    let mut tokens_messages = tokens_channel.on_message();
    assert!(
        tokio::time::timeout(
            Duration::from_millis(100),
            futures_util::StreamExt::next(&mut tokens_messages)
        )
        .await
        .is_err(),
        "an anonymous message reached the token holders' channel"
    );
}
