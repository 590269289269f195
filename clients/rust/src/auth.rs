//! Getting and renewing a JWT from `POST /auth/token`, and reading its claims.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::Uri;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::Error;

/// Largest token-endpoint response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A token refreshes when it expires within this long.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// The claims this client looks at. Nothing is verified: the server does
/// that; the client only needs to know when to ask for a new token.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Claims {
    #[serde(default)]
    pub exp: Option<f64>,
    #[serde(default)]
    pub sid: Option<String>,
}

/// Decodes the payload segment of a JWT (base64url JSON) without checking
/// the signature.
pub(crate) fn decode_claims(jwt: &str) -> Result<Claims, Error> {
    let mut parts = jwt.split('.');
    let (Some(_header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::InvalidToken(
            "expected three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| Error::InvalidToken(format!("payload is not base64url: {e}")))?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(object @ serde_json::Value::Object(_)) => serde_json::from_value(object)
            .map_err(|e| Error::InvalidToken(format!("unexpected claims: {e}"))),
        _ => Err(Error::InvalidToken("payload is not a JSON object".into())),
    }
}

/// A token and what the client needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct Token {
    pub jwt: String,
    /// Expiry, from the `exp` claim (or `expires_in` when there is none).
    pub expires_at: Option<SystemTime>,
    /// How long it was valid for when issued.
    pub lifetime: Duration,
    /// The session bound into it.
    pub session: String,
}

impl Token {
    /// Time left before expiry (zero when past it); `None` if it never expires.
    pub fn remaining(&self) -> Option<Duration> {
        self.expires_at.map(|at| {
            at.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }

    pub fn expires_within(&self, margin: Duration) -> bool {
        self.remaining().is_some_and(|left| left <= margin)
    }
}

#[derive(Serialize)]
struct TokenRequest<'a> {
    username: &'a str,
    password: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<&'a str>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    session_id: Option<String>,
}

/// Credentials and the current token of an authenticated client.
pub(crate) struct Auth {
    uri: Uri,
    username: String,
    password: String,
    session: Option<String>,
    timeout: Duration,
    token: Mutex<Option<Token>>,
    /// Serializes refreshes so that the user and the background task never
    /// fetch two tokens at once.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("uri", &self.uri)
            .field("username", &self.username)
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(
        auth_url: &str,
        username: &str,
        password: &str,
        session: Option<&str>,
        timeout: Duration,
    ) -> Result<Auth, Error> {
        let invalid = |reason: &str| Error::InvalidUrl {
            url: auth_url.to_owned(),
            reason: reason.to_owned(),
        };
        let uri: Uri = auth_url.parse().map_err(|e| invalid(&format!("{e}")))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some("https") => {
                return Err(invalid(
                    "https is not supported by this client; use http on a trusted network \
                     or a local TLS-terminating proxy",
                ));
            }
            _ => return Err(invalid("expected an http:// URL")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(invalid("no host"));
        }
        Ok(Auth {
            uri,
            username: username.to_owned(),
            password: password.to_owned(),
            session: session.map(str::to_owned),
            timeout,
            token: Mutex::new(None),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    pub fn current(&self) -> Option<Token> {
        self.token
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn store(&self, token: Token) {
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = Some(token);
    }

    /// Fetches a token unless the current one is good for longer than
    /// `margin`; true when it fetched one.
    pub async fn refresh_if_needed(&self, margin: Duration) -> Result<bool, Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        if self.current().is_some_and(|t| !t.expires_within(margin)) {
            return Ok(false);
        }
        let token = self.request().await?;
        self.store(token);
        Ok(true)
    }

    /// Fetches a token whatever the state of the current one.
    pub async fn refresh(&self) -> Result<(), Error> {
        let _one_at_a_time = self.refreshing.lock().await;
        let token = self.request().await?;
        self.store(token);
        Ok(())
    }

    async fn request(&self) -> Result<Token, Error> {
        let body = serde_json::to_vec(&TokenRequest {
            username: &self.username,
            password: &self.password,
            session_id: self.session.as_deref(),
        })?;
        let (status, body) = tokio::time::timeout(self.timeout, post_json(&self.uri, body))
            .await
            .map_err(|_| Error::Timeout("the token endpoint"))??;
        if status != 200 {
            let json = serde_json::from_slice::<serde_json::Value>(&body).ok();
            let field = |name: &str| {
                json.as_ref()
                    .and_then(|j| j.get(name)?.as_str().map(str::to_owned))
            };
            return Err(Error::Auth {
                status,
                code: field("error").unwrap_or_else(|| "unknown".to_owned()),
                message: field("message")
                    .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned()),
            });
        }
        let response: TokenResponse = serde_json::from_slice(&body)?;
        let claims = decode_claims(&response.token)?;
        let now = SystemTime::now();
        let expires_at = match claims.exp {
            Some(exp) if exp.is_finite() && exp >= 0.0 => {
                Some(UNIX_EPOCH + Duration::from_secs_f64(exp))
            }
            _ => response
                .expires_in
                .map(|secs| now + Duration::from_secs(secs)),
        };
        let lifetime = match (response.expires_in, expires_at) {
            (Some(secs), _) => Duration::from_secs(secs),
            (None, Some(at)) => at.duration_since(now).unwrap_or(Duration::ZERO),
            (None, None) => Duration::MAX,
        };
        let session = response
            .session_id
            .or(claims.sid)
            .or_else(|| self.session.clone())
            .unwrap_or_else(|| format!("session-{}", self.username));
        Ok(Token {
            jwt: response.token,
            expires_at,
            lifetime,
            session,
        })
    }
}

/// Aborts a spawned task when dropped (the HTTP connection driver).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One HTTP/1.1 POST of a JSON body on a fresh connection; status and body.
async fn post_json(uri: &Uri, body: Vec<u8>) -> Result<(u16, Bytes), Error> {
    let host = uri.host().unwrap_or_default();
    // `Uri::host` keeps IPv6 brackets; the resolver wants them off.
    let connect_host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((connect_host, port)).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let _driver = AbortOnDrop(tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("token endpoint connection: {e}");
        }
    }));
    let authority = uri.authority().map_or(host, |a| a.as_str());
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::post(path)
        .header(HOST, authority)
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| Error::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map_err(|e| Error::Http(format!("reading the response: {e}")))?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        let enc = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.sig",
            enc.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
            enc.encode(payload)
        )
    }

    #[test]
    fn decodes_claims_without_verifying() {
        let c = decode_claims(&jwt(r#"{"sub":"u","sid":"s-1","exp":1700000000,"iat":1}"#))
            .expect("claims");
        assert_eq!(c.exp, Some(1_700_000_000.0));
        assert_eq!(c.sid.as_deref(), Some("s-1"));
        assert!(decode_claims("not-a-jwt").is_err());
        assert!(decode_claims("a.!!!.c").is_err());
        assert!(decode_claims(&jwt("[1]")).is_err());
    }

    #[test]
    fn refresh_window() {
        let t = Token {
            jwt: String::new(),
            expires_at: Some(SystemTime::now() + Duration::from_secs(30)),
            lifetime: Duration::from_secs(3600),
            session: "s".into(),
        };
        assert!(t.expires_within(REFRESH_MARGIN));
        let later = Token {
            expires_at: Some(SystemTime::now() + Duration::from_secs(600)),
            ..t.clone()
        };
        assert!(!later.expires_within(REFRESH_MARGIN));
        let never = Token {
            expires_at: None,
            ..t
        };
        assert!(!never.expires_within(REFRESH_MARGIN));
    }

    #[test]
    fn refuses_https_and_garbage() {
        let t = Duration::from_secs(1);
        assert!(Auth::new("https://h/auth/token", "u", "p", None, t).is_err());
        assert!(Auth::new("ftp://h/", "u", "p", None, t).is_err());
        assert!(Auth::new("http://127.0.0.1:1/auth/token", "u", "p", None, t).is_ok());
    }
}
