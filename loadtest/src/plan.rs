//! `loadtest plan`: the capacity-planning sweep.
//!
//! The offered rate grows by `--factor` per step until a step breaks the objective (p99
//! from the intended start above `--slo-p99-ms`, errors above `--errors-max`, or less
//! than 95 % of the offered rate achieved); two bisection steps then narrow the highest
//! rate that holds. The report (`report.md`, `latency.png`, `throughput.png`,
//! `server.png`, `steps.json` in `--out`) gives that rate, the server's CPU and memory
//! per 1,000 req/s, WAL bytes per request and per day, memory per tenant, and a table
//! that turns "N enterprise tenants × M videos/day" into cores, memory and disk.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::chart::{self, Series};
use crate::mix::OPS;
use crate::report::Summary;
use crate::{measured, run_id, Ready, ServerCost};

/// The sweep's shape.
#[derive(clap::Args, Clone, Debug)]
pub struct PlanArgs {
    /// The latency objective: p99 of all requests from their intended start, ms.
    #[arg(long, default_value_t = 50.0)]
    slo_p99_ms: f64,
    /// Error fraction above which a step fails.
    #[arg(long, default_value_t = 0.01)]
    errors_max: f64,
    /// First offered rate, req/s.
    #[arg(long, default_value_t = 200.0)]
    start_rate: f64,
    /// Rate multiplier per step (> 1).
    #[arg(long, default_value_t = 1.4)]
    factor: f64,
    /// Seconds per step.
    #[arg(long, default_value_t = 15)]
    step_s: u64,
    /// Most steps before bisection.
    #[arg(long, default_value_t = 16)]
    steps_max: u32,
    /// Report directory.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
    /// TrueType font for the charts.
    #[arg(long)]
    font: Option<PathBuf>,
}

/// One step's figures.
struct Step {
    rate: f64,
    summary: Summary,
    cost: ServerCost,
    pass: bool,
    why: String,
}

impl Step {
    fn error_rate(&self) -> f64 {
        let all = self.summary.rec.overall();
        all.errors() as f64 / all.count().max(1) as f64
    }
}

async fn step(r: &Ready, a: &PlanArgs, rate: f64) -> Step {
    let (summary, cost) = measured(
        r,
        rate,
        Duration::from_secs(a.step_s.clamp(1, 600)),
        u64::MAX,
        &run_id(),
    )
    .await;
    let all = summary.rec.overall();
    let p99 = all.latency_ms(0.99);
    let errors = all.errors() as f64 / all.count().max(1) as f64;
    let achieved = summary.achieved_rate();
    let mut why = Vec::new();
    if p99 > a.slo_p99_ms {
        why.push(format!("p99 {p99:.1} ms > {} ms", a.slo_p99_ms));
    }
    if errors > a.errors_max {
        why.push(format!("errors {:.2} %", errors * 100.0));
    }
    if achieved < 0.95 * rate {
        why.push(format!("achieved {achieved:.0} of {rate:.0} req/s"));
    }
    eprintln!(
        "loadtest plan: {rate:>8.0} req/s offered, {achieved:>8.0} achieved, p99 {p99:>8.2} ms, \
         errors {:.2} %, server {} cores: {}",
        errors * 100.0,
        cost.cpu_cores.map_or("?".into(), |c| format!("{c:.2}")),
        if why.is_empty() {
            "holds".to_owned()
        } else {
            why.join(", ")
        }
    );
    // Let background work of the step (batches, webhooks) settle before the next.
    tokio::time::sleep(Duration::from_secs(2)).await;
    Step {
        rate,
        pass: why.is_empty(),
        why: why.join(", "),
        summary,
        cost,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1048576.0);
    format!("{cores} cores ({cpu}), {mem_gib:.0} GiB")
}

fn mib(b: f64) -> String {
    format!("{:.1}", b / 1048576.0)
}

