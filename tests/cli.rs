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
        "RUST_LOG",
        "METRICS_TOKEN",
        "WS_ALLOWED_ORIGINS",
        "RELIABLE_SESSIONS",
        "HISTORY_MAX_LEN",
        "HISTORY_TTL_SECS",
        "UP_STREAM_SHARDS",
        "UP_STREAM_MAX_LEN",
        "UP_DEDUPE_SECS",
        "REDIS_CA_FILE",
        "REDIS_CLIENT_CERT_FILE",
        "REDIS_CLIENT_KEY_FILE",
    ] {
        cmd.env_remove(var);
    }
    // A start-up that fails after binding (a bad routes or users file is
    // read then) must not take the default port: tests run at once, and a
    // second one found 0.0.0.0:8080 taken and failed for that instead.
    cmd.env("HOST", "127.0.0.1").env("PORT", "0");
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
        "WS_CLIENT_MESSAGE_RATE",
        "WS_CLIENT_MESSAGE_BURST",
        "MAX_CONNECTIONS",
        "WORKERS",
        "LOG_FORMAT",
        "RUST_LOG",
        "RELIABLE_SESSIONS",
        "HISTORY_MAX_LEN",
        "HISTORY_TTL_SECS",
        "UP_STREAM_SHARDS",
        "UP_STREAM_MAX_LEN",
        "UP_DEDUPE_SECS",
        "REDIS_CA_FILE",
        "REDIS_CLIENT_CERT_FILE",
        "REDIS_CLIENT_KEY_FILE",
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

/// A start-up error as a newcomer must see it: exit code 2, one line on
/// stderr, nothing on stdout. Returns the line.
fn startup_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        out.stdout.is_empty(),
        "said again on stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    err
}

#[test]
fn bad_port_stops_startup_naming_variable_and_value() {
    let err = refused("PORT", "abc");
    assert!(err.contains("PORT") && err.contains("abc"), "{err}");
}

#[cfg(unix)]
#[test]
fn a_setting_that_is_not_utf8_is_one_line_naming_it() {
    use std::os::unix::ffi::OsStringExt;
    let value = std::ffi::OsString::from_vec(b"redis://h\xffost".to_vec());
    let out = wsproxy()
        .env("REDIS_URL", value)
        .output()
        .expect("run wsproxy");
    let err = startup_error(&out);
    assert_eq!(
        err.trim_end(),
        "wsproxy: invalid configuration: REDIS_URL: the value is not valid UTF-8"
    );
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
    let err = refused("HISTORY_MAX_LEN", "0");
    assert!(err.contains("HISTORY_MAX_LEN"), "{err}");
    let err = refused("WS_CLIENT_MESSAGE_BURST", "0");
    assert!(err.contains("WS_CLIENT_MESSAGE_BURST"), "{err}");
    let err = refused("WS_CLIENT_MESSAGE_RATE", "-1");
    assert!(err.contains("WS_CLIENT_MESSAGE_RATE"), "{err}");
    let err = refused("RELIABLE_SESSIONS", "maybe");
    assert!(
        err.contains("RELIABLE_SESSIONS") && err.contains("maybe"),
        "{err}"
    );
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
        let err = startup_error(&out);
        assert!(
            err.contains("ROUTES_FILE") && err.contains(expected),
            "{err}"
        );
    }
    let _ = std::fs::remove_file(&path);
}

#[test]
fn help_describes_all_three_jobs() {
    let out = wsproxy()
        .arg("--help")
        .output()
        .expect("run wsproxy --help");
    let help = String::from_utf8_lossy(&out.stdout);
    for job in ["session bridge", "topic pub/sub", "reverse proxy"] {
        assert!(help.contains(job), "{job} missing:\n{help}");
    }
}

#[test]
fn a_taken_port_is_one_line_and_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let out = wsproxy()
        .env("HOST", "127.0.0.1")
        .env("PORT", port.to_string())
        .output()
        .expect("run wsproxy");
    let err = startup_error(&out);
    assert!(
        err.contains("HOST/PORT") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn an_unreadable_users_file_names_its_os_error_once() {
    let path = std::env::temp_dir().join(format!("wsproxy-cli-{}-none.users", std::process::id()));
    let out = wsproxy()
        .env("USERS_FILE", &path)
        .env("JWT_SECRET", "a-cli-test-secret-of-at-least-32-bytes")
        .output()
        .expect("run wsproxy");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(err.contains("USERS_FILE"), "{err}");
    let os_error = std::fs::read(&path).expect_err("no such file").to_string();
    assert_eq!(err.matches(&os_error).count(), 1, "{err}");
}

/// Runs `cmd` to its end; a wsproxy that starts instead of refusing its
/// settings is killed after 10 s and fails the test (rather than hanging
/// it).
fn exits_within(cmd: &mut Command) -> std::process::Output {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run wsproxy");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(out) => out.expect("wait for wsproxy"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("wsproxy started instead of refusing its settings");
        }
    }
}

