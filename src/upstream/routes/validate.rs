//! The rules a route must follow, checked one part of the route at a time
//! (each error names its place, e.g. `routers[2].backends[0].port`).

use std::collections::HashSet;
use std::time::Duration;

use super::{
    Backend, Balance, HealthCheck, Probe, RouterEntry, RoutesError, StickyKey, default_cooldown,
    default_failures, invalid,
};

/// Paths wsproxy serves itself; a route may not take them over.
const RESERVED: &[&str] = &[
    "/health",
    "/ready",
    "/metrics",
    "/status",
    "/status.json",
    "/ws",
    "/auth/token",
    "/_test/echo",
];

/// What `methods` may list.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE",
];

/// Printable ASCII only: what may go into a request line as it is.
fn visible_ascii(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_graphic())
}

/// The route's protocol, methods and paths, and that its external path is
/// free.
pub(super) fn check_router_head(
    i: usize,
    r: &RouterEntry,
    seen: &mut HashSet<String>,
) -> Result<(), RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    if r.protocol != "websocket" {
        return Err(invalid(
            at("protocol"),
            format!("{:?} is not supported (expected \"websocket\")", r.protocol),
        ));
    }
    if !r.methods.iter().any(|m| m.eq_ignore_ascii_case("GET")) {
        return Err(invalid(
            at("methods"),
            "must include \"GET\" (the WebSocket upgrade is a GET)",
        ));
    }
    // Others may be listed, as the seed allows, but only a GET can
    // upgrade: any other request is answered 405 (with Allow: GET).
    if let Some(m) = r
        .methods
        .iter()
        .find(|m| !METHODS.iter().any(|k| k.eq_ignore_ascii_case(m)))
    {
        return Err(invalid(
            at("methods"),
            format!(
                "{m:?} is not an HTTP method (one of {})",
                METHODS.join(", ")
            ),
        ));
    }
    for (name, p) in [
        ("external_path", &r.external_path),
        ("internal_path", &r.internal_path),
    ] {
        if !p.starts_with('/') || p.contains(['?', '#']) || p.contains("//") || !visible_ascii(p) {
            return Err(invalid(
                at(name),
                format!(
                    "{p:?} must be a path starting with '/' (no query, '//', spaces or control characters)"
                ),
            ));
        }
    }
    // Requests are matched decoded and without a segment's `;` parameters
    // (see `Route::map_path`), so the path is compared as they are.
    let decoded = super::matching::decoded(&r.external_path).collect::<Vec<u8>>();
    if decoded.contains(&b';') {
        return Err(invalid(
            at("external_path"),
            format!(
                "{:?}: a ';' starts a path parameter, which routes do not match on",
                r.external_path
            ),
        ));
    }
    let decoded = String::from_utf8_lossy(&decoded).into_owned();
    if RESERVED.contains(&decoded.as_str()) {
        return Err(invalid(
            at("external_path"),
            format!("{:?} is one of wsproxy's own endpoints", r.external_path),
        ));
    }
    if !seen.insert(decoded) {
        return Err(invalid(
            at("external_path"),
            format!("{:?} is used by an earlier route", r.external_path),
        ));
    }
    Ok(())
}

