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
//!   origins allowed besides, or `*` for any page. An entry may allow the
//!   subdomains of a domain, `https://*.example.com`: any origin of that
//!   scheme (and port) whose host ends in `.example.com`, at any depth, but
//!   not `example.com` itself (list it too); `*` anywhere else is refused
//!   at start-up, as is a wildcard over a single label (`https://*.com`).

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
    /// `scheme://*.domain[:port]` for subdomains, or `null` for sandboxed
    /// pages and local files).
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Parses a list such as `https://app.example.com, http://localhost:3000`;
    /// `*` allows any origin, an empty list only wsproxy's own.
    pub fn parse<'a>(items: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut list = Vec::new();
        for item in items.into_iter().map(str::trim).filter(|s| !s.is_empty()) {
            // `https://app.example/` is that origin as a browser sends it.
            let item = item.strip_suffix('/').unwrap_or(item);
            if item == "*" {
                return Ok(Self::Any);
            }
            if item != "null" {
                let Some((scheme, authority)) = item.split_once("://") else {
                    return Err(format!(
                        "{item:?} is not an origin (expected scheme://host[:port], null or *)"
                    ));
                };
                if !scheme.starts_with(|c: char| c.is_ascii_alphabetic())
                    || !scheme
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
                    || authority.is_empty()
                    || authority.contains(['/', '?', '#', '@', ' '])
                    || !item.is_ascii()
                {
                    return Err(format!(
                        "{item:?} is not an origin (expected scheme://host[:port] with no path)"
                    ));
                }
                if authority.contains('*') {
                    let domain = authority.strip_prefix("*.").unwrap_or("");
                    let host = domain.split(':').next().unwrap_or("");
                    if domain.contains('*') || !host.contains('.') || host.starts_with('.') {
                        return Err(format!(
                            "{item:?}: a wildcard is only allowed as the whole first label of a domain of two or more labels (scheme://*.example.com[:port])"
                        ));
                    }
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
                list.iter().any(|o| listed(o, origin)) || same_origin(origin, headers)
            }
        }
    }

    /// True when `origin` (an `Origin` header's value) is listed, or any is
    /// allowed; wsproxy's own origin is not considered (CORS answers only
    /// other origins).
    pub fn lists(&self, origin: &str) -> bool {
        match self {
            Self::Any => true,
            Self::SameOrigin => false,
            Self::List(list) => list.iter().any(|o| listed(o, origin.trim())),
        }
    }

    /// [`AllowedOrigins::allows`], as the refusal every endpoint sends.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        if self.allows(headers) {
            return Ok(());
        }
        Err(ApiError::from(Refusal::OriginNotAllowed("Requests from this page's origin are not allowed (WebSockets, event streams and their POSTs) (see WS_ALLOWED_ORIGINS)".into())))
    }
}

/// `origin` is the listed entry `entry` (lower case), or one of the
/// subdomains a `scheme://*.domain[:port]` entry allows: same scheme, a
/// host ending in `.domain` after one or more labels, the same port.
fn listed(entry: &str, origin: &str) -> bool {
    let Some((scheme, rest)) = entry.split_once("://*.") else {
        return entry.eq_ignore_ascii_case(origin);
    };
    let Some((o_scheme, authority)) = origin.split_once("://") else {
        return false;
    };
    if !o_scheme.eq_ignore_ascii_case(scheme) || authority.len() <= rest.len() + 1 {
        return false;
    }
    let split = authority.len() - rest.len();
    let (Some(labels), Some(suffix)) = (authority.get(..split), authority.get(split..)) else {
        return false;
    };
    // `labels` is "sub." or "a.b.": host characters only, so nothing can
    // smuggle another host or a port in front of the domain.
    suffix.eq_ignore_ascii_case(rest)
        && labels.ends_with('.')
        && !labels.starts_with('.')
        && !labels.contains("..")
        && labels
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
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

    /// Issue 22, defect 10: `https://*.example.com` started without
    /// complaint and never matched. Subdomain wildcards are now supported,
    /// and a `*` anywhere else stops start-up.
    #[test]
    fn a_wildcard_allows_subdomains_and_nothing_that_looks_like_them() {
        let w = AllowedOrigins::parse(["https://*.Example.com", "http://*.local.test:8080"])
            .expect("valid");
        for good in [
            "https://app.example.com",
            "https://a.b.example.com",
            "https://APP.example.COM",
            "https://x-1.example.com",
            "http://dev.local.test:8080",
        ] {
            assert!(w.allows(&headers(Some(good), "gw")), "{good}");
        }
        for bad in [
            "https://example.com",
            "https://evil-example.com",
            "https://example.com.evil.com",
            "https://app.example.com.evil.com",
            "https://app.example.com:8443",
            "http://app.example.com",
            "https://.example.com",
            "https://a..example.com",
            "https://evil.com#.example.com",
            "https://evil.com/.example.com",
            "https://u@app.example.com",
            "https://app.example.co",
            "http://dev.local.test",
            "http://dev.local.test:80800",
            "null",
        ] {
            assert!(!w.allows(&headers(Some(bad), "gw")), "{bad}");
        }
        for bad in [
            "https://*",
            "https://*.com",
            "https://a.*.example.com",
            "https://*example.com",
            "https://**.example.com",
            "https://*.*.example.com",
            "https://app.example.*",
            "*://app.example.com",
        ] {
            assert!(AllowedOrigins::parse([bad]).is_err(), "{bad}");
        }
    }
}