/// Runs the sweep and writes the report.
pub async fn plan(r: Ready, a: PlanArgs) -> Result<(), String> {
    let valid = (1.0..=10.0).contains(&a.factor)
        && a.factor > 1.0
        && a.start_rate.is_finite()
        && a.start_rate > 0.0
        && a.steps_max > 0;
    if !valid {
        return Err("--factor must be in (1, 10], --start-rate > 0, --steps-max > 0".into());
    }
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let mut steps: Vec<Step> = Vec::new();
    let mut rate = a.start_rate;
    for _ in 0..a.steps_max.min(64) {
        let s = step(&r, &a, rate).await;
        let pass = s.pass;
        steps.push(s);
        if !pass {
            break;
        }
        rate *= a.factor;
    }
    // Bisection between the last rate that held and the first that broke.
    for _ in 0..2 {
        let lo = steps
            .iter()
            .filter(|s| s.pass)
            .map(|s| s.rate)
            .fold(0.0, f64::max);
        let hi = steps
            .iter()
            .filter(|s| !s.pass && s.rate > lo)
            .map(|s| s.rate)
            .fold(f64::INFINITY, f64::min);
        if lo == 0.0 || !hi.is_finite() || hi / lo < 1.05 {
            break;
        }
        let s = step(&r, &a, (lo * hi).sqrt()).await;
        steps.push(s);
    }
    steps.sort_by(|x, y| x.rate.total_cmp(&y.rate));
    let best = steps
        .iter()
        .filter(|s| s.pass)
        .max_by(|x, y| x.rate.total_cmp(&y.rate));
    let report = write_report(&r, &a, &steps, best)?;
    println!("{report}");
    if let Some(sp) = r.spawned {
        sp.stop();
    }
    Ok(())
}

