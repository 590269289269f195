//! Which route takes a request path, and the path the backend gets.
//!
//! A route is matched as its backend will read the path, or wsproxy and the
//! backend could disagree about which route a request is for: with the
//! routes `/admin` (`auth_required`) and `/` (open) to one backend, a byte
//! compare sent `/%61dmin` through `/`, and the backend, which decodes it,
//! served `/admin` without a token. So segments compare *decoded*
//! (`%61dmin`, `%C3%A9` and `é` each read as the backend reads them), and
//! without their `;` parameters (`admin;x` is `admin` to a servlet
//! container). The backend gets the path in the normal form of RFC 3986
//! section 6.2.2 ([`normalized`]), after the route's prefix is replaced by
//! its `internal_path`. Matching is case-sensitive, as RFC 3986 makes paths
//! (`/Admin` is not `/admin`).

use std::borrow::Cow;

use super::{Route, Routes};

/// Why a route refuses a path it takes (400 `bad_path`).
pub const PARAMETER_IN_PREFIX: &str = "the path may not carry a ;parameter in the segments of the route it takes (a route's own segments are replaced by its internal path)";

fn hex(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// The byte a `%XX` escape at the start of `s` stands for.
fn escaped(s: &[u8]) -> Option<u8> {
    match s {
        [b'%', h, l, ..] => Some(hex(*h)? << 4 | hex(*l)?),
        _ => None,
    }
}

/// An unreserved character (RFC 3986 section 2.3): its escape and itself
/// are the same path.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The bytes of `s` with its `%XX` escapes decoded; a `%` that starts none
/// stays as it is (`upstream::check_path` refuses such a path).
pub(crate) fn decoded(s: &str) -> impl Iterator<Item = u8> + '_ {
    let b = s.as_bytes();
    let mut i = 0;
    std::iter::from_fn(move || {
        let rest = b.get(i..)?;
        match escaped(rest) {
            Some(byte) => {
                i += 3;
                Some(byte)
            }
            None => {
                i += 1;
                rest.first().copied()
            }
        }
    })
}

/// `path` in the normal form of RFC 3986 section 6.2.2: the escape of an
/// unreserved character decoded (`%61` is `a`, `%7E` is `~`), the hex
/// digits of every other escape in upper case (`%3b` is `%3B`), nothing
/// else changed (an escaped reserved character stays escaped). A `%` that
/// starts no escape stays as it is.
pub fn normalized(path: &str) -> Cow<'_, str> {
    if !path.contains('%') {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        match escaped(from.as_bytes()) {
            Some(b) if unreserved(b) => out.push(char::from(b)),
            Some(_) => {
                out.push('%');
                out.push_str(&from.get(1..3).unwrap_or_default().to_ascii_uppercase());
            }
            None => {
                out.push('%');
                rest = from.get(1..).unwrap_or_default();
                continue;
            }
        }
        rest = from.get(3..).unwrap_or_default();
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// A request segment as a route compares it: decoded, without its `;`
/// parameters.
fn segment_key(segment: &str) -> impl Iterator<Item = u8> + '_ {
    decoded(segment).take_while(|&b| b != b';')
}

impl Route {
    /// Where this route's own part of `path` ends, if the route takes the
    /// path: after the segments of `external_path` (compared decoded, a
    /// request segment without its `;` parameters), and after the `/` that
    /// follows them when `external_path` ends with one.
    fn prefix_end(&self, path: &str) -> Option<usize> {
        let external = self.external_path.strip_prefix('/')?;
        let (named, open) = match external.strip_suffix('/') {
            Some(named) => (named, true),
            None => (external, false),
        };
        // What follows the segments taken so far.
        let mut rest = path.strip_prefix('/')?;
        for (k, name) in named.split('/').filter(|n| !n.is_empty()).enumerate() {
            if k > 0 {
                rest = rest.strip_prefix('/')?;
            }
            let segment = rest.split('/').next().unwrap_or_default();
            if !segment_key(segment).eq(decoded(name)) {
                return None;
            }
            rest = rest.get(segment.len()..)?;
        }
        if open {
            // `/app/` takes `/app/` and what follows, not `/app`.
            rest = rest.strip_prefix('/')?;
        }
        Some(path.len() - rest.len())
    }

