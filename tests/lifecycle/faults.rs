//! A step of a removal or a reap that fails (a key of the wrong type):
//! the connection stays where a retry or a reaper finds it, and gets its
//! presence entry removed and its one disconnect event once the step
//! works again.

use super::*;

/// Turns `key` into a string: a command on a hash then fails (WRONGTYPE).
async fn break_hash(redis: &Redis, key: &str) {
    let mut c = redis.conn().await;
    let _: () = c.del(key).await.expect("DEL");
    let _: () = c.set(key, "not a hash").await.expect("SET");
}

/// Makes `key` a hash holding `entries` again.
async fn mend_hash(redis: &Redis, key: &str, entries: &[(String, String)]) {
    let mut c = redis.conn().await;
    let _: () = c.del(key).await.expect("DEL");
    for (field, value) in entries {
        let _: () = c.hset(key, field, value).await.expect("HSET");
    }
}

/// Before: the reap script deleted a connection from the dead process's
/// hash before its presence entry; when that failed the script stopped
/// there, with the connection gone from the hash (Redis keeps what a
/// failed script wrote): no event, and its presence entry for ever.
#[tokio::test]
async fn a_reap_whose_presence_entry_fails_keeps_the_connection_for_the_next_beat() {
    let redis = Redis::start().await;
    let mut c = redis.conn().await;
    let dead = "deadbeef0004";
    let sessions: Vec<String> = (0..10).map(|i| unique(&format!("reap{i}"))).collect();
    for (i, session) in sessions.iter().enumerate() {
        let registration = serde_json::json!({
            "session_id": session, "agent_id": "a", "since": 1_000_000u64,
            "presence": format!("session:{session}:presence"), "events": true,
        });
        let id = format!("{dead}:{i}");
        let _: () = c
            .hset(
                format!("wsproxy:process:{dead}:connections"),
                &id,
                registration.to_string(),
            )
            .await
            .expect("registration");
        let _: () = c
            .hset(format!("session:{session}:presence"), &id, "{}")
            .await
            .expect("presence");
    }
    let broken = 3;
    let broken_key = format!("session:{}:presence", sessions[broken]);
    break_hash(&redis, &broken_key).await;
    let _: () = c
        .zadd("wsproxy:processes", dead, 1_000_000u64)
        .await
        .expect("ZADD");
    let survivor = Server::start_with(&redis.url(), tracked).await;
    let lost = wait_events(&redis, 9, |e| e["reason"] == "process_lost").await;
    assert_eq!(lost.len(), 9);
    for (i, session) in sessions.iter().enumerate() {
        if i != broken {
            wait_presence(&redis, session, 0).await;
        }
    }
    // Beats go by: the tenth is tried again each time, and kept.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broken_id = format!("{dead}:{broken}");
    let lost = wait_events(&redis, 9, |e| e["reason"] == "process_lost").await;
    assert_eq!(lost.len(), 9);
    assert!(
        lost.iter()
            .all(|e| e["connection_id"] != broken_id.as_str())
    );
    let kept: bool = c
        .hexists(format!("wsproxy:process:{dead}:connections"), &broken_id)
        .await
        .expect("HEXISTS");
    assert!(kept, "the failed connection is still where reapers look");
    assert!(survivor.metric("wsproxy_lifecycle_failures_total").await >= 1.0);
    // Fixed: the tenth is reaped, once.
    mend_hash(&redis, &broken_key, &[(broken_id.clone(), "{}".to_owned())]).await;
    wait_presence(&redis, &sessions[broken], 0).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let processes: Vec<String> = c.zrange("wsproxy:processes", 0, -1).await.expect("ZRANGE");
        if !processes.iter().any(|p| p == dead) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead process never forgotten"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut reaped: Vec<String> = events(&redis)
        .await
        .into_iter()
        .filter(|e| e["reason"] == "process_lost")
        .map(|e| e["connection_id"].as_str().unwrap_or_default().to_owned())
        .collect();
    reaped.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("{dead}:{i}")).collect();
    expected.sort();
    assert_eq!(reaped, expected, "one process_lost event per connection");
    survivor.stop().await;
}

/// Before: the disconnect script deleted the registration before the
/// presence entry; when that failed, Redis kept the deletion, and every
/// retry found the registration gone: no disconnect event, ever.
#[tokio::test]
async fn a_disconnect_whose_presence_entry_fails_is_recorded_once_it_is_fixed() {
    let redis = Redis::start().await;
    let server = Server::start_with(&redis.url(), tracked).await;
    let session = unique("fix");
    redis.set_token(&session, TOKEN, 60).await;
    let mut ws = server.connect(&session, TOKEN).await;
    wait_presence(&redis, &session, 1).await;
    let key = format!("session:{session}:presence");
    let mut c = redis.conn().await;
    let entries: Vec<(String, String)> = c.hgetall(&key).await.expect("HGETALL");
    break_hash(&redis, &key).await;
    ws.close(None).await.expect("close");
    drop(ws);
    server
        .wait_metric("wsproxy_lifecycle_failures_total", 1.0)
        .await;
    // Fixed while the removal is still retried.
    mend_hash(&redis, &key, &entries).await;
    wait_presence(&redis, &session, 0).await;
    let gone = wait_events(&redis, 1, |e| e["type"] == "disconnect").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        events(&redis)
            .await
            .iter()
            .filter(|e| e["type"] == "disconnect")
            .count(),
        1
    );
    assert_eq!(gone[0]["reason"], "client");
    server.stop().await;
}