fn write_report(
    r: &Ready,
    a: &PlanArgs,
    steps: &[Step],
    best: Option<&Step>,
) -> Result<String, String> {
    let mut md = String::new();
    let _ = writeln!(md, "# Capacity plan\n");
    let _ = writeln!(
        md,
        "Machine: {} (server and load generator share it). Target: {}. Mix: `{}`. \
         {} provisioned tenants. Objective: p99 ≤ {} ms from the intended start, errors ≤ {} %, \
         ≥ 95 % of the offered rate achieved. {} s per step.\n",
        machine(),
        r.base,
        r.mix.describe(),
        r.tenants.len(),
        a.slo_p99_ms,
        a.errors_max * 100.0,
        a.step_s
    );
    let _ = writeln!(
        md,
        "| offered req/s | achieved | p50 ms | p99 ms | p99.9 ms | errors % | server cores | RSS MiB | WAL B/req | verdict |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for s in steps {
        let all = s.summary.rec.overall();
        let _ = writeln!(
            md,
            "| {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} |",
            s.rate,
            s.summary.achieved_rate(),
            all.latency_ms(0.5),
            all.latency_ms(0.99),
            all.latency_ms(0.999),
            s.error_rate() * 100.0,
            s.cost.cpu_cores.map_or("?".into(), |c| format!("{c:.2}")),
            s.cost.rss_bytes.map_or("?".into(), |b| mib(b as f64)),
            s.cost.wal_bytes.map_or("?".into(), |w| format!(
                "{:.0}",
                w as f64 / all.count().max(1) as f64
            )),
            if s.pass {
                "holds".to_owned()
            } else {
                format!("breaks: {}", s.why)
            }
        );
    }
    let Some(best) = best else {
        let _ = writeln!(
            md,
            "\nNo step held the objective: lower `--start-rate` or relax `--slo-p99-ms`."
        );
        std::fs::write(a.out.join("report.md"), &md).map_err(|e| e.to_string())?;
        return Ok(md);
    };
    let all = best.summary.rec.overall();
    let rate = best.summary.achieved_rate();
    let _ = writeln!(
        md,
        "\n## Highest sustainable rate: {rate:.0} req/s (p99 {:.2} ms)\n",
        all.latency_ms(0.99)
    );
    let _ = writeln!(
        md,
        "| op | count | p50 ms | p99 ms | p99.9 ms | max ms | errors |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|");
    for op in OPS {
        if let Some(s) = best.summary.rec.ops.get(&op) {
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                op.name(),
                s.count(),
                s.latency_ms(0.5),
                s.latency_ms(0.99),
                s.latency_ms(0.999),
                s.latency_us.max() as f64 / 1000.0,
                s.errors()
            );
        }
    }
    let cores_per_1k = best.cost.cpu_cores.map(|c| c / rate * 1000.0);
    let wal_per_req = best
        .cost
        .wal_bytes
        .map(|w| w as f64 / all.count().max(1) as f64);
    let rss = best.cost.rss_bytes.map(|b| b as f64);
    let per_tenant = r.rss_per_tenant_bytes;
    let _ = writeln!(md, "\n## Cost at that rate\n");
    let _ = writeln!(
        md,
        "- Server CPU: {} cores in all, {} cores per 1,000 req/s.",
        best.cost
            .cpu_cores
            .map_or("?".into(), |c| format!("{c:.2}")),
        cores_per_1k.map_or("?".into(), |c| format!("{c:.3}"))
    );
    let _ = writeln!(
        md,
        "- Resident memory: {} MiB ({} MiB per 1,000 req/s of offered load at this tenant count).",
        rss.map_or("?".into(), mib),
        rss.map_or("?".into(), |m| mib(m / rate * 1000.0))
    );
    let _ = writeln!(
        md,
        "- WAL: {} bytes per request, {} GiB per day at this rate (before snapshots compact the log).",
        wal_per_req.map_or("?".into(), |w| format!("{w:.0}")),
        wal_per_req.map_or("?".into(), |w| format!("{:.1}", w * rate * 86400.0 / 1073741824.0))
    );
    let _ = writeln!(
        md,
        "- Memory per provisioned tenant (tenant, key, wallet, 3-item seed batch): {} bytes.",
        per_tenant.map_or("?".into(), |m| format!("{m:.0}"))
    );
    // Memory per video: what the sweep's creations added (items, ledger entries, index).
    let videos: f64 = steps
        .iter()
        .map(|s| {
            s.summary
                .rec
                .ops
                .get(&crate::mix::Op::Create)
                .map_or(0.0, |c| c.count() as f64 * crate::mix::CREATE_ITEMS as f64)
        })
        .sum();
    let rss_first = steps.first().and_then(|s| s.cost.rss_bytes);
    let rss_last = steps.iter().filter_map(|s| s.cost.rss_bytes).max();
    let per_video = match (rss_first, rss_last) {
        (Some(f), Some(l)) if videos > 0.0 && l > f => Some((l - f) as f64 / videos),
        _ => None,
    };
    let _ = writeln!(
        md,
        "- Resident memory grown per video created over the sweep: {} bytes (an upper \
         bound: it also carries what the sweep's other requests kept, such as stored \
         idempotent responses and access-log entries, besides each video's item, ledger \
         entries and index).",
        per_video.map_or("?".into(), |m| format!("{m:.0}"))
    );
    let vpr = r.mix.videos_per_request();
    let _ = writeln!(md, "\n## Sizing: N enterprise tenants × M videos per day\n");
    if let (Some(cpr), Some(wpr), Some(base), true) = (cores_per_1k, wal_per_req, rss, vpr > 0.0) {
        let _ = writeln!(
            md,
            "Requests per video come from the mix ({vpr:.3} videos per request: every \
             `create` is {} videos, the rest are the reads and top-ups that accompany them). \
             Cores = this machine's cores scaled by requests/s over the sustainable rate \
             (conservative: the load generator shared them), never below the server CPU \
             measured per request; memory = this run's base + tenants × \
             memory per tenant + 30 days of videos × memory per video (ledgers and finished \
             batches stay in memory today); disk = WAL bytes per day (videos themselves \
             live in the object store and are not counted).\n",
            crate::mix::CREATE_ITEMS
        );
        let _ = writeln!(
            md,
            "| tenants | videos/day each | req/s | cores | memory GiB (30 days) | WAL GiB/day |"
        );
        let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|");
        let base_rss = base - per_tenant.unwrap_or(0.0) * r.tenants.len() as f64;
        let machine_cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        for n in [10u64, 100, 1_000, 10_000] {
            for m in [1_000u64, 10_000, 100_000] {
                let videos_s = (n * m) as f64 / 86400.0;
                let req_s = videos_s / vpr;
                // This machine's cores held `rate` under the objective (sharing them
                // with the load generator): scale that, never below the CPU measured.
                let cores = (machine_cores * req_s / rate).max(req_s / 1000.0 * cpr);
                let mem = base_rss.max(0.0)
                    + per_tenant.unwrap_or(0.0) * n as f64
                    + per_video.unwrap_or(0.0) * (n * m * 30) as f64;
                let disk = wpr * req_s * 86400.0 / 1073741824.0;
                let _ = writeln!(
                    md,
                    "| {n} | {m} | {req_s:.0} | {cores:.2} | {:.1} | {disk:.1} |",
                    mem / 1073741824.0
                );
            }
        }
    } else {
        let _ = writeln!(
            md,
            "Needs the server's pid (`--serve` or `--server-pid`), `/metrics`, and a mix with `create`."
        );
    }
    // Charts.
    let charts = match chart::init_font(a.font.as_deref()) {
        Ok(_) => charts(&a.out, steps, a.slo_p99_ms),
        Err(e) => Err(e),
    };
    match charts {
        Ok(()) => {
            let _ = writeln!(
                md,
                "\n![latency](latency.png)\n![throughput](throughput.png)\n![server](server.png)"
            );
        }
        Err(e) => {
            let _ = writeln!(md, "\nCharts not drawn: {e}.");
        }
    }
    let json_steps: Vec<serde_json::Value> = steps
        .iter()
        .map(|s| {
            let mut v = s.summary.json();
            v["pass"] = s.pass.into();
            v["server"] = json!({
                "cpu_cores": s.cost.cpu_cores,
                "rss_bytes": s.cost.rss_bytes,
                "wal_bytes": s.cost.wal_bytes,
            });
            v
        })
        .collect();
    write(
        &a.out.join("steps.json"),
        &format!("{:#}\n", json!(json_steps)),
    )?;
    write(&a.out.join("report.md"), &md)?;
    Ok(md)
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

