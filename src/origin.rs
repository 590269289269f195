//! Which web pages may open a WebSocket to wsproxy.
//!
//! A browser attaches its cookies to a WebSocket upgrade whatever page
//! starts it, and the same-origin policy does not apply to WebSockets: any
//! site a user visits could open a socket to a route that is sticky by
//! cookie, or to a backend that authenticates by cookie (cross-site
//! WebSocket hijacking). Browsers always send the page's `Origin`, so every
//! upgrade is checked against an allow-list before anything else is done.
//!
//! - A request without `Origin` is not from a browser page (a server, a
//!   mobile app, `websocat`) and is allowed: nothing a page could forge.
//! - By default ([`AllowedOrigins::SameOrigin`]) a page may connect only
//!   from the origin wsproxy itself is served on (`Origin`'s host and port
//!   equal the `Host` header), as gorilla/websocket and Centrifugo do when
//!   no origins are configured: safe for cookie-authenticated backends.
//! - `WS_ALLOWED_ORIGINS` (and `allowed_origins` per proxy route) lists the
//!   origins allowed besides, or `*` for any page.

use axum::http::{HeaderMap, header};

use crate::error::{ApiError, Refusal};

/// The origins allowed to open WebSockets.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AllowedOrigins {
    /// Only pages served from wsproxy's own origin (the default).
    #[default]
    SameOrigin,
    /// Any page (`*`).
    Any,
    /// wsproxy's own origin and these (`scheme://host[:port]`, lower case,
    /// or `null` for sandboxed pages and local files).
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Parses a list such as `https://app.example.com, http://localhost:3000`;
    /// `*` allows any origin, an empty list only wsproxy's own.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut list = Vec::new();
        for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
            if item == "*" {
                return Ok(Self::Any);
            }
            if item != "null" {
                let Some((scheme, authority)) = item.split_once("://") else {
                    return Err(format!(
                        "{item:?} is not an origin (expected scheme://host[:port], null or *)"
                    ));
                };
                if scheme.is_empty()
                    || authority.is_empty()
                    || authority.contains(['/', '?', '#', '@', ' '])
                    || !item.is_ascii()
                {
                    return Err(format!(
                        "{item:?} is not an origin (expected scheme://host[:port] with no path)"
                    ));
                }
            }
            list.push(item.to_ascii_lowercase());
        }
        Ok(if list.is_empty() {
            Self::SameOrigin
        } else {
            Self::List(list)
        })
    }

    /// True when a request with these headers may upgrade.
    pub fn allows(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return true;
        };
        let Ok(origin) = origin.to_str() else {
            return false;
        };
        let origin = origin.trim();
        match self {
            Self::Any => true,
            Self::SameOrigin => same_origin(origin, headers),
            Self::List(list) => {
                list.iter().any(|o| o.eq_ignore_ascii_case(origin)) || same_origin(origin, headers)
            }
        }
    }

    /// [`AllowedOrigins::allows`], as the refusal every endpoint sends.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.allows(headers) {
            return Ok(());
        }
        Err(ApiError::from(Refusal::OriginNotAllowed("WebSocket connections from this page's origin are not allowed (see WS_ALLOWED_ORIGINS)".into())))
    }
}

/// The origin names the host and port the request was sent to.
fn same_origin(origin: &str, headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => return false,
    };
    let host = host.trim();
    let with_port = |a: &str| -> String {
        // `[::1]` and `host` lack a port; `[::1]:8080` and `host:8080` have one.
        let has_port = match a.rfind(']') {
            Some(end) => a[end..].contains(':'),
            None => a.contains(':'),
        };
        if has_port {
            a.to_ascii_lowercase()
        } else {
            format!("{}{default_port}", a.to_ascii_lowercase())
        }
    };
    with_port(authority) == with_port(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(o) = origin {
            h.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        h
    }

    #[test]
    fn by_default_only_the_servers_own_origin_and_non_browsers_pass() {
        let d = AllowedOrigins::default();
        assert!(d.allows(&headers(None, "gw.example:8080")));
        assert!(d.allows(&headers(Some("http://gw.example:8080"), "gw.example:8080")));
        assert!(d.allows(&headers(Some("https://GW.example"), "gw.example:443")));
        assert!(d.allows(&headers(Some("http://[::1]:9"), "[::1]:9")));
        assert!(!d.allows(&headers(Some("https://evil.example"), "gw.example:8080")));
        assert!(!d.allows(&headers(Some("http://gw.example:8081"), "gw.example:8080")));
        assert!(!d.allows(&headers(Some("https://gw.example"), "gw.example:80")));
        assert!(!d.allows(&headers(Some("null"), "gw.example")));
        let e = d
            .check(&headers(Some("https://evil.example"), "gw.example"))
            .expect_err("refused");
        assert_eq!(
            (e.status, e.code),
            (axum::http::StatusCode::FORBIDDEN, "origin_not_allowed")
        );
    }

    #[test]
    fn a_list_adds_origins_and_a_star_allows_all() {
        let l = AllowedOrigins::parse("https://App.example, null".split(',')).expect("valid");
        assert!(l.allows(&headers(Some("https://app.example"), "gw")));
        assert!(l.allows(&headers(Some("null"), "gw")));
        assert!(l.allows(&headers(Some("http://gw"), "gw")));
        assert!(!l.allows(&headers(Some("https://app.example.evil"), "gw")));
        assert!(!l.allows(&headers(Some("http://app.example"), "gw")));
        let any = AllowedOrigins::parse(["*"]).expect("valid");
        assert!(any.allows(&headers(Some("https://anything"), "gw")));
        assert_eq!(
            AllowedOrigins::parse(" , ".split(',')),
            Ok(AllowedOrigins::SameOrigin)
        );
        for bad in ["app.example", "https://a/b", "https://", "https://u@h"] {
            assert!(AllowedOrigins::parse([bad]).is_err(), "{bad}");
        }
    }
}
