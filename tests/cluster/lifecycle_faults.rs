//! Lifecycle on a cluster when a step of a removal or a reap fails (a key
//! of the wrong type, as a command fails on a shard that is failing over):
//! the connection stays where its process's heartbeat or a reaper finds
//! it, and gets its presence entry removed and its one disconnect event
//! once the step works again.

use super::*;

/// `HLEN` of `key` on the cluster.
async fn cluster_hlen(cluster: &Cluster, key: &str) -> usize {
    let mut c = cluster.conn().await;
    redis::cmd("HLEN")
        .arg(key)
        .query_async(&mut c)
        .await
        .expect("HLEN")
}

/// The disconnect events of connection `id` so far.
async fn disconnects_of(cluster: &Cluster, id: &str) -> Vec<serde_json::Value> {
    cluster_events(cluster)
        .await
        .into_iter()
        .filter(|e| e["type"] == "disconnect" && e["connection_id"] == id)
        .collect()
}

/// Turns `key` into a string: a command on a hash then fails (WRONGTYPE),
/// as one fails on a shard that is failing over.
async fn break_hash(cluster: &Cluster, key: &str) {
    let mut c = cluster.conn().await;
    redis::cmd("DEL")
        .arg(key)
        .query_async::<()>(&mut c)
        .await
        .expect("DEL");
    redis::cmd("SET")
        .arg(key)
        .arg("not a hash")
        .query_async::<()>(&mut c)
        .await
        .expect("SET");
}

/// Makes `key` a hash holding `entries` again.
async fn mend_hash(cluster: &Cluster, key: &str, entries: &[(String, String)]) {
    let mut c = cluster.conn().await;
    redis::cmd("DEL")
        .arg(key)
        .query_async::<()>(&mut c)
        .await
        .expect("DEL");
    for (field, value) in entries {
        redis::cmd("HSET")
            .arg(key)
            .arg(field)
            .arg(value)
            .query_async::<()>(&mut c)
            .await
            .expect("HSET");
    }
}

/// Before: the reaper took a batch out of the dead process's hash, then
/// returned at the first presence entry or event that failed: the rest of
/// the batch was gone from the hash, their presence entries stayed for
/// ever and they never got their disconnect event.
#[tokio::test]
async fn lifecycle_on_a_cluster_a_reap_step_that_fails_is_retried_not_dropped() {
    let cluster = Cluster::start().await;
    let mut config = config(&cluster, ClusterPubSub::Sharded);
    config.lifecycle.events = true;
    config.lifecycle.presence = true;
    config.lifecycle.heartbeat = Duration::from_secs(1);
    config.lifecycle.dead_after = Some(Duration::from_secs(2));
    let mut c = cluster.conn().await;
    // A process that died holding ten connections, one per session (so
    // on every master); the presence hash of one is broken.
    let dead = "deadbeef0003";
    let sessions: Vec<String> = (0..10).map(|i| unique(&format!("reap{i}"))).collect();
    let presence = |s: &str| format!("session:{{{s}}}:presence");
    for (i, session) in sessions.iter().enumerate() {
        let registration = serde_json::json!({
            "session_id": session, "agent_id": "a", "since": 1_000_000u64,
            "presence": presence(session), "events": true,
        });
        redis::cmd("HSET")
            .arg(format!("wsproxy:process:{{{dead}}}:connections"))
            .arg(format!("{dead}:{i}"))
            .arg(registration.to_string())
            .query_async::<()>(&mut c)
            .await
            .expect("registration");
        redis::cmd("HSET")
            .arg(presence(session))
            .arg(format!("{dead}:{i}"))
            .arg("{}")
            .query_async::<()>(&mut c)
            .await
            .expect("presence");
    }
    let broken = 3;
    break_hash(&cluster, &presence(&sessions[broken])).await;
    redis::cmd("ZADD")
        .arg("wsproxy:processes")
        .arg(1_000_000u64)
        .arg(dead)
        .query_async::<()>(&mut c)
        .await
        .expect("ZADD");
    let server = Server::start_config(config).await;
    let lost = async || {
        cluster_events(&cluster)
            .await
            .into_iter()
            .filter(|e| e["reason"] == "process_lost")
            .map(|e| e["connection_id"].as_str().unwrap_or_default().to_owned())
            .collect::<Vec<_>>()
    };
    cluster_wait("the nine others reaped", async || {
        let mut left = 0;
        for (i, session) in sessions.iter().enumerate() {
            if i != broken {
                left += cluster_hlen(&cluster, &presence(session)).await;
            }
        }
        left == 0 && lost().await.len() == 9
    })
    .await;
    // Beats go by: the tenth is tried again each time, and kept.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let broken_id = format!("{dead}:{broken}");
    let reaped = lost().await;
    assert_eq!(reaped.len(), 9, "{reaped:?}");
    assert!(!reaped.contains(&broken_id), "{reaped:?}");
    let kept: bool = redis::cmd("HEXISTS")
        .arg(format!("wsproxy:process:{{{dead}}}:closing"))
        .arg(&broken_id)
        .query_async(&mut c)
        .await
        .expect("HEXISTS");
    assert!(kept, "the failed connection is still where reapers look");
    assert!(server.metric("wsproxy_lifecycle_failures_total").await >= 1.0);
    // Fixed: the tenth is reaped, once.
    mend_hash(
        &cluster,
        &presence(&sessions[broken]),
        &[(broken_id.clone(), "{}".to_owned())],
    )
    .await;
    cluster_wait("the tenth reaped", async || {
        cluster_hlen(&cluster, &presence(&sessions[broken])).await == 0
    })
    .await;
    let mut c2 = c.clone();
    cluster_wait("the dead process forgotten", async || {
        let processes: Vec<String> = redis::cmd("ZRANGE")
            .arg("wsproxy:processes")
            .arg(0)
            .arg(-1)
            .query_async(&mut c2)
            .await
            .expect("ZRANGE");
        !processes.iter().any(|p| p == dead)
    })
    .await;
    let mut reaped = lost().await;
    reaped.sort();
    let mut expected: Vec<String> = (0..10).map(|i| format!("{dead}:{i}")).collect();
    expected.sort();
    assert_eq!(reaped, expected, "one process_lost event per connection");
    assert_eq!(
        server.metric("wsproxy_reaped_connections_total").await,
        10.0
    );
    server.stop().await;
}