/// The route's backends.
pub(super) fn validate_backends(i: usize, r: &RouterEntry) -> Result<Vec<Backend>, RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    if r.backends.is_empty() {
        return Err(invalid(at("backends"), "lists no backends"));
    }
    let mut backends: Vec<Backend> = Vec::with_capacity(r.backends.len());
    for (j, b) in r.backends.iter().enumerate() {
        let bat = |f: &str| format!("routers[{i}].backends[{j}].{f}");
        let (tls, rest) = if let Some(h) = b.host.strip_prefix("wss://") {
            (true, h)
        } else if let Some(h) = b.host.strip_prefix("ws://") {
            (false, h)
        } else {
            return Err(invalid(
                bat("host"),
                format!("{:?} must start with ws:// or wss://", b.host),
            ));
        };
        let host = rest.trim_end_matches('/');
        // A name, an IPv4 address, or an IPv6 address in brackets;
        // printable ASCII only, as it goes into the Host header.
        let ipv6 = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .map(|h| h.parse::<std::net::Ipv6Addr>().is_ok());
        if host.is_empty()
            || !visible_ascii(host)
            || ipv6 == Some(false)
            || ipv6.is_none() && host.contains(['/', ':', '?', '#', '@', '[', ']'])
        {
            return Err(invalid(
                bat("host"),
                format!(
                    "{:?} must be a scheme and a host name only (the port goes in \"port\", the path in internal_path)",
                    b.host
                ),
            ));
        }
        if !(1..=65535).contains(&b.port) {
            return Err(invalid(
                bat("port"),
                format!("{} is outside 1-65535", b.port),
            ));
        }
        if !(1..=1000).contains(&b.weight) {
            return Err(invalid(
                bat("weight"),
                format!("{} is outside 1-1000", b.weight),
            ));
        }
        let backend = Backend {
            tls,
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: b.port as u16,
            weight: b.weight as u32,
            name: match &b.name {
                None => j.to_string(),
                Some(n)
                    if !n.is_empty()
                        && n.len() <= 64
                        && n.bytes().all(|c| {
                            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.')
                        }) =>
                {
                    n.clone()
                }
                Some(n) => {
                    return Err(invalid(
                        bat("name"),
                        format!("{n:?} must be 1-64 characters of A-Z, a-z, 0-9, '-', '_' and '.'"),
                    ));
                }
            },
        };
        if let Some(k) = backends.iter().position(|o| o.name == backend.name) {
            return Err(invalid(
                bat("name"),
                format!("{:?} is already the name of backends[{k}]", backend.name),
            ));
        }
        if let Some(k) = backends
            .iter()
            .position(|o| (o.tls, &o.host, o.port) == (backend.tls, &backend.host, backend.port))
        {
            return Err(invalid(
                bat("host"),
                format!(
                    "{}:{} is already backends[{k}]; give it more weight instead",
                    b.host, b.port
                ),
            ));
        }
        backends.push(backend);
    }
    Ok(backends)
}

/// How the route picks a backend: its sticky key, or its balance.
pub(super) fn validate_picking(
    i: usize,
    r: &RouterEntry,
    has_jwt: bool,
) -> Result<(Option<StickyKey>, Balance), RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    if r.auth_required && !has_jwt {
        return Err(invalid(
            at("auth_required"),
            "is true but the file has no \"jwt\" section",
        ));
    }
    let sticky = match &r.sticky {
        None => None,
        Some(s) => {
            let name = || {
                s.name.clone().filter(|n| !n.is_empty()).ok_or_else(|| {
                    invalid(
                        at("sticky.name"),
                        format!("is required when sticky.by is {:?}", s.by),
                    )
                })
            };
            Some(match s.by.as_str() {
                "subject" if r.auth_required => StickyKey::Subject,
                "subject" => {
                    return Err(invalid(
                        at("sticky.by"),
                        "\"subject\" needs auth_required: true",
                    ));
                }
                "header" => StickyKey::Header(name()?.to_ascii_lowercase()),
                "cookie" => StickyKey::Cookie(name()?),
                "query" => StickyKey::Query(name()?),
                other => {
                    return Err(invalid(
                        at("sticky.by"),
                        format!("{other:?} is not one of subject, header, cookie, query"),
                    ));
                }
            })
        }
    };
    let balance = match (r.balance.as_deref(), &sticky) {
        (None | Some("round_robin"), _) => Balance::RoundRobin,
        (Some("least_connections"), None) => Balance::LeastConnections,
        (Some("least_connections"), Some(_)) => {
            return Err(invalid(
                at("balance"),
                "cannot be combined with sticky (a sticky route picks by its key)",
            ));
        }
        (Some(other), _) => {
            return Err(invalid(
                at("balance"),
                format!("{other:?} is not \"round_robin\" or \"least_connections\""),
            ));
        }
    };
    Ok((sticky, balance))
}

/// The route's per-connection limits; returns the rate limit.
pub(super) fn validate_limits(
    i: usize,
    r: &RouterEntry,
) -> Result<Option<(f64, f64)>, RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    if r.max_connections == Some(0) {
        return Err(invalid(at("max_connections"), "must be at least 1"));
    }
    if matches!(r.max_message_bytes, Some(n) if n < 16) {
        return Err(invalid(at("max_message_bytes"), "must be at least 16"));
    }
    let rate_limit = match &r.rate_limit {
        None => None,
        Some(rl) => {
            if !(rl.messages_per_sec.is_finite() && rl.messages_per_sec > 0.0) {
                return Err(invalid(
                    at("rate_limit.messages_per_sec"),
                    "must be a positive number",
                ));
            }
            let burst = rl.burst.unwrap_or(rl.messages_per_sec.max(1.0));
            if !(burst.is_finite() && burst >= 1.0) {
                return Err(invalid(at("rate_limit.burst"), "must be at least 1"));
            }
            Some((rl.messages_per_sec, burst))
        }
    };
    Ok(rate_limit)
}

