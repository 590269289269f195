//! The users file behind `POST /auth/token`: one `username:<argon2 PHC
//! hash>[:<sessions>]` per line, `#` starts a comment. Passwords are never
//! stored in plain text; `wsproxy hash-password` produces the hashes.
//!
//! `<sessions>`, when present, is a comma-separated list of the sessions
//! the user may get tokens for: names, or patterns with one `*` standing
//! for any characters (`session-alice,team-7-*`; `*` alone: any session).
//! A user without the field may get a token for any session (the old
//! behaviour; start-up warns about such users). The fields are separated
//! by `:`, which neither a username nor a PHC string (`$`, `,`, `=` and
//! base64 without padding) nor a session name contains, so the split is
//! unambiguous.

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

/// A session name, or a pattern with one `*` standing for any (possibly
/// empty) run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPattern {
    /// Before the `*` (all of it for a plain name).
    prefix: String,
    /// After the `*`; `None` for a plain name.
    suffix: Option<String>,
}

impl SessionPattern {
    /// Parses one entry of a user's session list: 1-128 characters of
    /// `A-Z a-z 0-9 - _ .` (the session ids of [`crate::keys::valid_id`])
    /// with at most one `*`.
    ///
    /// The error says what is wrong without repeating the pattern (a line's
    /// fields are never echoed whole: one might hold a hash).
    pub fn parse(pattern: &str) -> Result<Self, String> {
        if pattern.is_empty() || pattern.len() > crate::keys::MAX_ID_LEN {
            return Err(format!(
                "must be 1-{} characters, is {}",
                crate::keys::MAX_ID_LEN,
                pattern.len()
            ));
        }
        let (prefix, suffix) = match pattern.split_once('*') {
            Some((prefix, suffix)) => (prefix, Some(suffix)),
            None => (pattern, None),
        };
        let bad = prefix
            .chars()
            .chain(suffix.unwrap_or_default().chars())
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')));
        match bad {
            Some('*') => Err("has more than one '*'".to_owned()),
            Some(c) => Err(format!(
                "has {c:?}: a session pattern is A-Z, a-z, 0-9, '-', '_', '.' and at most one '*'"
            )),
            None => Ok(Self {
                prefix: prefix.to_owned(),
                suffix: suffix.map(str::to_owned),
            }),
        }
    }

    /// Whether `session` is this name, or fits this pattern.
    pub fn matches(&self, session: &str) -> bool {
        match &self.suffix {
            None => session == self.prefix,
            Some(suffix) => {
                session.len() >= self.prefix.len() + suffix.len()
                    && session.starts_with(&self.prefix)
                    && session.ends_with(suffix.as_str())
            }
        }
    }
}

/// One user of the file.
#[derive(Debug)]
struct User {
    /// The argon2 PHC string.
    hash: String,
    /// The sessions the user may get tokens for; `None`: any.
    sessions: Option<Vec<SessionPattern>>,
}

