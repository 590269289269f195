//! `auth::users::Users::parse`: the users file (`USERS_FILE`), any text.
//!
//! Checked against an independent reading of the documented format (one
//! `username:<argon2 PHC hash>` a line, `#` comments, blank lines): a file
//! is accepted only when every line is one, each user once; then every
//! user is there with its hash, and each hash is one argon2 can check a
//! password against (an argon2 algorithm and version, its parameters, a
//! salt and an output), so that no listed user is locked out for good. A
//! refusal names a bad line and never shows a hash.

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
            Some((user, hash)) => entries.push((i + 1, user.trim(), hash.trim())),
            None => bad_lines.push(i + 1),
        }
    }
    match Users::parse(text, "users.txt") {
        Ok(users) => {
            assert!(bad_lines.is_empty(), "{bad_lines:?} accepted");
            assert_eq!(users.len(), entries.len(), "a user twice?");
            for (line, user, hash) in entries {
                assert!(!user.is_empty() && user.len() <= 128, "line {line}");
                assert!(!user.chars().any(char::is_control), "line {line}");
                assert_eq!(users.hash(user), Some(hash), "line {line}");
                assert!(verifiable(hash), "line {line}: {hash:?} can never verify");
            }
        }
        Err(e) => {
            let text = e.to_string();
            let line: usize = text
                .strip_prefix("USERS_FILE: users.txt line ")
                .and_then(|t| t.split(':').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("no line named: {text}"));
            let good = |(l, user, hash): &(usize, &str, &str)| {
                *l < line
                    && !user.is_empty()
                    && user.len() <= 128
                    && !user.chars().any(char::is_control)
                    && verifiable(hash)
            };
            // Every line before the one named is fine.
            assert!(bad_lines.iter().all(|&l| l >= line), "{text}");
            assert!(entries.iter().filter(|e| e.0 < line).all(good), "{text}");
            for (l, user, hash) in &entries {
                // (Every PHC string starts with `$`, which no problem
                // described has.)
                if *l == line && hash.starts_with('$') && !user.contains(hash) {
                    assert!(!text.contains(hash), "the hash is shown: {text}");
                }
            }
        }
    }
});
