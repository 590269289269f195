//! Measurements: latency histograms, the 64-byte timestamped message, and
//! the result record every scenario prints (as a table row and as JSON).

use std::sync::OnceLock;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::Serialize;

/// All timestamps are microseconds since this process-wide origin, so the
/// sender and the receivers (same process) share one monotonic clock.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Microseconds since the origin.
pub fn now_us() -> u64 {
    origin().elapsed().as_micros() as u64
}

/// Size of every benchmark message.
pub const MESSAGE_BYTES: usize = 64;

/// A 64-byte JSON message carrying its (intended) send time and a sequence
/// number: `{"t":123,"s":7,"p":"xxxx..."}`.
pub fn message(t_us: u64, seq: u64) -> String {
    let mut m = format!("{{\"t\":{t_us},\"s\":{seq},\"p\":\"");
    let pad = MESSAGE_BYTES.saturating_sub(m.len() + 2);
    m.extend(std::iter::repeat_n('x', pad));
    m.push_str("\"}");
    m
}

/// Reads the send time back out of a message without a JSON parser.
pub fn sent_at(msg: &[u8]) -> Option<u64> {
    let start = msg.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits = msg[start..].iter().take_while(|b| b.is_ascii_digit());
    let mut v: u64 = 0;
    let mut any = false;
    for d in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

/// A latency histogram in microseconds (1 us to 100 s, 3 significant digits).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 100_000_000, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Records `now - sent` for one received message.
pub fn record(h: &mut Histogram<u64>, msg: &[u8]) {
    if let Some(t) = sent_at(msg) {
        let _ = h.record(now_us().saturating_sub(t).max(1));
    }
}

/// The outcome of one scenario run against one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub target: String,
    pub connections: usize,
    /// Messages (or connects, or round trips) attempted.
    pub sent: u64,
    /// Messages (or connects, or round trips) that completed.
    pub delivered: u64,
    pub errors: u64,
    pub seconds: f64,
    /// delivered per second of wall time.
    pub rate: f64,
    /// Offered rate (messages/s), 0 for flat out.
    pub offered: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    /// RSS growth per connection (bytes), for `idle`.
    pub rss_per_conn: Option<f64>,
    /// CPU time of the measured processes per operation (µs), for `echo`
    /// with `--pids`.
    pub cpu_us_per_op: Option<f64>,
    pub note: String,
    /// A scenario's own figures beyond these (`chaos`: every count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
}

impl Report {
    pub fn with_latency(mut self, h: &Histogram<u64>) -> Self {
        if !h.is_empty() {
            self.p50_us = h.value_at_quantile(0.50);
            self.p99_us = h.value_at_quantile(0.99);
            self.p999_us = h.value_at_quantile(0.999);
            self.max_us = h.max();
        }
        self
    }

    pub fn loss(&self) -> u64 {
        self.sent.saturating_sub(self.delivered)
    }

    /// One human-readable line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<8} {:<9} n={:<6} sent={:<8} delivered={:<8} loss={:<6} errors={:<5} {:>10.0}/s",
            self.scenario,
            self.target,
            self.connections,
            self.sent,
            self.delivered,
            self.loss(),
            self.errors,
            self.rate
        );
        if self.offered > 0.0 {
            s.push_str(&format!(" (offered {:.0}/s)", self.offered));
        }
        if self.max_us > 0 {
            s.push_str(&format!(
                "  p50={} p99={} p999={} max={}",
                us(self.p50_us),
                us(self.p99_us),
                us(self.p999_us),
                us(self.max_us)
            ));
        }
        if let Some(b) = self.rss_per_conn {
            s.push_str(&format!("  rss/conn={:.0} B", b));
        }
        if let Some(u) = self.cpu_us_per_op {
            s.push_str(&format!("  cpu/op={u:.2}us"));
        }
        if !self.note.is_empty() {
            s.push_str(&format!("  [{}]", self.note));
        }
        s
    }
}

/// Formats microseconds for people.
pub fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1}ms", v as f64 / 1000.0)
    } else {
        format!("{v}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_64_bytes_and_carry_their_time() {
        let m = message(123_456_789, 42);
        assert_eq!(m.len(), MESSAGE_BYTES);
        assert_eq!(sent_at(m.as_bytes()), Some(123_456_789));
        let v: serde_json::Value = serde_json::from_str(&m).expect("valid JSON");
        assert_eq!(v["s"], 42);
        assert_eq!(sent_at(b"{\"x\":1}"), None);
    }
}