/// Loaded users, ready to check passwords.
#[derive(Debug)]
pub struct Users {
    users: HashMap<String, User>,
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
        let mut users = HashMap::new();
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
            let (user, rest) = line
                .split_once(':')
                .ok_or_else(|| bad("expected username:<argon2 hash>[:<sessions>]"))?;
            // A PHC string has no ':', so a second one starts the sessions.
            let (hash, sessions) = match rest.split_once(':') {
                Some((hash, sessions)) => (hash, Some(sessions)),
                None => (rest, None),
            };
            let user = user.trim();
            if user.is_empty() || user.len() > 128 || user.chars().any(char::is_control) {
                return Err(bad("the username must be 1-128 printable characters"));
            }
            PasswordHash::new(hash.trim())
                .ok()
                .filter(verifiable)
                .ok_or_else(|| bad("not an argon2 hash (make one with `wsproxy hash-password`)"))?;
            let sessions = match sessions {
                None => None,
                Some(list) if list.trim().is_empty() => {
                    return Err(bad(
                        "the session list after the second ':' is empty (leave the field out, with its ':', to allow any session)",
                    ));
                }
                Some(list) => Some(
                    list.split(',')
                        .enumerate()
                        .map(|(n, p)| {
                            SessionPattern::parse(p.trim()).map_err(|problem| {
                                bad(&format!("session list entry {}: {problem}", n + 1))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
            };
            let entry = User {
                hash: hash.trim().to_owned(),
                sessions,
            };
            if users.insert(user.to_owned(), entry).is_some() {
                return Err(bad(&format!("user {user:?} appears twice")));
            }
        }
        Ok(Self {
            users,
            permits: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
        })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// True when the file lists nobody.
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// The hash a user's password is checked against. Public for the fuzz
    /// target.
    #[doc(hidden)]
    pub fn hash(&self, username: &str) -> Option<&str> {
        self.users.get(username).map(|u| u.hash.as_str())
    }

    /// Whether `username` may get a token for `session`: it is in the
    /// user's session list, or the user has none (any session). An unknown
    /// user may join nothing.
    pub fn may_join(&self, username: &str, session: &str) -> bool {
        match self.users.get(username) {
            Some(User { sessions: None, .. }) => true,
            Some(User {
                sessions: Some(list),
                ..
            }) => list.iter().any(|p| p.matches(session)),
            None => false,
        }
    }

    /// The users without a session list (who may get a token for any
    /// session), sorted.
    pub fn unrestricted(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .users
            .iter()
            .filter(|(_, u)| u.sessions.is_none())
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    /// Checks a password, off the async threads. Unknown users cost the
    /// same work as known ones, so timing does not reveal who exists.
    pub async fn verify(&self, username: &str, password: &str) -> bool {
        // A hash with default parameters to spend the same effort on
        // unknown users; made once per process.
        static DUMMY: LazyLock<String> =
            LazyLock::new(|| hash_password("not a password").unwrap_or_default());
        let (hash, known) = match self.users.get(username) {
            Some(u) => (u.hash.clone(), true),
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

    #[test]
    fn a_third_field_lists_the_sessions_a_user_may_join() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$rxVRGoBrvL4b+1V5sMqq8Q$F4dDGebuGctBGYowVRg+WASlNqb12crouZmJhwhJr+4";
        let text = format!(
            "alice:{hash}:session-alice, team-7-*\nbob:{hash}\ncarol:{hash}:*\ndave:{hash}:*-dave\nerin:{hash}:a*z\n"
        );
        let users = Users::parse(&text, "u").expect("parse");
        assert_eq!(users.len(), 5);
        // The hash is the second field alone, whatever follows it.
        assert_eq!(users.hash("alice"), Some(hash));
        assert_eq!(users.hash("bob"), Some(hash));
        assert!(users.may_join("alice", "session-alice"));
        assert!(users.may_join("alice", "team-7-"));
        assert!(users.may_join("alice", "team-7-room.2"));
        for other in [
            "session-bob",
            "session-alice2",
            "xsession-alice",
            "team-8-a",
            "team-7",
        ] {
            assert!(!users.may_join("alice", other), "{other}");
        }
        // No list: any session (today's behaviour); `*`: any, explicitly.
        assert!(users.may_join("bob", "session-alice"));
        assert!(users.may_join("carol", "anything.at_all"));
        assert!(users.may_join("dave", "room-dave"));
        assert!(!users.may_join("dave", "room-dave2"));
        assert!(users.may_join("erin", "az"));
        assert!(users.may_join("erin", "abcz"));
        assert!(!users.may_join("erin", "a"));
        assert!(!users.may_join("erin", "z"));
        assert!(!users.may_join("nobody", "session-nobody"));
        assert_eq!(users.unrestricted(), ["bob"]);
    }

    #[test]
    fn bad_session_lists_name_the_line() {
        let hash = hash_password("x").expect("hash");
        for (list, why) in [
            ("", "empty"),
            ("  ", "empty"),
            ("a,,b", "1-128"),
            ("a,", "1-128"),
            ("a**", "more than one '*'"),
            ("*a*", "more than one '*'"),
            ("team 7", "' '"),
            ("a:b", "':'"),
            ("a{b}", "'{'"),
            ("sé", "'é'"),
        ] {
            let e = Users::parse(&format!("ok:{hash}\nalice:{hash}:{list}\n"), "users.txt")
                .expect_err(list);
            let text = e.to_string();
            assert!(
                text.starts_with("USERS_FILE: users.txt line 2: "),
                "{list:?}: {text}"
            );
            assert!(text.contains(why), "{list:?}: {text}");
            assert!(!text.contains(&hash), "{text}");
        }
        let e = Users::parse(&format!("alice:{hash}:a,,b\n"), "u").expect_err("empty entry");
        assert!(e.to_string().contains("session list entry 2"), "{e}");
        // A hash pasted into the session field is not shown either.
        let e = Users::parse(&format!("alice:{hash}:{hash}\n"), "u").expect_err("not a list");
        assert!(!e.to_string().contains(&hash), "{e}");
        let long = "x".repeat(crate::keys::MAX_ID_LEN + 1);
        assert!(Users::parse(&format!("alice:{hash}:{long}\n"), "u").is_err());
        let longest = "x".repeat(crate::keys::MAX_ID_LEN);
        assert!(Users::parse(&format!("alice:{hash}:{longest}\n"), "u").is_ok());
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
