//! Choosing a backend: smooth weighted round robin, consistent hashing for
//! sticky routes, a circuit breaker fed by connect failures, and the
//! results of active health checks.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::routes::{Backend, Balance, Route};

/// Live state of one backend of one route.
#[derive(Debug)]
pub struct BackendState {
    /// The configured backend.
    pub backend: Backend,
    /// `host:port`, precomputed for labels.
    pub label: String,
    /// Consecutive connect failures.
    failures: AtomicU32,
    /// While set (milliseconds since `epoch`), the breaker is open.
    open_until_ms: AtomicU64,
    /// Last active health check result (true until a check fails).
    pub healthy: AtomicBool,
    /// Connections currently proxied to it.
    pub open: AtomicUsize,
    epoch: Instant,
}

impl BackendState {
    fn new(backend: Backend, epoch: Instant) -> Self {
        Self {
            label: backend.authority(),
            backend,
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            open: AtomicUsize::new(0),
            epoch,
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// True while the breaker keeps new connections away.
    pub fn circuit_open(&self) -> bool {
        self.open_until_ms.load(Ordering::Relaxed) > self.now_ms()
    }

    /// Usable for a new connection: healthy and breaker closed (or its
    /// cool-down over, which lets one trial through).
    pub fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.circuit_open()
    }

    /// A connect succeeded: close the breaker.
    pub fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.open_until_ms.store(0, Ordering::Relaxed);
    }

    /// A connect failed: open the breaker after `threshold` in a row. A
    /// failed trial after the cool-down opens it again at once.
    pub fn failure(&self, threshold: u32, cooldown: Duration) -> bool {
        let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= threshold {
            self.open_until_ms.store(
                self.now_ms() + cooldown.as_millis() as u64,
                Ordering::Relaxed,
            );
            true
        } else {
            false
        }
    }
}

/// Live state of one route: its backends and balancer.
#[derive(Debug)]
pub struct RouteState {
    /// The validated route.
    pub route: Route,
    /// One entry per configured backend, in file order.
    pub backends: Vec<Arc<BackendState>>,
    /// Smooth weighted round robin: current weight per backend.
    current: Mutex<Vec<i64>>,
    /// Connections open through this route (shared with the state this one
    /// replaced on reload, so `max_connections` counts them all).
    pub open: Arc<AtomicUsize>,
}

impl RouteState {
    /// State for `route`. On reload, `previous` is the state of the route
    /// with the same `external_path` before: a backend configured exactly as
    /// before keeps its state (health, breaker, open connections), and the
    /// route keeps its connection count.
    pub fn new(route: Route, previous: Option<&RouteState>) -> Self {
        let epoch = Instant::now();
        let backends: Vec<_> = route
            .backends
            .iter()
            .map(|b| {
                let kept = previous
                    .and_then(|p| p.backends.iter().find(|old| old.backend == *b))
                    .cloned();
                if let Some(state) = &kept
                    && route.health_check.is_none()
                {
                    // Nothing would ever check it again.
                    state.healthy.store(true, Ordering::Relaxed);
                }
                kept.unwrap_or_else(|| Arc::new(BackendState::new(b.clone(), epoch)))
            })
            .collect();
        Self {
            current: Mutex::new(vec![0; backends.len()]),
            backends,
            route,
            open: previous.map(|p| p.open.clone()).unwrap_or_default(),
        }
    }

    /// Backends to try for a new connection, best first (the rest are the
    /// retry order). Empty when none is available.
    pub fn candidates(&self, sticky_key: Option<&str>) -> Vec<Arc<BackendState>> {
        let available: Vec<usize> = (0..self.backends.len())
            .filter(|&i| self.backends[i].available())
            .collect();
        if available.is_empty() {
            return Vec::new();
        }
        let order: Vec<usize> = match (sticky_key, self.route.balance) {
            (Some(key), _) => self.rendezvous(key, &available),
            (None, Balance::RoundRobin) => self.round_robin(&available),
            (None, Balance::LeastConnections) => self.least_connections(&available),
        };
        order
            .into_iter()
            .map(|i| self.backends[i].clone())
            .collect()
    }

