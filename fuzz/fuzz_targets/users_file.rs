//! `auth::users::Users::parse`: the users file (`USERS_FILE`), any text.
//!
//! Checked against an independent reading of the documented format (one
//! `username:<argon2 PHC hash>[:<sessions>]` a line, `#` comments, blank
//! lines; `<sessions>` a comma-separated list of session names with at
//! most one `*` each): a file is accepted only when every line is one,
//! each user once; then every user is there with its hash, each hash is
//! one argon2 can check a password against (an argon2 algorithm and
//! version, its parameters, a salt and an output), so that no listed user
//! is locked out for good, and each user may join the sessions its list
//! names (any, without a list). A refusal names a bad line and never shows
//! a hash.

#![no_main]

use argon2::password_hash::phc::PasswordHash;
use libfuzzer_sys::fuzz_target;
use wsproxy::auth::users::Users;

/// Whether argon2 can verify a password against `hash` (the steps its
/// `verify_password` takes before hashing).
fn verifiable(hash: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    parsed.salt.is_some()
        && parsed.hash.is_some()
        && parsed.algorithm.as_str().parse::<argon2::Algorithm>().is_ok()
        && parsed.version.is_none_or(|v| argon2::Version::try_from(v).is_ok())
        && argon2::Params::try_from(&parsed).is_ok()
}

/// The session list of a line: `None` without one, `Some(Err)` for a bad
/// one, else its entries.
fn sessions(field: Option<&str>) -> Option<Result<Vec<&str>, ()>> {
    let list = field?;
    if list.trim().is_empty() {
        return Some(Err(()));
    }
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    let good = entries.iter().all(|p| {
        !p.is_empty()
            && p.len() <= 128
            && p.matches('*').count() <= 1
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'))
    });
    Some(if good { Ok(entries) } else { Err(()) })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The entries, by line number, as the format describes them.
    let mut entries = Vec::new();
    let mut bad_lines = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once(':') {
            Some((user, rest)) => {
                let (hash, list) = match rest.split_once(':') {
                    Some((hash, list)) => (hash, Some(list)),
                    None => (rest, None),
                };
                entries.push((i + 1, user.trim(), hash.trim(), sessions(list)));
            }
            None => bad_lines.push(i + 1),
        }
    }
    match Users::parse(text, "users.txt") {
        Ok(users) => {
            assert!(bad_lines.is_empty(), "{bad_lines:?} accepted");
            assert_eq!(users.len(), entries.len(), "a user twice?");
            for (line, user, hash, list) in entries {
                assert!(!user.is_empty() && user.len() <= 128, "line {line}");
                assert!(!user.chars().any(char::is_control), "line {line}");
                assert_eq!(users.hash(user), Some(hash), "line {line}");
                assert!(verifiable(hash), "line {line}: {hash:?} can never verify");
                match list {
                    None => assert!(users.may_join(user, "any-session"), "line {line}"),
                    Some(Err(())) => panic!("line {line}: a bad session list accepted"),
                    Some(Ok(patterns)) => {
                        for p in patterns {
                            // A pattern's `*` standing for nothing, and for "x".
                            for s in [p.replace('*', ""), p.replacen('*', "x", 1)] {
                                if !s.is_empty() && s.len() <= 128 {
                                    assert!(users.may_join(user, &s), "line {line}: {s:?}");
                                }
                            }
                        }
                    }
                }
            }
        }
        Err(e) => {
            let text = e.to_string();
            let line: usize = text
                .strip_prefix("USERS_FILE: users.txt line ")
                .and_then(|t| t.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no line named: {text}"));
            let good =
                |(l, user, hash, list): &(usize, &str, &str, Option<Result<Vec<&str>, ()>>)| {
                    *l < line
                        && !user.is_empty()
                        && user.len() <= 128
                        && !user.chars().any(char::is_control)
                        && verifiable(hash)
                        && !matches!(list, Some(Err(())))
                };
            // Every line before the one named is fine.
            assert!(bad_lines.iter().all(|&l| l >= line), "{text}");
            assert!(entries.iter().filter(|e| e.0 < line).all(good), "{text}");
            for (l, user, hash, _) in &entries {
                // (Every PHC string starts with `$`, which no problem
                // described has.)
                if *l == line && hash.starts_with('$') && !user.contains(hash) {
                    assert!(!text.contains(hash), "the hash is shown: {text}");
                }
            }
        }
    }
});
