//! Routing: Host, then the longest path prefix on segment boundaries.
//!
//! Routes that name a host are tried first (as nginx's virtual servers);
//! routes without a host serve every other request. Within a group the
//! longest matching prefix wins.

use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use crate::config::RouteConfig;

pub struct Route {
    pub cfg: RouteConfig,
    /// Per upstream: its slot in the connection pool (set by the proxy).
    pub slots: Vec<usize>,
    /// Its place in the router (set by the proxy: metrics, access log).
    pub index: usize,
    next: AtomicUsize,
    /// Per upstream: Unix ms until which it is skipped after a failure.
    down_until: Vec<AtomicI64>,
}

/// How long an upstream that refused a connection is skipped.
pub const FAIL_TIMEOUT_MS: i64 = 10_000;

impl Route {
    pub fn new(cfg: RouteConfig) -> Route {
        let n = cfg.upstreams.len();
        Route {
            cfg,
            slots: vec![0; n],
            index: 0,
            next: AtomicUsize::new(0),
            down_until: (0..n).map(|_| AtomicI64::new(0)).collect(),
        }
    }

    /// The order in which to try upstreams for one request: round-robin
    /// start, upstreams marked down moved to the end (each tried once).
    /// `now` is called only when there is a choice (one upstream needs no
    /// clock read).
    pub fn upstream_order(&self, now: impl FnOnce() -> i64) -> std::borrow::Cow<'static, [usize]> {
        let n = self.cfg.upstreams.len();
        if n == 1 {
            return std::borrow::Cow::Borrowed(&[0]);
        }
        let now = now();
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let (live, down): (Vec<usize>, Vec<usize>) =
            (0..n).partition(|&i| self.down_until[i].load(Ordering::Relaxed) <= now);
        // The round-robin runs over the live upstreams, so that they share
        // a down one's requests evenly (as nginx spreads over its live
        // peers); the down ones follow, in turn too.
        let rotated = |v: &[usize]| -> Vec<usize> {
            match v.len() {
                0 => Vec::new(),
                len => {
                    let start = turn % len;
                    v[start..].iter().chain(&v[..start]).copied().collect()
                }
            }
        };
        let mut order = rotated(&live);
        order.extend(rotated(&down));
        std::borrow::Cow::Owned(order)
    }

    pub fn mark_down(&self, i: usize, now: i64) {
        self.down_until[i].store(now + FAIL_TIMEOUT_MS, Ordering::Relaxed);
    }

    pub fn mark_up(&self, i: usize) {
        if self.down_until[i].load(Ordering::Relaxed) != 0 {
            self.down_until[i].store(0, Ordering::Relaxed);
        }
    }
}

pub struct Router {
    pub routes: Vec<Route>,
    /// The header names of every route's `forward` table, once each:
    /// removed from every request on every route (SPEC 3.1).
    pub forward_names: Vec<http::HeaderName>,
}

/// Whether `path` is under `prefix` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

impl Router {
    pub fn new(routes: Vec<RouteConfig>) -> Router {
        let mut forward_names: Vec<http::HeaderName> = Vec::new();
        for (name, _) in routes.iter().flat_map(|r| &r.forward) {
            if !forward_names.contains(name) {
                forward_names.push(name.clone());
            }
        }
        Router {
            routes: routes.into_iter().map(Route::new).collect(),
            forward_names,
        }
    }

    /// The route for a request, by host (without port, any case) and path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        // `app.example.com.` (the fully qualified form) is `app.example.com`,
        // as nginx takes it.
        let host = host
            .map(crate::config::strip_port)
            .map(|h| h.strip_suffix('.').unwrap_or(h));
        let mut best_host: Option<&Route> = None;
        let mut best_any: Option<&Route> = None;
        for r in &self.routes {
            if !prefix_matches(&r.cfg.path, path) {
                continue;
            }
            let slot = match (&r.cfg.host, host) {
                (Some(want), Some(h)) if want.eq_ignore_ascii_case(h) => &mut best_host,
                (Some(_), _) => continue,
                (None, _) => &mut best_any,
            };
            if slot.is_none_or(|b| b.cfg.path.len() < r.cfg.path.len()) {
                *slot = Some(r);
            }
        }
        best_host.or(best_any)
    }
}

