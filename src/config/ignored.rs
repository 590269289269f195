//! Settings given a value that this configuration never reads: each is
//! named in a start-up warning, so that an operator who sets
//! `HISTORY_MAX_LEN` without `RELIABLE_SESSIONS=true`, say, learns it does
//! nothing rather than believing it in force. (A value that cannot work
//! at all is an error instead, see [`super::ConfigError`].)

use clap::CommandFactory;

use super::Cli;
use super::parse::boolean;

impl Cli {
    /// The first setting in `env` whose value is not UTF-8, with one line
    /// saying so (clap would answer with its usage text, naming none).
    pub fn not_utf8<I>(env: I) -> Option<String>
    where
        I: IntoIterator<Item = (std::ffi::OsString, std::ffi::OsString)>,
    {
        let command = Cli::command();
        let names: Vec<&std::ffi::OsStr> = command
            .get_arguments()
            .filter_map(|a| a.get_env())
            .collect();
        env.into_iter()
            .find(|(name, value)| value.to_str().is_none() && names.contains(&name.as_os_str()))
            .map(|(name, _)| format!("{}: the value is not valid UTF-8", name.to_string_lossy()))
    }

    /// One line for each setting whose value differs from its default but
    /// has no effect here, naming what it needs.
    pub fn ignored(&self) -> Vec<String> {
        let command = Cli::command();
        // Given a value other than its default (or any value, for one with
        // no default).
        let given = |id: &str, value: Option<&str>| {
            let Some(value) = value else {
                return false;
            };
            let default = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_default_values().first())
                .and_then(|d| d.to_str());
            default.is_none_or(|d| d.trim() != value.trim()) && !value.trim().is_empty()
        };
        let on = |value: &str| boolean("", value).unwrap_or(false);
        let mut found = Vec::new();
        let mut check = |active: bool, needs: &str, settings: &[(&str, &str, Option<&str>)]| {
            if active {
                return;
            }
            for (var, id, value) in settings {
                if given(id, *value) {
                    found.push(format!("{var} is set but has no effect without {needs}"));
                }
            }
        };
        check(
            self.jwt_secret.is_some(),
            "JWT_SECRET",
            &[
                ("JWT_ISSUER", "jwt_issuer", Some(&self.jwt_issuer)),
                ("JWT_AUDIENCE", "jwt_audience", Some(&self.jwt_audience)),
                ("JWT_TTL_SECS", "jwt_ttl_secs", Some(&self.jwt_ttl_secs)),
            ],
        );
        check(
            self.routes_file
                .as_deref()
                .is_some_and(|f| !f.trim().is_empty()),
            "ROUTES_FILE",
            &[(
                "UPSTREAM_CA_FILE",
                "upstream_ca_file",
                self.upstream_ca_file.as_deref(),
            )],
        );
        check(
            self.redis_cluster_nodes.is_some(),
            "REDIS_CLUSTER_NODES",
            &[(
                "REDIS_CLUSTER_PUBSUB",
                "redis_cluster_pubsub",
                Some(&self.redis_cluster_pubsub),
            )],
        );
        check(
            on(&self.reliable_sessions),
            "RELIABLE_SESSIONS=true",
            &[
                (
                    "HISTORY_MAX_LEN",
                    "history_max_len",
                    Some(&self.history_max_len),
                ),
                (
                    "HISTORY_TTL_SECS",
                    "history_ttl_secs",
                    Some(&self.history_ttl_secs),
                ),
                (
                    "UP_STREAM_SHARDS",
                    "up_stream_shards",
                    Some(&self.up_stream_shards),
                ),
                (
                    "UP_STREAM_MAX_LEN",
                    "up_stream_max_len",
                    Some(&self.up_stream_max_len),
                ),
                (
                    "UP_DEDUPE_SECS",
                    "up_dedupe_secs",
                    Some(&self.up_dedupe_secs),
                ),
            ],
        );
        check(
            on(&self.lifecycle_events),
            "LIFECYCLE_EVENTS=true",
            &[
                (
                    "EVENTS_MAX_LEN",
                    "events_max_len",
                    Some(&self.events_max_len),
                ),
                (
                    "EVENTS_SESSION_CHANNEL",
                    "events_session_channel",
                    Some(&self.events_session_channel),
                ),
                (
                    "EVENTS_QUERY_PARAMS",
                    "events_query_params",
                    Some(&self.events_query_params),
                ),
            ],
        );
        check(
            on(&self.lifecycle_events) || on(&self.presence),
            "LIFECYCLE_EVENTS=true or PRESENCE=true",
            &[
                (
                    "PROCESS_HEARTBEAT_SECS",
                    "process_heartbeat_secs",
                    Some(&self.process_heartbeat_secs),
                ),
                (
                    "PROCESS_DEAD_AFTER_SECS",
                    "process_dead_after_secs",
                    Some(&self.process_dead_after_secs),
                ),
            ],
        );
        found
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Cli;

    #[cfg(unix)]
    #[test]
    fn a_setting_that_is_not_utf8_is_named() {
        use std::os::unix::ffi::OsStringExt;
        let bad = std::ffi::OsString::from_vec(vec![b'a', 0xff]);
        let env = |name: &str, value: std::ffi::OsString| (std::ffi::OsString::from(name), value);
        assert_eq!(
            Cli::not_utf8([
                env("PATH", bad.clone()),
                env("JWT_SECRET", "fine".into()),
                env("REDIS_URL", bad),
            ]),
            Some("REDIS_URL: the value is not valid UTF-8".to_string())
        );
        assert_eq!(Cli::not_utf8([env("REDIS_URL", "redis://x".into())]), None);
    }

    fn ignored(args: &[&str]) -> Vec<String> {
        let mut all = vec!["wsproxy"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("valid arguments").ignored()
    }

    #[test]
    fn defaults_and_settings_in_force_are_not_named() {
        assert!(ignored(&[]).is_empty());
        assert!(
            ignored(&[
                "--reliable-sessions",
                "true",
                "--history-max-len",
                "50",
                "--jwt-secret",
                &"k".repeat(32),
                "--jwt-ttl-secs",
                "120",
                "--presence",
                "true",
                "--process-heartbeat-secs",
                "2",
            ])
            .is_empty()
        );
        // A default written out is no mistake.
        assert!(ignored(&["--history-max-len", "1000"]).is_empty());
    }

    #[test]
    fn a_setting_that_does_nothing_here_is_named_with_what_it_needs() {
        assert_eq!(
            ignored(&["--history-max-len", "50", "--jwt-ttl-secs", "120"]),
            vec![
                "JWT_TTL_SECS is set but has no effect without JWT_SECRET",
                "HISTORY_MAX_LEN is set but has no effect without RELIABLE_SESSIONS=true",
            ]
        );
        assert_eq!(
            ignored(&[
                "--upstream-ca-file",
                "/etc/ca.pem",
                "--redis-cluster-pubsub",
                "classic"
            ]),
            vec![
                "UPSTREAM_CA_FILE is set but has no effect without ROUTES_FILE",
                "REDIS_CLUSTER_PUBSUB is set but has no effect without REDIS_CLUSTER_NODES",
            ]
        );
        assert_eq!(
            ignored(&["--presence", "true", "--events-max-len", "10"]),
            vec!["EVENTS_MAX_LEN is set but has no effect without LIFECYCLE_EVENTS=true"]
        );
    }
}