/// Before: a removal deleted the connection's registration first; when
/// its presence entry kept failing past the retries, the registration
/// was gone, so nobody removed the presence entry or wrote the event.
#[tokio::test]
async fn lifecycle_on_a_cluster_a_removal_that_gives_up_is_finished_by_the_heartbeat() {
    let cluster = Cluster::start().await;
    let mut config = config(&cluster, ClusterPubSub::Sharded);
    config.lifecycle.events = true;
    config.lifecycle.presence = true;
    config.lifecycle.heartbeat = Duration::from_secs(1);
    config.lifecycle.dead_after = Some(Duration::from_secs(2));
    let server = Server::start_config(config).await;
    let session = unique("rm");
    cluster.set_token(&session, TOKEN, 600).await;
    let presence_key = format!("session:{{{session}}}:presence");
    let mut ws = server.connect(&session, TOKEN).await;
    cluster_wait("registered", async || {
        cluster_hlen(&cluster, &presence_key).await == 1
    })
    .await;
    let mut c = cluster.conn().await;
    let entries: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(&presence_key)
        .query_async(&mut c)
        .await
        .expect("HGETALL");
    let id = entries[0].0.clone();
    break_hash(&cluster, &presence_key).await;
    send_text(&mut ws, r#"{"a":1}"#).await;
    ws.close(None).await.expect("close");
    drop(ws);
    // Five attempts over at least the dead-after time (about 4 s), then
    // the removal gives up.
    server
        .wait_metric("wsproxy_lifecycle_failures_total", 5.0)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(disconnects_of(&cluster, &id).await.is_empty());
    mend_hash(&cluster, &presence_key, &entries).await;
    cluster_wait("the presence entry removed", async || {
        cluster_hlen(&cluster, &presence_key).await == 0
    })
    .await;
    cluster_wait("the disconnect event", async || {
        !disconnects_of(&cluster, &id).await.is_empty()
    })
    .await;
    // Beats go by: still one, the connection's own.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let gone = disconnects_of(&cluster, &id).await;
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert_eq!(
        (gone[0]["reason"].as_str(), gone[0]["messages_in"].as_u64()),
        (Some("client"), Some(1))
    );
    let left = cluster_hlen(
        &cluster,
        &format!("wsproxy:process:{{{}}}:closing", &id[..12]),
    )
    .await;
    assert_eq!(left, 0);
    server.stop().await;
}

/// Before: a batch with a failure ended the beat's reap, and the failed
/// connections, taken again first, came to fill whole batches: with more
/// of them than a batch (500), a dead process's other connections were
/// never reaped. Now they take at most half a batch, and a batch that
/// finished some goes on. At the production heartbeat and dead-after.
#[tokio::test]
async fn lifecycle_on_a_cluster_connections_that_keep_failing_do_not_starve_the_others() {
    let cluster = Cluster::start().await;
    let mut config = config(&cluster, ClusterPubSub::Sharded);
    config.lifecycle.events = true;
    config.lifecycle.presence = true;
    let mut c = cluster.conn().await;
    let dead = "deadbeef0005";
    let connections = format!("wsproxy:process:{{{dead}}}:connections");
    // 1,000 connections whose presence key is not a hash (every beat's
    // removal of their entry fails), beside 50 ordinary ones.
    let broken_presence = format!("session:{{{}}}:presence", unique("broken"));
    redis::cmd("SET")
        .arg(&broken_presence)
        .arg("not a hash")
        .query_async::<()>(&mut c)
        .await
        .expect("SET");
    let mut pipe = redis::pipe();
    for i in 0..1000 {
        let registration = serde_json::json!({
            "session_id": "broken", "agent_id": "a", "since": 1_000_000u64,
            "presence": broken_presence, "events": true,
        });
        pipe.cmd("HSET")
            .arg(&connections)
            .arg(format!("{dead}:b{i}"))
            .arg(registration.to_string())
            .ignore();
    }
    pipe.query_async::<()>(&mut c).await.expect("registrations");
    let healthy: Vec<String> = (0..50).map(|i| format!("{dead}:h{i}")).collect();
    for id in &healthy {
        let registration = serde_json::json!({
            "session_id": unique("ok"), "agent_id": "a", "since": 1_000_000u64,
            "events": true,
        });
        redis::cmd("HSET")
            .arg(&connections)
            .arg(id)
            .arg(registration.to_string())
            .query_async::<()>(&mut c)
            .await
            .expect("registration");
    }
    redis::cmd("ZADD")
        .arg("wsproxy:processes")
        .arg(1_000_000u64)
        .arg(dead)
        .query_async::<()>(&mut c)
        .await
        .expect("ZADD");
    let server = Server::start_config(config).await;
    // Three default heartbeats (5 s) and then some.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(25);
    loop {
        let mut missing = 0;
        for id in &healthy {
            if disconnects_of(&cluster, id).await.is_empty() {
                missing += 1;
            }
        }
        if missing == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{missing} of the 50 ordinary connections still have no disconnect event"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in &healthy {
        assert_eq!(disconnects_of(&cluster, id).await.len(), 1, "{id}");
    }
    server.stop().await;
}
