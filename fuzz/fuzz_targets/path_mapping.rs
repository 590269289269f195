//! `upstream::check_path`, `Route::map_path` and `Routes::find` on any
//! request path, and the query helpers on its query.
//!
//! Input: a request path (UTF-8, lossy), optionally `?` and a query; or
//! three lines, `external_path`, `internal_path` and the path, to try a
//! route of the input's own beside the fixed ones.
//!
//! Checked: `map_path` gives the route's internal path joined to the rest
//! with exactly one `/` (no `//` from a path and route without one), only
//! at a `/` boundary; `find` takes the longest matching external path;
//! what `check_path` accepts of what a request can carry has no `.` or
//! `..` segment, nor a slash, backslash or NUL, once or twice decoded; a
//! query without its `access_token` keeps every other parameter.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wsproxy::upstream::routes::{Route, Routes};
use wsproxy::upstream::{check_path, query_param, without_param};

/// A routes file of the given `(external_path, internal_path)` pairs.
fn file(pairs: &[(&str, &str)]) -> String {
    let routers: Vec<_> = pairs
        .iter()
        .map(|(external, internal)| {
            serde_json::json!({
                "protocol": "websocket",
                "backends": [{ "host": "ws://127.0.0.1", "port": 9 }],
                "external_path": external,
                "internal_path": internal,
                "methods": ["GET"],
            })
        })
        .collect();
    serde_json::json!({ "version": 1, "routers": routers }).to_string()
}

static FIXED: LazyLock<Routes> = LazyLock::new(|| {
    Routes::parse(
        &file(&[
            ("/", "/"),
            ("/good", "/in/good"),
            ("/good/deeper", "/deep/"),
            ("/app/", "/in/"),
            ("/x", "/"),
            ("/a.b", "/c;d/e"),
        ]),
        "fuzz",
    )
    .expect("the fixed routes are valid")
});

/// What `map_path` must give: `internal_path` (less a trailing `/`), one
/// `/`, and what follows `external_path` (less a leading `/`); or
/// `internal_path` itself when nothing follows. `None` unless the path is
/// `external_path` or goes on from it at a `/` boundary.
fn expected(route: &Route, path: &str) -> Option<String> {
    let ext = route.external_path.as_str();
    let rest = path.strip_prefix(ext)?;
    if !(rest.is_empty() || rest.starts_with('/') || ext.ends_with('/')) {
        return None;
    }
    if rest.is_empty() {
        return Some(route.internal_path.clone());
    }
    let internal = route.internal_path.as_str();
    let base = internal.strip_suffix('/').unwrap_or(internal);
    Some(format!("{base}/{}", rest.strip_prefix('/').unwrap_or(rest)))
}

fn check_routes(routes: &Routes, path: &str, accepted: bool) {
    for route in &routes.routes {
        let mapped = route.map_path(path);
        assert_eq!(mapped, expected(route, path), "{route:?} {path:?}");
        let Some(mapped) = mapped else { continue };
        assert!(mapped.starts_with('/'), "{mapped:?}");
        if accepted && !route.internal_path.contains("//") {
            assert!(!mapped.contains("//"), "{path:?} -> {mapped:?}");
        }
    }
    // The longest matching external path wins.
    let longest = routes
        .routes
        .iter()
        .filter(|r| r.map_path(path).is_some())
        .max_by_key(|r| r.external_path.len());
    let found = routes.find(path).map(|(i, mapped)| (&routes.routes[i], mapped));
    assert_eq!(
        found.as_ref().map(|(r, _)| &r.external_path),
        longest.map(|r| &r.external_path),
        "{path:?}"
    );
    if let Some((r, mapped)) = found {
        assert_eq!(Some(mapped), r.map_path(path));
    }
}

/// Percent-decodes once, as a lenient decoder does: a `%` without two hex
/// digits stays as it is.
fn decode(s: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(h), Some(l)) = (
                s.get(i + 1).copied().and_then(hex),
                s.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(h << 4 | l);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    out
}

/// What `check_path` promises of a path it accepts, read independently:
/// starts with `/`, no empty segment, and no segment that is `.` or `..`
/// (a path parameter cut off, trailing spaces trimmed) or holds a slash,
/// backslash or NUL, once decoded or twice.
fn check_accepted(path: &str) {
    assert!(path.starts_with('/'), "{path:?}");
    assert!(!path.contains("//"), "{path:?}");
    for segment in path.split('/') {
        let once = decode(segment.as_bytes());
        let twice = decode(&once);
        for form in [segment.as_bytes(), &once[..], &twice[..]] {
            assert!(!form.contains(&b'\\') && !form.contains(&0), "{path:?}");
            let name = form.split(|&b| b == b';').next().unwrap_or(&[]);
            let name = name.trim_ascii_end();
            assert!(name != b"." && name != b"..", "{path:?}");
        }
        assert!(!once.contains(&b'/') && !twice.contains(&b'/'), "{path:?}");
    }
}

fn check_query(query: &str) {
    // (Parameter names are never empty: a sticky route's is checked.)
    for name in ["access_token", "k"] {
        let _ = query_param(Some(query), name);
        let kept = without_param(query, name);
        // No `name` parameter is left, and every other one is kept, in
        // order, byte for byte.
        assert_eq!(query_param(Some(&kept), name), None, "{query:?}");
        let others: Vec<&str> = query
            .split('&')
            .filter(|p| {
                let key = p.split_once('=').map_or(*p, |(k, _)| k);
                query_param(Some(key), name).is_none()
            })
            .collect();
        assert_eq!(kept, others.join("&"), "{query:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.splitn(3, '\n');
    let (own, target) = match (lines.next(), lines.next(), lines.next()) {
        (Some(ext), Some(int), Some(path)) => {
            (Routes::parse(&file(&[(ext, int)]), "fuzz").ok(), path)
        }
        _ => (None, text.as_ref()),
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let accepted = check_path(path).is_ok();
    // What a request can carry (hyper refuses the rest, raw NULs and
    // control characters among them, before any route sees it).
    let from_a_request = http::uri::PathAndQuery::try_from(target)
        .is_ok_and(|pq| pq.path() == path && pq.query() == query);
    if accepted && from_a_request {
        check_accepted(path);
    }
    check_routes(&FIXED, path, accepted);
    if let Some(own) = own {
        check_routes(&own, path, accepted);
    }
    if let Some(query) = query {
        check_query(query);
    }
});