/// The route's active health check.
pub(super) fn validate_health_check(
    i: usize,
    r: &RouterEntry,
) -> Result<Option<HealthCheck>, RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    let health_check = match &r.health_check {
        None => None,
        Some(h) => {
            if !(100..=3_600_000).contains(&h.interval_ms) {
                return Err(invalid(
                    at("health_check.interval_ms"),
                    format!("{} is outside 100-3600000", h.interval_ms),
                ));
            }
            if !(10..=60_000).contains(&h.timeout_ms) {
                return Err(invalid(
                    at("health_check.timeout_ms"),
                    format!("{} is outside 10-60000", h.timeout_ms),
                ));
            }
            let probe = match h.kind.as_deref() {
                None | Some("websocket") => {
                    let path = h.path.clone().unwrap_or_else(|| r.internal_path.clone());
                    if !path.starts_with('/') || !visible_ascii(&path) || path.contains('#') {
                        return Err(invalid(
                            at("health_check.path"),
                            format!(
                                "{path:?} must be a path starting with '/' (printable ASCII, no spaces)"
                            ),
                        ));
                    }
                    Probe::WebSocket(path)
                }
                Some("tcp") => {
                    if h.path.is_some() {
                        return Err(invalid(
                            at("health_check.path"),
                            "only applies to \"websocket\" checks",
                        ));
                    }
                    Probe::Tcp
                }
                Some(other) => {
                    return Err(invalid(
                        at("health_check.type"),
                        format!("{other:?} is not \"websocket\" or \"tcp\""),
                    ));
                }
            };
            Some(HealthCheck {
                interval: Duration::from_millis(h.interval_ms),
                timeout: Duration::from_millis(h.timeout_ms),
                probe,
            })
        }
    };
    Ok(health_check)
}

/// A route's circuit breaker (failures, cool-down), connect timeout and
/// allowed origins.
pub(super) type Connecting = (
    (u32, Duration),
    Duration,
    Option<crate::origin::AllowedOrigins>,
);

