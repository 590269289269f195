//! `Routes::parse` on any text: never a panic; a file it accepts keeps the
//! promises the proxy relies on.

#![no_main]

use libfuzzer_sys::fuzz_target;
use wsproxy::upstream::routes::Routes;

/// Length of `path` with its `%XX` escapes decoded (a `%` that starts none
/// counts as itself).
fn decoded_len(path: &str) -> usize {
    let b = path.as_bytes();
    let mut n = 0;
    let mut i = 0;
    while i < b.len() {
        let escape = b[i] == b'%'
            && b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
        i += if escape { 3 } else { 1 };
        n += 1;
    }
    n
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(routes) = Routes::parse(text, "fuzz") else {
        return;
    };
    assert!(!routes.routes.is_empty());
    // Longest external path (decoded, as requests are matched) first, so
    // that the most specific route wins.
    for pair in routes.routes.windows(2) {
        assert!(decoded_len(&pair[0].external_path) >= decoded_len(&pair[1].external_path));
    }
    for r in &routes.routes {
        for p in [&r.external_path, &r.internal_path] {
            assert!(p.starts_with('/'), "{p:?}");
            assert!(!p.contains("//") && !p.contains(['?', '#']), "{p:?}");
            assert!(p.bytes().all(|b| b.is_ascii_graphic()), "{p:?}");
        }
        assert!(!r.backends.is_empty());
        for b in &r.backends {
            assert!(b.port >= 1 && (1..=1000).contains(&b.weight), "{b:?}");
            assert!(!b.host.is_empty() && !b.name.is_empty(), "{b:?}");
        }
        if r.auth_required {
            assert!(routes.jwt.is_some());
        }
        // A route's own path is routed to it, and to its internal path: no
        // other route can take it (a longer external path is no prefix of
        // it, and two routes never share one).
        let (i, mapped) = routes
            .find(&r.external_path)
            .expect("a route's own path is routed");
        let found = &routes.routes[i];
        assert_eq!(found.external_path, r.external_path);
        assert_eq!(mapped, Ok(r.internal_path.clone()));
    }
});