/// TLS to Redis: the files go with a rediss:// URL only, the client
/// certificate with its key; `#insecure` is refused; a file that is missing,
/// not PEM, or a key that does not match its certificate names its
/// variable; the same for a cluster's `rediss://` seeds, which must not mix
/// schemes. One line, exit 2, and never the URL's password.
#[test]
fn bad_redis_tls_settings_stop_startup_naming_the_variable() {
    let dir = std::env::temp_dir().join(format!("wsproxy-cli-{}-redis-tls", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    };
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
    let ca = file("ca.pem", &cert.cert.pem());
    let client_cert = file("client.pem", &cert.cert.pem());
    let client_key = file("client.key", &cert.signing_key.serialize_pem());
    let other_key = file("other.key", &other.signing_key.serialize_pem());
    let not_pem = file("not.pem", "hello\n");
    let missing = dir.join("missing.pem").display().to_string();
    let tls = "rediss://:hunter2@127.0.0.1:1";
    let plain = "redis://:hunter2@127.0.0.1:1";
    // Files are read once the settings are parsed, after the port is
    // bound: a free one, on loopback.
    let check = |env: &[(&str, &str)], var: &str, expected: &str| {
        let out = exits_within(
            wsproxy()
                .env("HOST", "127.0.0.1")
                .env("PORT", "0")
                .envs(env.iter().copied()),
        );
        let err = startup_error(&out);
        assert!(
            err.starts_with(&format!("wsproxy: invalid configuration: {var}: ")),
            "{env:?}: {err}"
        );
        assert!(err.contains(expected), "{env:?}: {err}");
        assert!(!err.contains("hunter2"), "the password was shown: {err}");
    };
    check(
        &[("REDIS_URL", plain), ("REDIS_CA_FILE", &ca)],
        "REDIS_CA_FILE",
        "rediss://",
    );
    check(
        &[
            ("REDIS_URL", plain),
            ("REDIS_CLIENT_CERT_FILE", &client_cert),
            ("REDIS_CLIENT_KEY_FILE", &client_key),
        ],
        "REDIS_CLIENT_CERT_FILE",
        "rediss://",
    );
    check(
        &[("REDIS_URL", tls), ("REDIS_CLIENT_CERT_FILE", &client_cert)],
        "REDIS_CLIENT_KEY_FILE",
        "is required",
    );
    check(
        &[("REDIS_URL", tls), ("REDIS_CLIENT_KEY_FILE", &client_key)],
        "REDIS_CLIENT_CERT_FILE",
        "is required",
    );
    check(
        &[("REDIS_URL", "rediss://:hunter2@127.0.0.1:1/#insecure")],
        "REDIS_URL",
        "#insecure",
    );
    check(
        &[("REDIS_URL", tls), ("REDIS_CA_FILE", &missing)],
        "REDIS_CA_FILE",
        "cannot read",
    );
    check(
        &[("REDIS_URL", tls), ("REDIS_CA_FILE", &not_pem)],
        "REDIS_CA_FILE",
        "holds no valid PEM certificate",
    );
    check(
        &[
            ("REDIS_URL", tls),
            ("REDIS_CLIENT_CERT_FILE", &not_pem),
            ("REDIS_CLIENT_KEY_FILE", &client_key),
        ],
        "REDIS_CLIENT_CERT_FILE",
        "holds no valid PEM certificate",
    );
    check(
        &[
            ("REDIS_URL", tls),
            ("REDIS_CLIENT_CERT_FILE", &client_cert),
            ("REDIS_CLIENT_KEY_FILE", &ca),
        ],
        "REDIS_CLIENT_KEY_FILE",
        "holds no valid PEM private key",
    );
    check(
        &[
            ("REDIS_URL", tls),
            ("REDIS_CLIENT_CERT_FILE", &client_cert),
            ("REDIS_CLIENT_KEY_FILE", &other_key),
        ],
        "REDIS_CLIENT_KEY_FILE",
        "cannot be used with REDIS_CLIENT_CERT_FILE",
    );
    // On a cluster: the same rules for rediss:// seeds, which all use one
    // scheme, and the files are read at start-up there too.
    let tls_seeds = "rediss://:hunter2@127.0.0.1:1,rediss://:hunter2@127.0.0.1:2";
    check(
        &[(
            "REDIS_CLUSTER_NODES",
            "rediss://:hunter2@127.0.0.1:1,redis://:hunter2@127.0.0.1:2",
        )],
        "REDIS_CLUSTER_NODES",
        "mixes redis:// and rediss://",
    );
    check(
        &[(
            "REDIS_CLUSTER_NODES",
            "rediss://:hunter2@127.0.0.1:1/#insecure",
        )],
        "REDIS_CLUSTER_NODES",
        "#insecure",
    );
    check(
        &[
            ("REDIS_CLUSTER_NODES", "redis://:hunter2@127.0.0.1:1"),
            ("REDIS_CA_FILE", &ca),
        ],
        "REDIS_CA_FILE",
        "REDIS_CLUSTER_NODES does not use TLS",
    );
    check(
        &[
            ("REDIS_CLUSTER_NODES", tls_seeds),
            ("REDIS_CA_FILE", &missing),
        ],
        "REDIS_CA_FILE",
        "cannot read",
    );
    check(
        &[
            ("REDIS_CLUSTER_NODES", tls_seeds),
            ("REDIS_CLIENT_CERT_FILE", &client_cert),
            ("REDIS_CLIENT_KEY_FILE", &other_key),
        ],
        "REDIS_CLIENT_KEY_FILE",
        "cannot be used with REDIS_CLIENT_CERT_FILE",
    );
    // The same files, right, start it (Redis is not there: it retries).
    let mut server = Running::start(
        wsproxy()
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("REDIS_URL", tls)
            .env("REDIS_CA_FILE", &ca)
            .env("REDIS_CLIENT_CERT_FILE", &client_cert)
            .env("REDIS_CLIENT_KEY_FILE", &client_key)
            .env("RUST_LOG", "info"),
    );
    server.wait_for("wsproxy listening");
    server.signal("TERM");
    server.wait_for("shutdown complete");
    let log = server.seen.join("\n");
    assert!(!log.contains("hunter2"), "the password was logged:\n{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Reads a running wsproxy's log (stdout) line by line.
struct Running {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn start(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start wsproxy");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now on) that contains `needle`.
    fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => panic!("no line with {needle:?} in:\n{}", self.seen.join("\n")),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a newcomer's first start shows: the address it listens on as an
/// address, the Redis it cannot reach (never its password), warnings for
/// a setting that does nothing here and USERS_FILE without JWT_SECRET, a log line for a SIGHUP with no routes
/// file, and no colour codes when the log is not a terminal.
#[test]
fn a_first_start_explains_itself_in_its_log() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // Nothing listens there.
    let dead_redis = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let users = std::env::temp_dir().join(format!("wsproxy-cli-{}.users", std::process::id()));
    std::fs::write(&users, "# nobody yet\n").expect("write users file");
    let mut server = Running::start(
        wsproxy()
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env(
                "REDIS_URL",
                format!("redis://:hunter2@127.0.0.1:{dead_redis}"),
            )
            .env("USERS_FILE", &users)
            .env("HISTORY_MAX_LEN", "50")
            .env("RUST_LOG", "info"),
    );
    let ignored =
        server.wait_for("HISTORY_MAX_LEN is set but has no effect without RELIABLE_SESSIONS=true");
    assert!(ignored.contains("WARN"), "{ignored}");
    let warning = server.wait_for("USERS_FILE is set but JWT_SECRET is not");
    assert!(warning.contains("WARN"), "{warning}");
    let listening = server.wait_for("wsproxy listening");
    assert!(
        listening.contains(&format!("addr=127.0.0.1:{port}")),
        "{listening}"
    );
    let redis = server.wait_for("redis pub/sub connect failed");
    assert!(
        redis.contains(&format!("redis=127.0.0.1:{dead_redis}")),
        "{redis}"
    );
    server.signal("HUP");
    let hup = server.wait_for("SIGHUP");
    assert!(hup.contains("no ROUTES_FILE"), "{hup}");
    server.signal("TERM");
    server.wait_for("shutdown complete");
    let log = server.seen.join("\n");
    assert!(!log.contains("hunter2"), "the password was logged:\n{log}");
    assert!(!log.contains('\x1b'), "colour codes in a piped log:\n{log}");
    assert!(!log.contains("Some("), "{log}");
    let _ = std::fs::remove_file(&users);
}

/// A `.env` file with a line dotenvy cannot read stops start-up with one
/// line: dotenvy stops at that line, so every setting after it (here a
/// METRICS_TOKEN) would otherwise be left out without a word, and
/// `/metrics` served open.
#[test]
fn a_dotenv_file_that_cannot_be_read_whole_stops_startup() {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("dotenv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join(".env"),
        "CORS_ALLOWED_ORIGINS=https://a.example, https://b.example\nMETRICS_TOKEN=abcdefghijklmnopqrstuvwxyz\n",
    )
    .expect("write .env");
    let out = exits_within(
        wsproxy()
            .current_dir(&dir)
            .env_remove("CORS_ALLOWED_ORIGINS")
            .env("HOST", "127.0.0.1")
            .env("PORT", "0"),
    );
    let err = startup_error(&out);
    assert!(
        err.contains(".env") && err.contains("https://a.example, https://b.example"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A hash argon2 can check (of "x"), for USERS_FILE lines written here.
const HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$rxVRGoBrvL4b+1V5sMqq8Q$F4dDGebuGctBGYowVRg+WASlNqb12crouZmJhwhJr+4";

/// A bad session pattern in USERS_FILE stops start-up with one line naming
/// the file and the line, like any other bad line.
#[test]
fn a_bad_session_pattern_stops_startup_naming_the_line() {
    let path =
        std::env::temp_dir().join(format!("wsproxy-cli-{}-pattern.users", std::process::id()));
    std::fs::write(
        &path,
        format!("# users\nbob:{HASH}:session-bob\nalice:{HASH}:session-alice,team-*-*\n"),
    )
    .expect("write users file");
    let out = exits_within(
        wsproxy()
            .env("USERS_FILE", &path)
            .env("JWT_SECRET", "a-cli-test-secret-of-at-least-32-bytes"),
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "one line expected: {err}"
    );
    assert!(
        err.contains(&format!("USERS_FILE: {} line 3", path.display())),
        "{err}"
    );
    assert!(
        err.contains("session list entry 2: has more than one '*'"),
        "{err}"
    );
    assert!(!err.contains(HASH), "{err}");
    let _ = std::fs::remove_file(&path);
}

/// Users without a session list may get a token for any session: start-up
/// says so in one WARN line naming them (and not those with a list).
#[test]
fn users_without_a_session_list_are_named_in_one_warning() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let dead_redis = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let users = std::env::temp_dir().join(format!("wsproxy-cli-{}-open.users", std::process::id()));
    std::fs::write(
        &users,
        format!("alice:{HASH}:session-alice\nbob:{HASH}\ncarol:{HASH}:*\n"),
    )
    .expect("write users file");
    let mut server = Running::start(
        wsproxy()
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string())
            .env("REDIS_URL", format!("redis://127.0.0.1:{dead_redis}"))
            .env("USERS_FILE", &users)
            .env("JWT_SECRET", "a-cli-test-secret-of-at-least-32-bytes")
            .env("RUST_LOG", "info"),
    );
    let warning = server.wait_for("without a session list");
    assert!(warning.contains("WARN"), "{warning}");
    assert!(warning.contains("any session"), "{warning}");
    assert!(warning.contains("\"bob\""), "{warning}");
    assert!(
        !warning.contains("\"alice\"") && !warning.contains("\"carol\""),
        "{warning}"
    );
    server.wait_for("wsproxy listening");
    let log = server.seen.join("\n");
    assert_eq!(log.matches("without a session list").count(), 1, "{log}");
    server.signal("TERM");
    server.wait_for("shutdown complete");
    let _ = std::fs::remove_file(&users);
}

/// `wsproxy hash-password --user alice --sessions ...` prints the whole
/// USERS_FILE line, checked as start-up checks it; without --user the hash
/// alone (for scripts) and the line's form on stderr.
#[test]
fn hash_password_prints_the_users_file_line() {
    let run = |args: &[&str]| {
        use std::io::Write;
        let mut child = wsproxy()
            .arg("hash-password")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run wsproxy");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"wonderland\n")
            .expect("write password");
        child.wait_with_output().expect("wait")
    };
    let out = run(&["--user", "alice", "--sessions", "session-alice,team-7-*"]);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    let fields: Vec<&str> = line.split(':').collect();
    assert_eq!(fields.len(), 3, "{line}");
    assert_eq!(fields[0], "alice");
    assert!(fields[1].starts_with("$argon2id$"), "{line}");
    assert_eq!(fields[2], "session-alice,team-7-*");

    let out = run(&["--user", "bob"]);
    assert!(out.status.success(), "{out:?}");
    let line = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    assert!(line.starts_with("bob:$argon2id$"), "{line}");
    assert_eq!(line.matches(':').count(), 1, "{line}");

    let out = run(&[]);
    assert!(out.status.success(), "{out:?}");
    let hash = String::from_utf8_lossy(&out.stdout).trim_end().to_owned();
    assert!(
        hash.starts_with("$argon2id$") && !hash.contains(':'),
        "{hash}"
    );
    let hint = String::from_utf8_lossy(&out.stderr);
    assert!(hint.contains("username:<hash>[:<sessions>]"), "{hint}");

    let out = run(&["--user", "alice", "--sessions", "a**"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("more than one '*'"), "{err}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let out = run(&["--user", "#alice"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}