/// `path` as the upstream sees it when the route strips its prefix.
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") => "/",
        Some(rest) => rest,
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn router(routes: &str) -> Router {
        let text = format!(
            "[server]\nlisten=\"127.0.0.1:0\"\ntls=false\n[session]\nsecret_key=\"0123456789abcdef0123456789abcdef\"\n{routes}"
        );
        Router::new(Config::parse(&text, Path::new("t.toml")).unwrap().routes)
    }

    fn name<'a>(r: &'a Router, host: Option<&str>, path: &str) -> Option<&'a str> {
        r.find(host, path).map(|r| r.cfg.name.as_str())
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = router(
            "[[route]]\nname=\"root\"\nupstream=\"http://a:1\"\n[[route]]\nname=\"app\"\npath=\"/app\"\nupstream=\"http://a:1\"\n[[route]]\nname=\"deep\"\npath=\"/app/admin/\"\nupstream=\"http://a:1\"\n",
        );
        assert_eq!(name(&r, None, "/"), Some("root"));
        assert_eq!(name(&r, None, "/app"), Some("app"));
        assert_eq!(name(&r, None, "/app/"), Some("app"));
        assert_eq!(name(&r, None, "/app/x"), Some("app"));
        assert_eq!(name(&r, None, "/apple"), Some("root"));
        assert_eq!(name(&r, None, "/app/admin"), Some("deep"));
        assert_eq!(name(&r, None, "/app/admin/users"), Some("deep"));
        assert_eq!(name(&r, None, "/app/administrator"), Some("app"));
    }

    #[test]
    fn host_routes_first_port_and_case_ignored() {
        let r = router(
            "[[route]]\nname=\"api\"\nhost=\"api.example.com\"\nupstream=\"http://a:1\"\n[[route]]\nname=\"other\"\npath=\"/v2\"\nupstream=\"http://a:1\"\n",
        );
        assert_eq!(name(&r, Some("API.example.com:8443"), "/v2/x"), Some("api"));
        assert_eq!(name(&r, Some("www.example.com"), "/v2/x"), Some("other"));
        assert_eq!(name(&r, Some("www.example.com"), "/"), None);
        assert_eq!(name(&r, None, "/"), None);
    }

    #[test]
    fn strip_prefix_cases() {
        assert_eq!(strip_prefix("/app", "/app/x"), "/x");
        assert_eq!(strip_prefix("/app", "/app"), "/");
        assert_eq!(strip_prefix("/", "/x"), "/x");
    }

    #[test]
    fn round_robin_skips_down_upstreams() {
        let r = router("[[route]]\nupstreams=[\"http://a:1\",\"http://b:1\",\"http://c:1\"]\n");
        let route = &r.routes[0];
        let firsts: Vec<usize> = (0..3).map(|_| route.upstream_order(|| 0)[0]).collect();
        assert_eq!(firsts, vec![0, 1, 2]);
        route.mark_down(1, 0);
        let mut first = [0usize; 3];
        for _ in 0..60 {
            let order = route.upstream_order(|| 0);
            assert_eq!(order.len(), 3);
            assert_eq!(order[2], 1, "down upstream tried last, once: {order:?}");
            first[order[0]] += 1;
        }
        assert_eq!(first, [30, 0, 30], "the live ones share its turns evenly");
        let firsts: Vec<usize> = (0..3)
            .map(|_| route.upstream_order(|| FAIL_TIMEOUT_MS + 1)[0])
            .collect();
        assert!(
            firsts.contains(&1),
            "back after the fail timeout: {firsts:?}"
        );
    }

    #[test]
    fn a_host_with_its_trailing_dot_meets_its_route() {
        let r = router(
            "[[route]]\nname=\"any\"\nupstream=\"http://a:1\"\n[[route]]\nname=\"app\"\nhost=\"app.example.com\"\nupstream=\"http://b:1\"\n",
        );
        for host in [
            "app.example.com",
            "app.example.com.",
            "APP.example.com.:8443",
        ] {
            assert_eq!(r.find(Some(host), "/x").unwrap().cfg.name, "app", "{host}");
        }
        assert_eq!(r.find(Some("other.test."), "/x").unwrap().cfg.name, "any");
    }

    #[test]
    fn one_upstream_needs_no_clock() {
        let r = router("[[route]]\nupstream=\"http://a:1\"\n");
        let order = r.routes[0].upstream_order(|| unreachable!("the clock was read"));
        assert_eq!(order, vec![0]);
    }
}