    /// The backend path for a client path (in normal form, see
    /// [`normalized`]), if this route takes it: the route's
    /// `internal_path`, followed by what comes after the route's own
    /// segments, joined by exactly one `/`. Nothing else of the client's
    /// path is changed (no slash is dropped or added inside it, a `;`
    /// parameter after the route's segments stays), so the backend sees the
    /// same segments the route matched; a path with empty segments is
    /// refused before it gets here (see `upstream::check_path`).
    ///
    /// `Some(Err(_))` when the route takes the path but refuses it: a `;`
    /// parameter on the route's own segments would be lost with them, and
    /// is more likely to be a way around a route than a need.
    pub fn map_path(&self, path: &str) -> Option<Result<String, &'static str>> {
        let end = self.prefix_end(path)?;
        let (own, rest) = path.split_at(end);
        if decoded(own).any(|b| b == b';') {
            return Some(Err(PARAMETER_IN_PREFIX));
        }
        if rest.is_empty() {
            return Some(Ok(self.internal_path.clone()));
        }
        // One separator between the two halves, whichever of them had it.
        let base = self
            .internal_path
            .strip_suffix('/')
            .unwrap_or(&self.internal_path);
        let tail = rest.strip_prefix('/').unwrap_or(rest);
        Some(Ok(format!("{base}/{tail}")))
    }
}

