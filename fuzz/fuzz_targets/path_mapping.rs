//! `upstream::check_path`, `routes::normalized`, `Route::map_path` and
//! `Routes::find` on any request path, and the query helpers on its query.
//!
//! Input: a request path (UTF-8, lossy), optionally `?` and a query; or
//! three lines, `external_path`, `internal_path` and the path, to try a
//! route of the input's own beside the fixed ones.
//!
//! Checked: a route takes a path whose segments, decoded and without their
//! `;` parameters, start with its external path's, decoded (so no spelling
//! of a route's path reaches a broader route), and refuses it when its own
//! segments carry a `;`; `map_path` gives the route's internal path joined
//! to the rest with exactly one `/` (no `//` from a path and route without
//! one); `find` takes the longest matching external path, decoded; what
//! `check_path` accepts of what a request can carry has no `.` or `..`
//! segment, no segment that is only a `;` parameter, nor a slash,
//! backslash or NUL, once or twice decoded, and its normal form decodes to
//! the same bytes, escapes no unreserved character, in upper-case hex, and
//! is its own normal form; a query without its `access_token` keeps every
//! other parameter.

#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use wsproxy::upstream::routes::{Route, Routes, normalized};
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

/// What `map_path` must give, read independently: `None` unless the
/// path's segments, each decoded and cut at its first `;`, start with the
/// external path's, decoded (a trailing `/` asks for one more segment,
/// whatever it is); refused when the segments so taken carry a `;`;
/// otherwise `internal_path` (less a trailing `/`), one `/`, and the rest
/// of the path as it is (less a leading `/`), or `internal_path` itself
/// when nothing follows.
fn expected(route: &Route, path: &str) -> Option<Result<String, ()>> {
    let names: Vec<&str> = route.external_path.strip_prefix('/')?.split('/').collect();
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    if segments.len() < names.len() {
        return None;
    }
    let open = names.last() == Some(&"");
    let taken = if open { names.len() - 1 } else { names.len() };
    for (name, segment) in names.iter().zip(&segments).take(taken) {
        let key = decode(segment.as_bytes());
        let key = key.split(|&b| b == b';').next().unwrap_or(&[]);
        if key != decode(name.as_bytes()) {
            return None;
        }
    }
    let mut own = 1 + segments[..taken].iter().map(|s| s.len() + 1).sum::<usize>();
    if !open {
        own -= 1;
    } else if taken == 0 {
        own = 1;
    }
    let own = own.min(path.len());
    if decode(path[..own].as_bytes()).contains(&b';') {
        return Some(Err(()));
    }
    let rest = &path[own..];
    if rest.is_empty() {
        return Some(Ok(route.internal_path.clone()));
    }
    let internal = route.internal_path.as_str();
    let base = internal.strip_suffix('/').unwrap_or(internal);
    Some(Ok(format!(
        "{base}/{}",
        rest.strip_prefix('/').unwrap_or(rest)
    )))
}

fn check_routes(routes: &Routes, path: &str, accepted: bool) {
    for route in &routes.routes {
        let mapped = route.map_path(path).map(|m| m.map_err(|_| ()));
        assert_eq!(mapped, expected(route, path), "{route:?} {path:?}");
        let Some(Ok(mapped)) = mapped else { continue };
        assert!(mapped.starts_with('/'), "{mapped:?}");
        if accepted && !route.internal_path.contains("//") {
            assert!(!mapped.contains("//"), "{path:?} -> {mapped:?}");
        }
    }
    // The longest matching external path (decoded) wins.
    let longest = routes
        .routes
        .iter()
        .filter(|r| r.map_path(path).is_some())
        .max_by_key(|r| decode(r.external_path.as_bytes()).len());
    let found = routes
        .find(path)
        .map(|(i, mapped)| (&routes.routes[i], mapped));
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
            assert!(!name.is_empty() || form.is_empty(), "{path:?}");
            let name = name.trim_ascii_end();
            assert!(name != b"." && name != b"..", "{path:?}");
        }
        assert!(!once.contains(&b'/') && !twice.contains(&b'/'), "{path:?}");
    }
}

/// What the normal form of an accepted path promises: the same bytes once
/// decoded, no escape of an unreserved character, upper-case hex, and
/// nothing more to normalise.
fn check_normalized(path: &str, normal: &str) {
    assert_eq!(
        decode(normal.as_bytes()),
        decode(path.as_bytes()),
        "{path:?}"
    );
    let b = normal.as_bytes();
    for (i, _) in normal.match_indices('%') {
        let escape = &b[i + 1..i + 3];
        assert!(
            escape
                .iter()
                .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
            "{normal:?}"
        );
        let byte = decode(&b[i..i + 3])[0];
        assert!(
            !(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)),
            "{normal:?}"
        );
    }
    assert_eq!(normalized(normal), normal, "{path:?}");
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
    let normal = normalized(path);
    if accepted && from_a_request {
        check_accepted(path);
        check_normalized(path, &normal);
    }
    // Routes are found on the normal form (as `upstream::handle` does), and
    // on the path as it came, which must not change which route takes it.
    for path in [path, &normal] {
        check_routes(&FIXED, path, accepted);
        if let Some(own) = &own {
            check_routes(own, path, accepted);
        }
    }
    if accepted {
        let route = |p: &str| FIXED.find(p).map(|(i, _)| i);
        assert_eq!(route(path), route(&normal), "{path:?}");
    }
    if let Some(query) = query {
        check_query(query);
    }
});
