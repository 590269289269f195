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
