//! What a run measured: per op, HDR histograms of the latency from the *intended* start
//! (coordinated omission corrected: a stall delays every request due during it, and each
//! of them carries the stall) and of the service time (from the moment the request was
//! actually sent), and outcomes by status. Text and JSON.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use crate::mix::{Op, OPS};

/// Largest latency recorded, in µs (a minute; slower is recorded as this).
const LATENCY_US_MAX: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds")
}

/// One op's figures.
#[derive(Clone)]
pub struct OpStats {
    /// From the intended start to the end of the answer, µs.
    pub latency_us: Histogram<u64>,
    /// From the actual send to the end of the answer, µs.
    pub service_us: Histogram<u64>,
    /// Outcomes: an HTTP status ("200") or a client error ("error: timeout").
    pub outcomes: BTreeMap<String, u64>,
}

impl Default for OpStats {
    fn default() -> Self {
        OpStats {
            latency_us: histogram(),
            service_us: histogram(),
            outcomes: BTreeMap::new(),
        }
    }
}

impl OpStats {
    /// Requests recorded.
    pub fn count(&self) -> u64 {
        self.latency_us.len()
    }

    /// Requests that did not get a 2xx.
    pub fn errors(&self) -> u64 {
        self.error_outcomes().map(|(_, v)| v).sum()
    }

    /// The outcomes that are errors (not a 2xx), with their counts.
    fn error_outcomes(&self) -> impl Iterator<Item = (&String, &u64)> {
        self.outcomes.iter().filter(|(k, _)| !k.starts_with('2'))
    }

    fn record(&mut self, latency_us: u64, service_us: u64, outcome: &str) {
        self.latency_us
            .saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
        self.service_us
            .saturating_record(service_us.clamp(1, LATENCY_US_MAX));
        *self.outcomes.entry(outcome.to_owned()).or_insert(0) += 1;
    }

    fn merge(&mut self, o: &OpStats) {
        let _ = self.latency_us.add(&o.latency_us);
        let _ = self.service_us.add(&o.service_us);
        for (k, v) in &o.outcomes {
            *self.outcomes.entry(k.clone()).or_insert(0) += v;
        }
    }

    /// A latency quantile in ms.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// A service-time quantile in ms (from the actual send: what the server and the
    /// network took, without the generator's own lateness).
    pub fn service_ms(&self, q: f64) -> f64 {
        self.service_us.value_at_quantile(q) as f64 / 1000.0
    }

    fn percentiles(h: &Histogram<u64>) -> Value {
        let ms = |v: u64| (v as f64 / 1000.0 * 100.0).round() / 100.0;
        json!({
            "p50": ms(h.value_at_quantile(0.50)),
            "p90": ms(h.value_at_quantile(0.90)),
            "p99": ms(h.value_at_quantile(0.99)),
            "p999": ms(h.value_at_quantile(0.999)),
            "max": ms(h.max()),
        })
    }

    fn json(&self) -> Value {
        json!({
            "count": self.count(),
            "errors": self.errors(),
            "outcomes": self.outcomes,
            "latency_ms": Self::percentiles(&self.latency_us),
            "service_ms": Self::percentiles(&self.service_us),
        })
    }
}

/// Everything a run recorded.
#[derive(Default, Clone)]
pub struct Recorder {
    /// Per op.
    pub ops: BTreeMap<Op, OpStats>,
}

impl Recorder {
    /// Records one request.
    pub fn record(&mut self, op: Op, latency_us: u64, service_us: u64, outcome: &str) {
        self.ops
            .entry(op)
            .or_default()
            .record(latency_us, service_us, outcome);
    }

    /// The requests that did not get a 2xx, by op and outcome ("create 402": 3): a soak
    /// window that counts errors says which, so a report can name their cause.
    pub fn errors_by_op(&self) -> BTreeMap<String, u64> {
        let mut by = BTreeMap::new();
        for (op, s) in &self.ops {
            for (outcome, n) in s.error_outcomes() {
                *by.entry(format!("{} {outcome}", op.name())).or_insert(0) += n;
            }
        }
        by
    }

    /// All ops together.
    pub fn overall(&self) -> OpStats {
        let mut all = OpStats::default();
        for s in self.ops.values() {
            all.merge(s);
        }
        all
    }
}

