//! `loadtest soak`: a long run at one fixed rate, measured in consecutive windows, so
//! that a slow leak or a latency drift shows as a trend instead of hiding in one
//! whole-run histogram (issue 9: 30 minutes at half the sustainable rate, resident memory
//! flat and p99 steady).
//!
//! Each window is an ordinary open-loop run (`measured`) over the same provisioned
//! tenants; the next starts when the last answer of the previous one is in. The verdict
//! compares windows after the first (which includes warm-up): the resident-memory trend
//! as a least-squares slope in MiB per hour, and the spread of the windows' p99.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use crate::{measured, run_id, target, Ready};

/// Longest soak: 4 hours.
const DURATION_S_MAX: u64 = 4 * 3600;
/// Window bounds, seconds.
const WINDOW_S_MIN: u64 = 1;
const WINDOW_S_MAX: u64 = 600;

/// The soak's shape.
#[derive(clap::Args, Clone, Debug)]
pub struct SoakArgs {
    /// Requests per second offered throughout.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Total seconds of load (at most 4 hours).
    #[arg(long, default_value_t = 1800)]
    duration_s: u64,
    /// Seconds per measured window.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    /// Write the windows and the verdict as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One window's figures.
struct Window {
    end_s: f64,
    achieved: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Service time p99 (from the actual send): far below `p99_ms` means the requests
    /// were sent late (the generator or the machine stalled), not served slowly.
    svc_p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    answered: u64,
    errors: u64,
    /// The errors by op and outcome ("create 402"), so a window's errors have a cause.
    errors_by_op: std::collections::BTreeMap<String, u64>,
    cpu_cores: Option<f64>,
    rss_bytes: Option<u64>,
    /// The load generator's own CPU (it shares the machine: a saturated generator
    /// would show as server latency).
    gen_cores: f64,
    /// Server threads at the window's end.
    threads: Option<u64>,
    /// Mean `fdatasync` of the window and the longest one since the start, ms.
    fsync_ms_mean: Option<f64>,
    fsync_ms_max: Option<f64>,
}

/// The WAL's sync figures from the metrics page: (calls, seconds, longest seconds).
async fn fsync_figures(r: &Ready) -> Option<(f64, f64, f64)> {
    let text = target::metrics_text(&r.http, &r.base).await?;
    Some((
        target::metric(&text, "reelbatch_wal_fsyncs_total")?,
        target::metric(&text, "reelbatch_wal_fsync_seconds_total")?,
        target::metric(&text, "reelbatch_wal_fsync_seconds_max")?,
    ))
}

/// Least-squares slope of `ys` over `xs`.
fn slope(xs: &[f64], ys: &[f64]) -> Option<f64> {
    let n = xs.len() as f64;
    if xs.len() < 2 {
        return None;
    }
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    let sxy: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    (sxx > 0.0).then(|| sxy / sxx)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1_048_576.0
}

pub(crate) async fn soak(r: Ready, a: SoakArgs) -> Result<(), String> {
    if !(a.rate > 0.0 && a.rate <= 1_000_000.0) {
        return Err("--rate must be in (0, 1000000]".into());
    }
    let duration_s = a.duration_s.clamp(1, DURATION_S_MAX);
    let window_s = a.window_s.clamp(WINDOW_S_MIN, WINDOW_S_MAX).min(duration_s);
    let windows_n = (duration_s / window_s).max(1);
    let run = run_id();
    println!(
        "soak: {:.0} req/s for {windows_n} windows of {window_s} s, {} tenants, mix {}, funding {}",
        a.rate,
        r.tenants.len(),
        r.mix.describe(),
        r.funding.name()
    );
    println!(
        "{:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>7} {:>6} {:>9} {:>9} {:>8} {:>9} {:>9}",
        "t_s",
        "achieved",
        "p50_ms",
        "p99_ms",
        "svc_p99",
        "p99.9_ms",
        "max_ms",
        "errors",
        "cores",
        "rss_MiB",
        "gen_cores",
        "threads",
        "fsync_ms",
        "fsync_max"
    );
    let me = std::process::id();
    let started = std::time::Instant::now();
    let mut windows: Vec<Window> = Vec::with_capacity(windows_n as usize);
    for i in 0..windows_n {
        let gen0 = target::cpu_seconds(me);
        let sync0 = fsync_figures(&r).await;
        let t0 = std::time::Instant::now();
        let (s, cost) = measured(
            &r,
            a.rate,
            Duration::from_secs(window_s),
            u64::MAX,
            &format!("{run}w{i}"),
        )
        .await;
        let gen1 = target::cpu_seconds(me);
        let sync1 = fsync_figures(&r).await;
        let elapsed_s = t0.elapsed().as_secs_f64().max(1e-9);
        let (fsync_ms_mean, fsync_ms_max) = match (sync0, sync1) {
            (Some((n0, s0, _)), Some((n1, s1, max))) => (
                (n1 > n0).then(|| (s1 - s0) / (n1 - n0) * 1000.0),
                Some(max * 1000.0),
            ),
            _ => (None, None),
        };
        let all = s.rec.overall();
        let w = Window {
            end_s: started.elapsed().as_secs_f64(),
            achieved: s.achieved_rate(),
            p50_ms: all.latency_ms(0.50),
            p99_ms: all.latency_ms(0.99),
            svc_p99_ms: all.service_ms(0.99),
            p999_ms: all.latency_ms(0.999),
            max_ms: all.latency_ms(1.0),
            answered: all.count(),
            errors: all.errors(),
            errors_by_op: s.rec.errors_by_op(),
            cpu_cores: cost.cpu_cores,
            rss_bytes: cost.rss_bytes,
            gen_cores: match (gen0, gen1) {
                (Some(a), Some(b)) => (b - a) / elapsed_s,
                _ => 0.0,
            },
            threads: r.pid.and_then(target::threads),
            fsync_ms_mean,
            fsync_ms_max,
        };
        let opt = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        println!(
            "{:>8.0} {:>10.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>7} {:>6} {:>9} {:>9.2} {:>8} {:>9} {:>9}",
            w.end_s,
            w.achieved,
            w.p50_ms,
            w.p99_ms,
            w.svc_p99_ms,
            w.p999_ms,
            w.max_ms,
            w.errors,
            w.cpu_cores.map_or("-".into(), |c| format!("{c:.2}")),
            w.rss_bytes.map_or("-".into(), |b| format!("{:.1}", mib(b))),
            w.gen_cores,
            w.threads.map_or("-".into(), |t| t.to_string()),
            opt(w.fsync_ms_mean, 2),
            opt(w.fsync_ms_max, 1),
        );
        if !w.errors_by_op.is_empty() {
            let each: Vec<String> = w
                .errors_by_op
                .iter()
                .map(|(k, n)| format!("{k} ×{n}"))
                .collect();
            println!("{:>8} errors: {}", "", each.join(", "));
        }
        windows.push(w);
    }
    // The verdict, over the windows after the first (warm-up).
    let steady = if windows.len() > 1 {
        &windows[1..]
    } else {
        &windows[..]
    };
    let mut p99: Vec<f64> = steady.iter().map(|w| w.p99_ms).collect();
    p99.sort_by(f64::total_cmp);
    let p99_median = p99[p99.len() / 2];
    let (p99_min, p99_max) = (p99[0], p99[p99.len() - 1]);
    let with_rss: Vec<(f64, f64)> = steady
        .iter()
        .filter_map(|w| Some((w.end_s / 3600.0, mib(w.rss_bytes?))))
        .collect();
    let (hours, rss): (Vec<f64>, Vec<f64>) = with_rss.iter().copied().unzip();
    let rss_slope_mib_per_hour = slope(&hours, &rss);
    let answered: u64 = windows.iter().map(|w| w.answered).sum();
    let errors: u64 = windows.iter().map(|w| w.errors).sum();
    let mut verdict = format!(
        "{answered} requests answered, {errors} errors; p99 per window after the first: \
         min {p99_min:.2} ms, median {p99_median:.2} ms, max {p99_max:.2} ms\n"
    );
    if let (Some(first), Some(last), Some(sl)) = (rss.first(), rss.last(), rss_slope_mib_per_hour) {
        verdict.push_str(&format!(
            "resident memory after the first window {first:.1} MiB, at the end {last:.1} MiB \
             ({:+.1} MiB), trend {sl:+.2} MiB/hour\n",
            last - first
        ));
    }
    print!("{verdict}");
    if let Some(path) = a.json {
        let rows: Vec<Value> = windows
            .iter()
            .map(|w| {
                json!({
                    "end_s": w.end_s, "achieved": w.achieved, "p50_ms": w.p50_ms,
                    "p99_ms": w.p99_ms, "svc_p99_ms": w.svc_p99_ms, "p999_ms": w.p999_ms, "max_ms": w.max_ms,
                    "answered": w.answered, "errors": w.errors, "errors_by_op": w.errors_by_op,
                    "cpu_cores": w.cpu_cores, "rss_bytes": w.rss_bytes,
                    "gen_cores": w.gen_cores, "threads": w.threads,
                    "fsync_ms_mean": w.fsync_ms_mean, "fsync_ms_max": w.fsync_ms_max,
                })
            })
            .collect();
        let v = json!({
            "rate": a.rate, "window_s": window_s, "tenants": r.tenants.len(),
            "mix": r.mix.describe(), "windows": rows,
            "answered": answered, "errors": errors,
            "p99_ms": {"min": p99_min, "median": p99_median, "max": p99_max},
            "rss_mib_per_hour": rss_slope_mib_per_hour,
            "funding": r.books.json(r.funding),
        });
        std::fs::write(&path, format!("{v:#}\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(sp) = r.spawned {
        sp.stop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn slope_of_a_line_and_of_a_flat_series() {
        let xs = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(slope(&xs, &[1.0, 3.0, 5.0, 7.0]), Some(2.0));
        assert_eq!(slope(&xs, &[4.0; 4]), Some(0.0));
        assert_eq!(slope(&[1.0], &[1.0]), None);
        assert_eq!(slope(&[1.0, 1.0], &[1.0, 2.0]), None);
    }
}
