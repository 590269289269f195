//! Which route takes a request path, and the path the backend gets.

use super::{Route, Routes};

impl Route {
    /// The backend path for a client path, if this route takes it: the
    /// route's `internal_path`, followed by what comes after
    /// `external_path`, joined by exactly one `/`. Nothing else of the
    /// client's path is changed (no slash is dropped or added inside it), so
    /// the backend sees the same segments the route matched; a path with
    /// empty segments is refused before it gets here (see
    /// `upstream::check_path`).
    pub fn map_path(&self, path: &str) -> Option<String> {
        let rest = path.strip_prefix(self.external_path.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/') || self.external_path.ends_with('/')) {
            return None;
        }
        if rest.is_empty() {
            return Some(self.internal_path.clone());
        }
        // One separator between the two halves, whichever of them had it.
        let base = self
            .internal_path
            .strip_suffix('/')
            .unwrap_or(&self.internal_path);
        let tail = rest.strip_prefix('/').unwrap_or(rest);
        Some(format!("{base}/{tail}"))
    }
}

impl Routes {
    /// The route for a request path, most specific first: its position in
    /// [`Self::routes`] (where the proxy keeps each route's live state too),
    /// and the path mapped to its `internal_path` (see [`Route::map_path`]).
    pub fn find(&self, path: &str) -> Option<(usize, String)> {
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

    #[test]
    fn paths_map_exactly_or_by_prefix() {
        let r = Routes::parse(&file(OK), "t").expect("valid");
        assert_eq!(r.find("/ws/chat").map(|(_, p)| p), Some("/ws".to_owned()));
        assert_eq!(
            r.find("/ws/chat/room1").map(|(_, p)| p),
            Some("/ws/room1".to_owned())
        );
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
        assert_eq!(all.map_path("/foo/bar").as_deref(), Some("/foo/bar"));
        assert_eq!(all.map_path("/").as_deref(), Some("/"));
        assert_eq!(
            route("/", "/in").map_path("/foo").as_deref(),
            Some("/in/foo")
        );
        assert_eq!(
            route("/", "/in/").map_path("/foo").as_deref(),
            Some("/in/foo")
        );
        // A prefix route with a trailing slash joins with one slash.
        let pre = route("/app/", "/in/");
        assert_eq!(pre.map_path("/app/x").as_deref(), Some("/in/x"));
        assert_eq!(pre.map_path("/app/").as_deref(), Some("/in/"));
        // Extra slashes are not folded away: the backend sees the empty
        // segment the route saw (and check_path refuses such paths).
        let good = route("/good", "/in/good");
        assert_eq!(
            good.map_path("/good//secret").as_deref(),
            Some("/in/good//secret")
        );
        assert_eq!(
            good.map_path("/good/secret").as_deref(),
            Some("/in/good/secret")
        );
        assert_eq!(good.map_path("/goodness"), None);
    }
}
