//! The binary's edge: `--help` documents every variable, and a bad value
//! stops start-up with one line naming it.

use std::process::Command;

fn wsproxy() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsproxy"));
    // Run where no .env file can interfere.
    cmd.current_dir(std::env::temp_dir());
    for var in [
        "HOST",
        "PORT",
        "REDIS_URL",
        "AUTH_TIMEOUT_SECS",
        "AUTH_GRACE_PERIOD_SECS",
        "WS_PING_INTERVAL_SECS",
        "WS_PING_TIMEOUT_SECS",
        "SHUTDOWN_GRACE_PERIOD_SECS",
        "LOG_FORMAT",
        "JWT_SECRET",
        "USERS_FILE",
        "ROUTES_FILE",
        "TLS_CERT_FILE",
        "TLS_KEY_FILE",
        "PUBSUB_ALLOW_ANONYMOUS",
        "WORKERS",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

#[test]
fn help_lists_every_variable() {
    let out = wsproxy()
        .arg("--help")
        .output()
        .expect("run wsproxy --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "HOST",
        "PORT",
        "REDIS_URL",
        "AUTH_TIMEOUT_SECS",
        "AUTH_GRACE_PERIOD_SECS",
        "WS_PING_INTERVAL_SECS",
        "WS_PING_TIMEOUT_SECS",
        "SHUTDOWN_GRACE_PERIOD_SECS",
        "WS_MAX_MESSAGE_BYTES",
        "WS_OUTBOUND_QUEUE",
        "MAX_CONNECTIONS",
        "WORKERS",
        "LOG_FORMAT",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(&format!("env: {var}")) || help.contains(var),
            "{var} missing:\n{help}"
        );
    }
}

fn refused(var: &str, value: &str) -> String {
    let out = wsproxy().env(var, value).output().expect("run wsproxy");
    assert!(!out.status.success(), "{var}={value} must stop start-up");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    err
}

#[test]
fn bad_port_stops_startup_naming_variable_and_value() {
    let err = refused("PORT", "abc");
    assert!(err.contains("PORT") && err.contains("abc"), "{err}");
}

#[test]
fn unparsable_redis_url_stops_startup() {
    let err = refused("REDIS_URL", "not a url");
    assert!(
        err.contains("REDIS_URL") && err.contains("not a url"),
        "{err}"
    );
}

#[test]
fn bad_number_and_bad_log_filter_are_refused() {
    let err = refused("WS_PING_TIMEOUT_SECS", "ten");
    assert!(
        err.contains("WS_PING_TIMEOUT_SECS") && err.contains("ten"),
        "{err}"
    );
    let err = refused("RUST_LOG", "wsproxy=loud");
    assert!(err.contains("RUST_LOG"), "{err}");
}

#[test]
fn a_bad_routes_file_stops_startup_naming_the_router_and_field() {
    let path = std::env::temp_dir().join(format!("wsproxy-cli-{}.routes.json", std::process::id()));
    // `port` is JSON as it is: a number, or a string where a number belongs.
    let route = |name: &str, port: &str| {
        format!(
            r#"{{"protocol":"websocket","backends":[{{"host":"ws://127.0.0.1","port":{port}}}],
            "external_path":"/{name}","internal_path":"/","methods":["GET"]}}"#
        )
    };
    for (port, expected) in [
        (
            "70000",
            "routers[1].backends[0].port: 70000 is outside 1-65535",
        ),
        (
            "\"3000\"",
            "routers[1].backends[0].port: invalid type: string \"3000\"",
        ),
    ] {
        let text = format!(
            r#"{{"version":1,"routers":[{},{}]}}"#,
            route("a", "3000"),
            route("b", port)
        );
        std::fs::write(&path, text).expect("write routes");
        let out = wsproxy()
            .env("ROUTES_FILE", &path)
            .output()
            .expect("run wsproxy");
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "one line expected: {err}"
        );
        assert!(
            err.contains("ROUTES_FILE") && err.contains(expected),
            "{err}"
        );
        assert!(
            out.stdout.is_empty(),
            "said again on stdout: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let _ = std::fs::remove_file(&path);
}