impl Routes {
    /// The route for a request path (in normal form, see [`normalized`]),
    /// most specific first: its position in [`Self::routes`] (where the
    /// proxy keeps each route's live state too), and the path mapped to its
    /// `internal_path` or why the route refuses it (see
    /// [`Route::map_path`]).
    pub fn find(&self, path: &str) -> Option<(usize, Result<String, &'static str>)> {
        self.routes
            .iter()
            .enumerate()
            .find_map(|(i, r)| r.map_path(path).map(|mapped| (i, mapped)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::validate::tests::{OK, file};
    use super::*;

    fn mapped(r: &Route, path: &str) -> Option<String> {
        r.map_path(path).map(|m| m.expect("not refused"))
    }

    #[test]
    fn paths_map_exactly_or_by_prefix() {
        let r = Routes::parse(&file(OK), "t").expect("valid");
        let find = |p: &str| r.find(p).map(|(_, m)| m.expect("not refused"));
        assert_eq!(find("/ws/chat"), Some("/ws".to_owned()));
        assert_eq!(find("/ws/chat/room1"), Some("/ws/room1".to_owned()));
        assert!(r.find("/ws/chatter").is_none());
        assert!(r.find("/other").is_none());
    }

    fn route(external: &str, internal: &str) -> Route {
        let f = file(&OK.replace("/ws/chat", external).replace(
            r#""internal_path":"/ws""#,
            &format!(r#""internal_path":"{internal}""#),
        ));
        Routes::parse(&f, "t").expect("valid").routes.remove(0)
    }

    #[test]
    fn a_mapped_path_keeps_its_leading_slash_and_every_segment() {
        // A catch-all route forwards the path as it came, slash included.
        let all = route("/", "/");
        assert_eq!(mapped(&all, "/foo/bar").as_deref(), Some("/foo/bar"));
        assert_eq!(mapped(&all, "/").as_deref(), Some("/"));
        assert_eq!(
            mapped(&route("/", "/in"), "/foo").as_deref(),
            Some("/in/foo")
        );
        assert_eq!(
            mapped(&route("/", "/in/"), "/foo").as_deref(),
            Some("/in/foo")
        );
        // A prefix route with a trailing slash joins with one slash.
        let pre = route("/app/", "/in/");
        assert_eq!(mapped(&pre, "/app/x").as_deref(), Some("/in/x"));
        assert_eq!(mapped(&pre, "/app/").as_deref(), Some("/in/"));
        assert_eq!(mapped(&pre, "/app"), None);
        assert_eq!(mapped(&pre, "/apps/x"), None);
        // Extra slashes are not folded away: the backend sees the empty
        // segment the route saw (and check_path refuses such paths).
        let good = route("/good", "/in/good");
        assert_eq!(
            mapped(&good, "/good//secret").as_deref(),
            Some("/in/good//secret")
        );
        assert_eq!(
            mapped(&good, "/good/secret").as_deref(),
            Some("/in/good/secret")
        );
        assert_eq!(mapped(&good, "/goodness"), None);
        assert_eq!(mapped(&good, "/"), None);
        assert_eq!(mapped(&route("/a/b", "/in"), "/a"), None);
        assert_eq!(mapped(&route("/a/b", "/in"), "/a/bc"), None);
        assert_eq!(
            mapped(&route("/a/b", "/in"), "/a/b/c").as_deref(),
            Some("/in/c")
        );
    }

    /// Security review, finding 1: `/%61dmin` missed the route `/admin`
    /// (compared byte for byte) and went to a broader open route, to a
    /// backend that decodes it to `/admin`; `/admin;x` the same, to a
    /// backend that drops a segment's `;` parameters.
    #[test]
    fn a_route_takes_every_spelling_of_its_segments() {
        let admin = route("/admin", "/in");
        for path in ["/admin", "/%61dmin", "/ad%6d%69n", "/%61%64%6D%69%6E"] {
            assert_eq!(mapped(&admin, path).as_deref(), Some("/in"), "{path}");
        }
        assert_eq!(
            mapped(&admin, "/%61dmin/x%3By").as_deref(),
            Some("/in/x%3By")
        );
        // Case matters: `/Admin` is another path.
        assert_eq!(mapped(&admin, "/Admin"), None);
        assert_eq!(mapped(&admin, "/%41dmin"), None);
        // A parameter on the route's own segments: taken, and refused.
        for path in [
            "/admin;x",
            "/admin;jsessionid=1/x",
            "/admin%3Bx",
            "/%61dmin;",
        ] {
            assert_eq!(
                admin.map_path(path),
                Some(Err(PARAMETER_IN_PREFIX)),
                "{path}"
            );
        }
        // After them it stays as it came.
        assert_eq!(mapped(&admin, "/admin/x;y").as_deref(), Some("/in/x;y"));
        assert_eq!(
            mapped(&route("/", "/"), "/a;b/c").as_deref(),
            Some("/a;b/c")
        );
        // Reserved characters and others match in any spelling, as a
        // backend decodes them.
        let verb = route("/v1/rooms:join", "/in");
        assert_eq!(mapped(&verb, "/v1/rooms%3Ajoin").as_deref(), Some("/in"));
        assert_eq!(
            mapped(&verb, "/v1/rooms%3ajoin/x").as_deref(),
            Some("/in/x")
        );
        let cafe = route("/caf%C3%A9", "/in");
        for path in ["/caf%C3%A9", "/caf%c3%a9", "/caf\u{e9}"] {
            assert_eq!(mapped(&cafe, path).as_deref(), Some("/in"), "{path}");
        }
    }

    #[test]
    fn the_most_specific_route_wins_whatever_the_spelling() {
        let f = file(&format!(
            "{},{},{}",
            OK.replace("/ws/chat", "/")
                .replace(r#""internal_path":"/ws""#, r#""internal_path":"/all""#),
            OK.replace("/ws/chat", "/admin")
                .replace(r#""internal_path":"/ws""#, r#""internal_path":"/admin""#),
            OK.replace("/ws/chat", "/a%3A/b")
                .replace(r#""internal_path":"/ws""#, r#""internal_path":"/ab""#),
        ));
        let r = Routes::parse(&f, "t").expect("valid");
        let find = |p: &str| r.find(p).and_then(|(_, m)| m.ok());
        assert_eq!(find("/%61dmin/x").as_deref(), Some("/admin/x"));
        assert_eq!(find("/adminx").as_deref(), Some("/all/adminx"));
        assert_eq!(find("/a:/b/c").as_deref(), Some("/ab/c"));
        assert_eq!(find("/a:/c").as_deref(), Some("/all/a:/c"));
        assert_eq!(
            r.find("/admin;x").map(|(_, m)| m),
            Some(Err(PARAMETER_IN_PREFIX))
        );
    }

    #[test]
    fn paths_are_normalized_as_rfc_3986_says() {
        for (path, normal) in [
            ("/plain/path", "/plain/path"),
            ("/%61dmin", "/admin"),
            ("/%41%5a%30%39%2D%2E%5F%7E", "/AZ09-._~"),
            ("/a%3bb%2fc%3F", "/a%3Bb%2Fc%3F"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/%25%32%65", "/%252e"),
            ("/stray%", "/stray%"),
            ("/%zz%4", "/%zz%4"),
            ("/\u{e9}%e9", "/\u{e9}%E9"),
        ] {
            assert_eq!(normalized(path), normal, "{path}");
        }
        assert!(matches!(normalized("/x"), Cow::Borrowed("/x")));
    }
}