/// A finished run.
#[derive(Clone)]
pub struct Summary {
    /// Offered rate, requests/s.
    pub rate_target: f64,
    /// Wall time from the first due request to the last answer, s.
    pub elapsed_s: f64,
    /// Requests started.
    pub sent: u64,
    /// The recorder.
    pub rec: Recorder,
}

impl Summary {
    /// Completed requests per second.
    pub fn achieved_rate(&self) -> f64 {
        self.rec.overall().count() as f64 / self.elapsed_s.max(1e-9)
    }

    /// The run as text: one line per op.
    pub fn text(&self) -> String {
        let all = self.rec.overall();
        let mut out = format!(
            "offered {:.0} req/s for {:.1} s: {} sent, {} answered, {:.1} req/s achieved, {} errors\n",
            self.rate_target,
            self.elapsed_s,
            self.sent,
            all.count(),
            self.achieved_rate(),
            all.errors()
        );
        out.push_str(
            "op          count    p50     p90     p99    p99.9     max   (ms from intended start)  service p99  errors\n",
        );
        let line = |name: &str, s: &OpStats| {
            format!(
                "{name:<9} {:>7} {:>7.2} {:>7.2} {:>7.2} {:>8.2} {:>8.2}   {:>32.2}  {}\n",
                s.count(),
                s.latency_ms(0.5),
                s.latency_ms(0.9),
                s.latency_ms(0.99),
                s.latency_ms(0.999),
                s.latency_us.max() as f64 / 1000.0,
                s.service_us.value_at_quantile(0.99) as f64 / 1000.0,
                if s.errors() == 0 {
                    "0".to_owned()
                } else {
                    let e: Vec<String> = s
                        .outcomes
                        .iter()
                        .filter(|(k, _)| !k.starts_with('2'))
                        .map(|(k, v)| format!("{k} ×{v}"))
                        .collect();
                    e.join(", ")
                }
            )
        };
        for op in OPS {
            if let Some(s) = self.rec.ops.get(&op) {
                out.push_str(&line(op.name(), s));
            }
        }
        out.push_str(&line("all", &all));
        out
    }

    /// The run as JSON.
    pub fn json(&self) -> Value {
        let ops: serde_json::Map<String, Value> = self
            .rec
            .ops
            .iter()
            .map(|(op, s)| (op.name().to_owned(), s.json()))
            .collect();
        json!({
            "rate_target": self.rate_target,
            "elapsed_s": self.elapsed_s,
            "sent": self.sent,
            "achieved_rate": self.achieved_rate(),
            "all": self.rec.overall().json(),
            "ops": ops,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recording_merging_and_the_summary() {
        let mut r = Recorder::default();
        for i in 1..=100u64 {
            r.record(Op::Wallet, i * 1000, 500, "200");
        }
        r.record(Op::Create, 5_000, 4_000, "201");
        r.record(Op::Create, 90_000_000, 1, "error: timeout");
        let all = r.overall();
        assert_eq!(all.count(), 102);
        assert_eq!(all.errors(), 1);
        assert_eq!(
            r.errors_by_op().into_iter().collect::<Vec<_>>(),
            vec![("create error: timeout".to_owned(), 1)]
        );
        let w = &r.ops[&Op::Wallet];
        assert!(
            (w.latency_ms(0.5) - 50.0).abs() < 0.1,
            "{}",
            w.latency_ms(0.5)
        );
        // Clamped to a minute (within the histogram's 3 significant digits).
        let max_ms = r.ops[&Op::Create].latency_us.max() / 1000;
        assert!((59_900..=60_100).contains(&max_ms), "{max_ms}");
        let s = Summary {
            rate_target: 100.0,
            elapsed_s: 1.02,
            sent: 102,
            rec: r,
        };
        assert!((s.achieved_rate() - 100.0).abs() < 0.01);
        let t = s.text();
        assert!(
            t.contains("wallet") && t.contains("error: timeout ×1"),
            "{t}"
        );
        let j = s.json();
        assert_eq!(j["ops"]["create"]["errors"], 1);
        assert_eq!(j["all"]["count"], 102);
    }
}