/// The route's circuit breaker, connect timeout and allowed origins.
pub(super) fn validate_connecting(i: usize, r: &RouterEntry) -> Result<Connecting, RoutesError> {
    let at = |f: &str| format!("routers[{i}].{f}");
    let breaker = match &r.circuit_breaker {
        None => (
            default_failures(),
            Duration::from_millis(default_cooldown()),
        ),
        Some(b) => {
            if !(1..=1000).contains(&b.failures) {
                return Err(invalid(
                    at("circuit_breaker.failures"),
                    format!("{} is outside 1-1000", b.failures),
                ));
            }
            if !(100..=3_600_000).contains(&b.cooldown_ms) {
                return Err(invalid(
                    at("circuit_breaker.cooldown_ms"),
                    format!("{} is outside 100-3600000", b.cooldown_ms),
                ));
            }
            (b.failures, Duration::from_millis(b.cooldown_ms))
        }
    };
    let connect_timeout = match r.connect_timeout_ms {
        None => Duration::from_secs(5),
        Some(ms) if (10..=120_000).contains(&ms) => Duration::from_millis(ms),
        Some(ms) => {
            return Err(invalid(
                at("connect_timeout_ms"),
                format!("{ms} is outside 10-120000"),
            ));
        }
    };
    let allowed_origins = match &r.allowed_origins {
        None => None,
        Some(list) => Some(
            crate::origin::AllowedOrigins::parse(list.iter().map(String::as_str))
                .map_err(|e| invalid(at("allowed_origins"), e))?,
        ),
    };
    Ok((breaker, connect_timeout, allowed_origins))
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::*;

    pub(in crate::upstream::routes) fn file(routers: &str) -> String {
        format!(r#"{{"version":1,"routers":[{routers}]}}"#)
    }

    pub(in crate::upstream::routes) const OK: &str = r#"{"protocol":"websocket","backends":[{"host":"ws://localhost","port":3000}],
        "external_path":"/ws/chat","internal_path":"/ws","methods":["GET"]}"#;

    #[test]
    fn the_seed_example_loads_with_defaults() {
        let r = Routes::parse(&file(OK), "t").expect("valid");
        let route = &r.routes[0];
        assert_eq!(route.backends[0].weight, 1);
        assert!(!route.backends[0].tls);
        assert!(!route.auth_required);
        assert_eq!(route.connect_timeout, Duration::from_secs(5));
    }

    #[test]
    fn hosts_may_be_names_ipv4_or_bracketed_ipv6() {
        for (host, expect) in [
            ("ws://backend.internal", "backend.internal"),
            ("ws://10.0.0.7", "10.0.0.7"),
            ("wss://[::1]", "::1"),
            ("ws://[fe80::1]/", "fe80::1"),
        ] {
            let f = file(&OK.replace("ws://localhost", host));
            let r = Routes::parse(&f, "t").unwrap_or_else(|e| panic!("{host}: {e}"));
            assert_eq!(r.routes[0].backends[0].host, expect);
        }
    }

    #[test]
    fn the_manuals_example_is_valid() {
        let section = include_str!("../../../docs/src/proxy.md");
        let start = section.find("```json\n").expect("example") + "```json\n".len();
        let example = &section[start..start + section[start..].find("```").expect("end")];
        let routes =
            Routes::parse(example, "docs/src/proxy.md").expect("the manual's example parses");
        assert_eq!(routes.routes.len(), 2);
        let chat = routes
            .routes
            .iter()
            .find(|r| r.external_path == "/chat")
            .expect("/chat");
        assert_eq!(chat.sticky, Some(StickyKey::Subject));
        let feed = routes
            .routes
            .iter()
            .find(|r| r.external_path == "/feed")
            .expect("/feed");
        assert_eq!(feed.balance, Balance::LeastConnections);
        assert_eq!(
            feed.health_check.as_ref().map(|h| &h.probe),
            Some(&Probe::Tcp)
        );
    }

    #[test]
    fn health_checks_default_to_a_websocket_handshake_on_the_internal_path() {
        let with = |hc: &str| {
            let f = file(&OK.replace("\"methods\"", &format!("\"health_check\":{hc},\"methods\"")));
            Routes::parse(&f, "t").expect("valid").routes[0]
                .health_check
                .clone()
        };
        let hc = with("{}").expect("configured");
        assert_eq!(hc.probe, Probe::WebSocket("/ws".into()));
        assert_eq!(hc.interval, Duration::from_secs(5));
        assert_eq!(
            with(r#"{"path":"/healthz?deep=1"}"#)
                .expect("configured")
                .probe,
            Probe::WebSocket("/healthz?deep=1".into())
        );
        assert_eq!(
            with(r#"{"type":"tcp"}"#).expect("configured").probe,
            Probe::Tcp
        );
    }

    #[test]
    fn wrong_types_and_missing_fields_name_the_router_too() {
        let second = |r: &str| file(&format!("{OK},{}", r.replace("/ws/chat", "/other")));
        for (change, start) in [
            (
                OK.replace("3000", "\"3000\""),
                "ROUTES_FILE: t: routers[1].backends[0].port: invalid type: string \"3000\"",
            ),
            (
                OK.replace("\"port\":3000", "\"port\":3000,\"weight\":1.5"),
                "ROUTES_FILE: t: routers[1].backends[0].weight: invalid type: floating point",
            ),
            (
                OK.replace(",\"methods\":[\"GET\"]", ""),
                "ROUTES_FILE: t: routers[1]: missing field `methods`",
            ),
            (
                OK.replace("\"methods\"", "\"method\":1,\"methods\""),
                "ROUTES_FILE: t: routers[1].method: unknown field `method`",
            ),
        ] {
            let e = Routes::parse(&second(&change), "t").expect_err(start);
            assert!(e.to_string().starts_with(start), "{start}\n{e}");
        }
        // Not JSON at all: no field to name, the line and column say where.
        let e = Routes::parse("{\"version\": 1,", "t").expect_err("not JSON");
        assert!(e.to_string().starts_with("ROUTES_FILE: t: EOF"), "{e}");
    }

    #[test]
    fn other_methods_may_be_listed_beside_get() {
        let r = Routes::parse(&file(&OK.replace("[\"GET\"]", "[\"GET\",\"post\"]")), "t");
        assert!(r.is_ok(), "{r:?}");
    }

    #[test]
    fn errors_name_the_field_and_router() {
        let bad_port = OK.replace("3000", "70000");
        let two = file(&format!("{OK},{}", bad_port.replace("/ws/chat", "/other")));
        let e = Routes::parse(&two, "t").expect_err("port");
        assert_eq!(
            e.to_string(),
            "ROUTES_FILE: routers[1].backends[0].port: 70000 is outside 1-65535"
        );
        for (change, field) in [
            (
                OK.replace("ws://localhost", "http://localhost"),
                "routers[0].backends[0].host",
            ),
            (
                OK.replace("ws://localhost", "ws://localhost:99"),
                "routers[0].backends[0].host",
            ),
            (
                OK.replace("\"websocket\"", "\"http\""),
                "routers[0].protocol",
            ),
            (OK.replace("[\"GET\"]", "[\"POST\"]"), "routers[0].methods"),
            (
                OK.replace("[\"GET\"]", "[\"GET\",\"FETCH\"]"),
                "routers[0].methods",
            ),
            (
                OK.replace("\"/ws/chat\"", "\"ws/chat\""),
                "routers[0].external_path",
            ),
            (
                OK.replace("\"/ws/chat\"", "\"/health\""),
                "routers[0].external_path",
            ),
            (
                OK.replace("\"/ws/chat\"", "\"/status\""),
                "routers[0].external_path",
            ),
            (
                OK.replace("\"/ws/chat\"", "\"/status.json\""),
                "routers[0].external_path",
            ),
            (
                OK.replace("\"/ws/chat\"", "\"/_test/echo\""),
                "routers[0].external_path",
            ),
            (
                OK.replace("\"port\":3000", "\"port\":3000,\"weight\":0"),
                "routers[0].backends[0].weight",
            ),
            (
                OK.replace("\"methods\"", "\"auth_required\":true,\"methods\""),
                "routers[0].auth_required",
            ),
            (
                OK.replace("\"methods\"", "\"sticky\":{\"by\":\"header\"},\"methods\""),
                "routers[0].sticky.name",
            ),
            (
                OK.replace("\"methods\"", "\"balance\":\"random\",\"methods\""),
                "routers[0].balance",
            ),
            (
                OK.replace(
                    "\"methods\"",
                    "\"balance\":\"least_connections\",\"sticky\":{\"by\":\"query\",\"name\":\"u\"},\"methods\"",
                ),
                "routers[0].balance",
            ),
            (
                OK.replace("ws://localhost", "ws://[b0]\\r\\nX-Evil: 1\\r\\nX"),
                "routers[0].backends[0].host",
            ),
            (
                OK.replace("ws://localhost", "ws://[not-an-address]"),
                "routers[0].backends[0].host",
            ),
            (
                OK.replace(
                    r#"{"host":"ws://localhost","port":3000}"#,
                    r#"{"host":"ws://localhost","port":3000},{"host":"ws://localhost","port":3000,"weight":2}"#,
                ),
                "routers[0].backends[1].host",
            ),
            (
                // A CR LF would smuggle headers into the backend request.
                OK.replace("\"/ws\"", "\"/ws\\r\\nX-Evil: 1\""),
                "routers[0].internal_path",
            ),
            (
                OK.replace(
                    "\"methods\"",
                    "\"health_check\":{\"type\":\"icmp\"},\"methods\"",
                ),
                "routers[0].health_check.type",
            ),
            (
                OK.replace(
                    "\"methods\"",
                    "\"health_check\":{\"path\":\"/a b\"},\"methods\"",
                ),
                "routers[0].health_check.path",
            ),
            (
                OK.replace(
                    "\"methods\"",
                    "\"health_check\":{\"type\":\"tcp\",\"path\":\"/x\"},\"methods\"",
                ),
                "routers[0].health_check.path",
            ),
        ] {
            let e = Routes::parse(&file(&change), "t").expect_err(field);
            assert!(
                e.to_string().starts_with(&format!("ROUTES_FILE: {field}:")),
                "{field}: {e}"
            );
        }
        let dup = file(&format!("{OK},{OK}"));
        assert!(
            Routes::parse(&dup, "t")
                .expect_err("dup")
                .to_string()
                .contains("routers[1].external_path")
        );
        // Paths compare decoded, and without `;` parameters: a route that
        // spells another's path differently is a duplicate, one with a `;`
        // could never match, and `/%77s` is `/ws`.
        for second in [
            OK.replace("/ws/chat", "/ws/ch%61t"),
            OK.replace("/ws/chat", "/ws/chat;x"),
            OK.replace("/ws/chat", "/ws/chat%3Bx"),
            OK.replace("/ws/chat", "/%77s"),
        ] {
            let e = Routes::parse(&file(&format!("{OK},{second}")), "t").expect_err(&second);
            assert!(
                e.to_string()
                    .starts_with("ROUTES_FILE: routers[1].external_path:"),
                "{e}"
            );
        }
        assert!(Routes::parse(r#"{"version":2,"routers":[]}"#, "t").is_err());
        assert!(
            Routes::parse("{", "t")
                .expect_err("json")
                .to_string()
                .contains("line 1")
        );
    }
}