fn charts(out: &Path, steps: &[Step], slo: f64) -> Result<(), String> {
    let pts = |f: &dyn Fn(&Step) -> Option<f64>| -> Vec<(f64, f64)> {
        steps.iter().filter_map(|s| Some((s.rate, f(s)?))).collect()
    };
    chart::line_chart(
        &out.join("latency.png"),
        "Latency from the intended start vs offered rate",
        "offered req/s",
        "ms",
        &[
            Series {
                label: "p50".into(),
                points: pts(&|s| Some(s.summary.rec.overall().latency_ms(0.5))),
            },
            Series {
                label: "p99".into(),
                points: pts(&|s| Some(s.summary.rec.overall().latency_ms(0.99))),
            },
        ],
        Some((slo, "objective (p99)")),
    )?;
    chart::line_chart(
        &out.join("throughput.png"),
        "Achieved vs offered rate",
        "offered req/s",
        "achieved req/s",
        &[
            Series {
                label: "achieved".into(),
                points: pts(&|s| Some(s.summary.achieved_rate())),
            },
            Series {
                label: "offered".into(),
                points: pts(&|s| Some(s.rate)),
            },
        ],
        None,
    )?;
    chart::line_chart(
        &out.join("server.png"),
        "Server CPU (cores) and resident memory (GiB) vs offered rate",
        "offered req/s",
        "cores / GiB",
        &[
            Series {
                label: "CPU cores".into(),
                points: pts(&|s| s.cost.cpu_cores),
            },
            Series {
                label: "RSS GiB".into(),
                points: pts(&|s| s.cost.rss_bytes.map(|b| b as f64 / 1073741824.0)),
            },
        ],
        None,
    )
}