    /// Smooth weighted round robin (as nginx does it): every pick adds each
    /// weight to its counter, takes the largest and subtracts the total.
    /// Spreads picks evenly, e.g. weights 5,1,1 give a,a,b,a,c,a,a.
    fn round_robin(&self, available: &[usize]) -> Vec<usize> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let total: i64 = available
            .iter()
            .map(|&i| i64::from(self.backends[i].backend.weight))
            .sum();
        let mut best = available[0];
        for &i in available {
            current[i] += i64::from(self.backends[i].backend.weight);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        drop(current);
        let mut order = vec![best];
        let mut rest: Vec<usize> = available.iter().copied().filter(|&i| i != best).collect();
        rest.sort_by_key(|&i| std::cmp::Reverse(self.backends[i].backend.weight));
        order.extend(rest);
        order
    }

    /// Fewest open connections per unit of weight first: round robin
    /// among the least loaded (so a burst of connects still spreads), then
    /// the others from least to most loaded as the retry order.
    fn least_connections(&self, available: &[usize]) -> Vec<usize> {
        // One reading of the counters: they move under our feet, and a sort
        // must compare fixed values.
        let loads: Vec<(usize, u128, u128)> = available
            .iter()
            .map(|&i| {
                let b = &self.backends[i];
                (
                    i,
                    b.open.load(Ordering::Relaxed) as u128,
                    u128::from(b.backend.weight),
                )
            })
            .collect();
        // open_a / weight_a < open_b / weight_b, without floats.
        let lighter =
            |a: &(usize, u128, u128), b: &(usize, u128, u128)| (a.1 * b.2).cmp(&(b.1 * a.2));
        let Some(least) = loads.iter().min_by(|a, b| lighter(a, b)).copied() else {
            return Vec::new();
        };
        let tied: Vec<usize> = loads
            .iter()
            .filter(|l| lighter(l, &least).is_eq())
            .map(|l| l.0)
            .collect();
        let mut order = self.round_robin(&tied);
        let mut rest: Vec<_> = loads.into_iter().filter(|l| !tied.contains(&l.0)).collect();
        rest.sort_by(lighter);
        order.extend(rest.into_iter().map(|l| l.0));
        order
    }

