//! `config::Cli` from any flags and values, then `into_config`: never a
//! panic (errors are what bad values get).
//!
//! Input: up to 8 settings, each a byte choosing the flag (by position
//! among the command's long flags) and how it is written (`--flag value` or
//! `--flag=value`), then its value up to a NUL byte (UTF-8, lossy).

#![no_main]

use std::sync::LazyLock;

use clap::{CommandFactory, Parser};
use libfuzzer_sys::fuzz_target;
use wsproxy::config::Cli;

static FLAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let mut flags: Vec<String> = Cli::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_owned))
        .collect();
    flags.sort();
    assert!(flags.len() > 20, "{flags:?}");
    flags
});

fuzz_target!(|data: &[u8]| {
    let mut args = vec!["wsproxy".to_owned()];
    let mut rest = data;
    for _ in 0..8 {
        let Some((&pick, tail)) = rest.split_first() else {
            break;
        };
        let (value, tail) = match tail.iter().position(|&b| b == 0) {
            Some(i) => (&tail[..i], &tail[i + 1..]),
            None => (tail, &[][..]),
        };
        rest = tail;
        let value = String::from_utf8_lossy(value).into_owned();
        match usize::from(pick >> 1) {
            // Past the flags: a subcommand, or a bare word.
            n if n >= FLAGS.len() => {
                if pick & 1 == 0 {
                    args.push("hash-password".to_owned());
                }
                args.push(value);
            }
            n if pick & 1 == 0 => {
                args.push(format!("--{}", FLAGS[n]));
                args.push(value);
            }
            n => args.push(format!("--{}={value}", FLAGS[n])),
        }
    }
    let Ok(cli) = Cli::try_parse_from(&args) else {
        return;
    };
    let Ok(config) = cli.into_config() else {
        return;
    };
    // What start-up relies on.
    assert!((64..=64 << 20).contains(&config.max_message_bytes));
    assert!(config.outbound_queue >= 1 && config.max_connections >= 1);
    assert!(config.workers >= 1);
    assert!(!config.auth_timeout.is_zero() && !config.ping_interval.is_zero());
    if let Some(jwt) = &config.jwt {
        assert!(jwt.secret.len() >= 32);
        assert!(!jwt.issuer.is_empty() && !jwt.audience.is_empty());
    }
    if let Some(token) = &config.metrics_token {
        assert!(token.expose().len() >= 16);
    }
});
