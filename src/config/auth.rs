//! Token settings: the JSON Web Tokens of `POST /auth/token` and `/ws`.

use std::time::Duration;

use super::parse::{nonempty, seconds};
use super::{Cli, ConfigError};

/// JSON Web Token settings; present when `JWT_SECRET` is set.
#[derive(Clone)]
pub struct JwtConfig {
    /// HS256 signing secret (at least 32 bytes).
    pub secret: Vec<u8>,
    /// `iss` claim issued and required.
    pub issuer: String,
    /// `aud` claim issued and required.
    pub audience: String,
    /// Lifetime of issued tokens.
    pub ttl: Duration,
}

impl std::fmt::Debug for JwtConfig {
    // Never print the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtConfig")
            .field("secret", &"<redacted>")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl Cli {
    /// The JWT settings, when `JWT_SECRET` is set.
    pub(super) fn jwt(&self) -> Result<Option<JwtConfig>, ConfigError> {
        Ok(match &self.jwt_secret {
            None => None,
            Some(secret) if secret.len() < 32 => {
                return Err(ConfigError::new(
                    "JWT_SECRET",
                    format!(
                        "is {} bytes long; use at least 32 random bytes",
                        secret.len()
                    ),
                ));
            }
            Some(secret) => Some(JwtConfig {
                secret: secret.as_bytes().to_vec(),
                issuer: nonempty("JWT_ISSUER", &self.jwt_issuer)?,
                audience: nonempty("JWT_AUDIENCE", &self.jwt_audience)?,
                ttl: seconds("JWT_TTL_SECS", &self.jwt_ttl_secs, 60..=31_536_000)?,
            }),
        })
    }
}