    /// Weighted rendezvous hashing: each backend scores the key, highest
    /// wins. A backend leaving moves only its own keys; the order doubles as
    /// the failover order.
    fn rendezvous(&self, key: &str, available: &[usize]) -> Vec<usize> {
        let mut scored: Vec<(f64, usize)> = available
            .iter()
            .map(|&i| {
                let b = &self.backends[i];
                let h = fnv1a(key.as_bytes(), b.label.as_bytes());
                // Map the hash to (0,1) and weight it: -w / ln(u).
                let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                (-(f64::from(b.backend.weight)) / u.ln(), i)
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        scored.into_iter().map(|(_, i)| i).collect()
    }
}

/// 64-bit FNV-1a over key and backend, finished with a mixer so similar
/// inputs spread well.
fn fnv1a(a: &[u8], b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in a.iter().chain([0u8].iter()).chain(b.iter()) {
        h ^= u64::from(*byte);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    // splitmix64 finaliser
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::routes::Routes;

    fn route(weights: &[u32]) -> RouteState {
        let backends: Vec<String> = weights
            .iter()
            .enumerate()
            .map(|(i, w)| format!(r#"{{"host":"ws://b{i}","port":80,"weight":{w}}}"#))
            .collect();
        let text = format!(
            r#"{{"version":1,"routers":[{{"protocol":"websocket","backends":[{}],"external_path":"/x","internal_path":"/","methods":["GET"]}}]}}"#,
            backends.join(",")
        );
        let routes = Routes::parse(&text, "t").expect("valid");
        RouteState::new(routes.routes[0].clone(), None)
    }

    fn labels(order: &[Arc<BackendState>]) -> Vec<&str> {
        order.iter().map(|b| b.backend.host.as_str()).collect()
    }

    #[test]
    fn least_connections_survives_counters_moving_during_the_pick() {
        let weights = vec![1; 64];
        let mut state = route(&weights);
        state.route.balance = Balance::LeastConnections;
        let state = Arc::new(state);
        let stop = Arc::new(AtomicBool::new(false));
        let mover = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    n = n.wrapping_mul(31).wrapping_add(7);
                    state.backends[n % 64].open.store(n % 13, Ordering::Relaxed);
                }
            })
        };
        for _ in 0..2_000 {
            assert_eq!(state.candidates(None).len(), 64);
        }
        stop.store(true, Ordering::Relaxed);
        mover.join().expect("mover");
    }

    #[test]
    fn a_backend_whose_route_loses_its_health_check_on_reload_comes_back() {
        let old = route(&[1, 1]);
        old.backends[0].healthy.store(false, Ordering::Relaxed);
        assert_eq!(old.candidates(None).len(), 1);
        let new = RouteState::new(old.route.clone(), Some(&old));
        assert!(
            Arc::ptr_eq(&new.backends[0], &old.backends[0]),
            "state kept"
        );
        assert_eq!(
            new.candidates(None).len(),
            2,
            "no check would ever restore it"
        );
    }

    #[test]
    fn least_connections_weighs_open_connections_and_breaks_ties_in_turn() {
        let mut state = route(&[1, 1, 2]);
        state.route.balance = Balance::LeastConnections;
        for (b, open) in state.backends.iter().zip([3, 0, 4]) {
            b.open.store(open, Ordering::Relaxed);
        }
        // Loads 3/1, 0/1, 4/2: b1 first, then b2 (2 per weight), then b0.
        assert_eq!(labels(&state.candidates(None)), ["b1", "b2", "b0"]);
        // All equal: the round robin decides, so picks still rotate.
        for (b, open) in state.backends.iter().zip([1, 1, 2]) {
            b.open.store(open, Ordering::Relaxed);
        }
        let firsts: std::collections::HashSet<String> = (0..4)
            .map(|_| labels(&state.candidates(None))[0].to_owned())
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }

    #[test]
    fn weighted_round_robin_follows_the_weights_smoothly() {
        let r = route(&[5, 1, 1]);
        let picks: Vec<String> = (0..7)
            .map(|_| r.candidates(None)[0].backend.host.clone())
            .collect();
        assert_eq!(picks, ["b0", "b0", "b1", "b0", "b2", "b0", "b0"]);
        let r = route(&[3, 2, 1]);
        let mut counts = [0; 3];
        for _ in 0..600 {
            let h = r.candidates(None)[0].backend.host.clone();
            counts[h[1..].parse::<usize>().expect("index")] += 1;
        }
        assert_eq!(counts, [300, 200, 100]);
    }

    #[test]
    fn sticky_keys_stay_put_and_move_only_when_their_backend_goes() {
        let r = route(&[1, 1, 1]);
        let first = |key: &str| r.candidates(Some(key))[0].backend.host.clone();
        let before: Vec<String> = (0..300).map(|k| first(&format!("user-{k}"))).collect();
        assert_eq!(
            before,
            (0..300)
                .map(|k| first(&format!("user-{k}")))
                .collect::<Vec<_>>()
        );
        // Roughly even spread.
        for b in ["b0", "b1", "b2"] {
            let n = before.iter().filter(|h| *h == b).count();
            assert!((60..=140).contains(&n), "{b}: {n}");
        }
        // Take b1 out: only its keys move.
        r.backends[1].healthy.store(false, Ordering::Relaxed);
        for (k, old) in before.iter().enumerate() {
            let now = first(&format!("user-{k}"));
            if old != "b1" {
                assert_eq!(&now, old);
            } else {
                assert_ne!(now, "b1");
            }
        }
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_skips_the_backend() {
        let r = route(&[1, 1]);
        let b0 = r.backends[0].clone();
        assert!(!b0.failure(2, Duration::from_secs(60)));
        assert!(b0.failure(2, Duration::from_secs(60)));
        assert!(b0.circuit_open());
        for _ in 0..5 {
            let c = r.candidates(None);
            assert_eq!(c.len(), 1);
            assert_eq!(c[0].backend.host, "b1");
        }
        b0.success();
        assert!(!b0.circuit_open());
        assert_eq!(r.candidates(None).len(), 2);
    }
}
