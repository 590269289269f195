//! The users file behind `POST /auth/token`: one `username:<argon2 PHC
//! hash>` per line, `#` starts a comment. Passwords are never stored in
//! plain text; `wsproxy hash-password` produces the hashes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, LazyLock};

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use tokio::sync::Semaphore;

/// Argon2 verifications allowed at once: each costs tens of milliseconds
/// and ~19 MiB, so a flood of logins must queue instead of exhausting the
/// machine.
const CONCURRENT_VERIFICATIONS: usize = 4;

/// A users file that could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// The file could not be read.
    #[error("USERS_FILE: cannot read {path}: {source}")]
    Read {
        /// The configured path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `username:<argon2 hash>`.
    #[error("USERS_FILE: {path} line {line}: {problem}")]
    Line {
        /// The configured path.
        path: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong (never the hash itself).
        problem: String,
    },
}

/// Loaded users, ready to check passwords.
#[derive(Debug)]
pub struct Users {
    hashes: HashMap<String, String>,
    permits: Arc<Semaphore>,
}

impl Users {
    /// Reads and checks every line of `path`.
    pub fn load(path: &Path) -> Result<Self, UsersError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| UsersError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text, &shown)
    }

    /// Parses the file's text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &str) -> Result<Self, UsersError> {
        let mut hashes = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: &str| UsersError::Line {
                path: path.to_owned(),
                line: i + 1,
                problem: problem.to_owned(),
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| bad("expected username:<argon2 hash>"))?;
            let user = user.trim();
            if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
                return Err(bad("the username must be 1-128 printable characters"));
            }
            PasswordHash::new(hash.trim())
                .ok()
                .filter(verifiable)
                .ok_or_else(|| bad("not an argon2 hash (make one with `wsproxy hash-password`)"))?;
            if hashes
                .insert(user.to_owned(), hash.trim().to_owned())
                .is_some()
            {
                return Err(bad(&format!("user {user:?} appears twice")));
            }
        }
        Ok(Self {
            hashes,
            permits: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
        })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True when the file lists nobody.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The hash a user's password is checked against. Public for the fuzz
    /// target.
    #[doc(hidden)]
    pub fn hash(&self, username: &str) -> Option<&str> {
        self.hashes.get(username).map(String::as_str)
    }

    /// Checks a password, off the async threads. Unknown users cost the
    /// same work as known ones, so timing does not reveal who exists.
    pub async fn verify(&self, username: &str, password: &str) -> bool {
        // A hash with default parameters to spend the same effort on
        // unknown users; made once per process.
        static DUMMY: LazyLock<String> =
            LazyLock::new(|| hash_password("not a password").unwrap_or_default());
        let (hash, known) = match self.hashes.get(username) {
            Some(h) => (h.clone(), true),
            None => (DUMMY.clone(), false),
        };
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return false;
        };
        let password = password.to_owned();
        let ok = tokio::task::spawn_blocking(move || {
            PasswordHash::new(&hash)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false)
        })
        .await
        .unwrap_or(false);
        ok && known
    }
}

/// Whether argon2 can check a password against `hash`: an argon2
/// algorithm and version, parameters it takes, a salt and an output.
/// (`PasswordHash::new` takes any PHC string: a user with another would
/// never log in.)
fn verifiable(hash: &PasswordHash) -> bool {
    hash.salt.is_some()
        && hash.hash.is_some()
        && argon2::Algorithm::try_from(hash.algorithm.as_str()).is_ok()
        && hash
            .version
            .is_none_or(|v| argon2::Version::try_from(v).is_ok())
        && argon2::Params::try_from(hash).is_ok()
}

/// Hashes `password` with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_wrong_passwords_do_not() {
        let hash = hash_password("s3cret").expect("hash");
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        let users = Users::parse(&format!("# users\nalice:{hash}\n\n"), "t").expect("parse");
        assert_eq!(users.len(), 1);
        assert!(users.verify("alice", "s3cret").await);
        assert!(!users.verify("alice", "wrong").await);
        assert!(!users.verify("bob", "s3cret").await);
    }

    #[test]
    fn bad_lines_name_the_line() {
        let hash = hash_password("x").expect("hash");
        let e =
            Users::parse(&format!("ok:{hash}\nnocolon\n"), "users.txt").expect_err("line 2 is bad");
        let text = e.to_string();
        assert!(text.starts_with("USERS_FILE: users.txt line 2"), "{text}");
        let e = Users::parse("alice:plaintext\n", "u").expect_err("not a hash");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    /// Found by the users_file fuzz target: PHC strings argon2 cannot
    /// check a password against were accepted, locking their user out.
    #[test]
    fn hashes_argon2_cannot_verify_are_refused() {
        let salt_and_output = "rxVRGoBrvL4b+1V5sMqq8Q$F4dDGebuGctBGYowVRg+WASlNqb12crouZmJhwhJr+4";
        let good = format!("$argon2id$v=19$m=19456,t=2,p=1${salt_and_output}");
        assert!(Users::parse(&format!("alice:{good}\n"), "u").is_ok());
        for hash in [
            // No output, no salt.
            "$argon2id$v=19$m=19456,t=2,p=1$rxVRGoBrvL4b+1V5sMqq8Q".to_owned(),
            "$argon2id$v=19$m=19456,t=2,p=1".to_owned(),
            // Another algorithm.
            format!("$scrypt$ln=16,r=8,p=1${salt_and_output}"),
            // Parameters argon2 refuses (t=0), an unknown version.
            format!("$argon2id$v=19$m=19456,t=0,p=1${salt_and_output}"),
            format!("$argon2id$v=18$m=19456,t=2,p=1${salt_and_output}"),
        ] {
            let e = Users::parse(&format!("alice:{hash}\n"), "u").expect_err(&hash);
            let text = e.to_string();
            assert!(text.starts_with("USERS_FILE: u line 1: "), "{text}");
            assert!(!text.contains(salt_and_output), "{text}");
        }
    }
}
