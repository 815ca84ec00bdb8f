//! `loadtest`: the open-loop load generator and capacity planner for reelbatch.
//!
//! - `loadtest run`: provisions tenants through the admin API, then offers a fixed arrival
//!   rate of a weighted mix of operations for a bounded time and prints (and optionally
//!   writes as JSON) the latency per op from the intended start, the service time, and
//!   errors by status, with the server's CPU, memory and WAL bytes when it can see them.
//! - `loadtest plan`: raises the rate step by step until the latency objective breaks and
//!   writes a capacity-planning report (Markdown and PNG charts).
//! - `loadtest soak`: one rate for a long time, measured in windows: resident memory and
//!   p99 per window, the memory trend and the p99 spread.
//!
//! Map: `mix.rs` (ops and weights), `provision.rs` (tenants, keys, seed data),
//! `open_loop.rs` (the schedule), `report.rs` (histograms, summaries), `target.rs` (the
//! server: loopback check, spawning, /proc and /metrics), `plan.rs` (the sweep and report),
//! `soak.rs` (windows and the trend), `chart.rs` (PNG charts).

mod chart;
mod funding;
mod mix;
mod open_loop;
mod plan;
mod provision;
mod report;
mod soak;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use crate::mix::Mix;
use crate::open_loop::RunConfig;

#[derive(Parser)]
#[command(
    name = "loadtest",
    about = "Open-loop load generator and capacity planner for reelbatch"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run at a fixed arrival rate.
    Run {
        #[command(flatten)]
        target: TargetArgs,
        /// Requests per second offered.
        #[arg(long, default_value_t = 500.0)]
        rate: f64,
        /// Seconds of load (at most 3600).
        #[arg(long, default_value_t = 30)]
        duration_s: u64,
        /// Stop after this many requests.
        #[arg(long, default_value_t = 10_000_000)]
        requests_max: u64,
        /// Write the summary as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// The capacity-planning sweep and report.
    Plan {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        plan: plan::PlanArgs,
    },
    /// A long run at one rate, measured in windows (memory trend, p99 per window).
    Soak {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        soak: soak::SoakArgs,
    },
}

/// Where the server is, who we are, and what we send.
#[derive(Args, Clone)]
struct TargetArgs {
    /// A running server (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Start this `reelbatch` binary on a fresh data directory instead (removed after).
    #[arg(long)]
    serve: Option<PathBuf>,
    /// Extra environment for --serve (KEY=VALUE, repeatable).
    #[arg(long = "serve-env")]
    serve_env: Vec<String>,
    /// Admin token of the running server.
    #[arg(
        long,
        env = "REELBATCH_ADMIN_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    admin_token: String,
    /// The running server's pid, for its CPU and memory (found by --serve).
    #[arg(long)]
    server_pid: Option<u32>,
    /// Tenants to provision (each with one key, credits and a seed batch).
    #[arg(long, default_value_t = 1000)]
    tenants: usize,
    /// Their plan.
    #[arg(long, default_value = "enterprise")]
    plan: String,
    /// The operation mix, op=weight,…
    #[arg(long, default_value = mix::DEFAULT_MIX)]
    mix: String,
    /// Requests in flight at most.
    #[arg(long, default_value_t = 4096)]
    inflight_max: usize,
    /// Seed of the op and tenant choices.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// How tenants are funded: `fixed` (a billion credits each, one-credit top-ups, so
    /// every top-up adds a grant that is never drawn) or `steady` (2,000 credits each,
    /// every top-up adds back what the tenant's creations were charged since the last
    /// one: constant live money state, for soaks). See `funding.rs`.
    #[arg(long, value_enum, default_value_t = funding::Funding::Fixed)]
    funding: funding::Funding,
}

/// A provisioned target, ready for load.
pub(crate) struct Ready {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) admin: String,
    pub(crate) pid: Option<u32>,
    pub(crate) tenants: Arc<Vec<provision::Tenant>>,
    pub(crate) mix: Mix,
    /// Resident memory added by provisioning, per tenant (when the pid is known).
    pub(crate) rss_per_tenant_bytes: Option<f64>,
    pub(crate) spawned: Option<target::Spawned>,
    pub(crate) inflight_max: usize,
    pub(crate) seed: u64,
    pub(crate) funding: funding::Funding,
    /// Charges and top-ups over every run of this invocation.
    pub(crate) books: Arc<funding::Books>,
}

const TENANTS_MAX: usize = 100_000;
const INFLIGHT_MAX: usize = 100_000;

async fn prepare(t: &TargetArgs) -> Result<Ready, String> {
    let mix = Mix::parse(&t.mix)?;
    if t.tenants == 0 || t.tenants > TENANTS_MAX {
        return Err(format!("--tenants must be 1..={TENANTS_MAX}"));
    }
    if t.inflight_max == 0 || t.inflight_max > INFLIGHT_MAX {
        return Err(format!("--inflight-max must be 1..={INFLIGHT_MAX}"));
    }
    let (base, admin, pid, spawned) = match &t.serve {
        Some(bin) => {
            let env: Vec<(String, String)> = t
                .serve_env
                .iter()
                .map(|kv| {
                    kv.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .ok_or_else(|| format!("--serve-env {kv:?} is not KEY=VALUE"))
                })
                .collect::<Result<_, _>>()?;
            let s = target::Spawned::start(bin, &env)?;
            (s.base.clone(), s.admin.clone(), Some(s.pid), Some(s))
        }
        None => {
            if t.admin_token.is_empty() {
                return Err("--admin-token (or REELBATCH_ADMIN_TOKEN) is needed".into());
            }
            (
                target::loopback_base(&t.url)?,
                t.admin_token.clone(),
                t.server_pid,
                None,
            )
        }
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(t.inflight_max)
        .build()
        .map_err(|e| e.to_string())?;
    let rss_before = pid.and_then(target::rss_bytes);
    let started = Instant::now();
    eprintln!(
        "loadtest: provisioning {} {} tenants at {base} …",
        t.tenants, t.plan
    );
    let tenants = provision::provision(
        &http,
        &base,
        &admin,
        &t.plan,
        t.tenants,
        t.funding.initial_credits(),
    )
    .await?;
    let rss_after = pid.and_then(target::rss_bytes);
    eprintln!(
        "loadtest: {} tenants ready in {:.1} s",
        tenants.len(),
        started.elapsed().as_secs_f64()
    );
    let rss_per_tenant_bytes = match (rss_before, rss_after) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / tenants.len() as f64),
        _ => None,
    };
    Ok(Ready {
        http,
        base,
        admin,
        pid,
        tenants: Arc::new(tenants),
        mix,
        rss_per_tenant_bytes,
        spawned,
        inflight_max: t.inflight_max,
        seed: t.seed,
        funding: t.funding,
        books: Arc::default(),
    })
}

/// What the server spent during a run.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerCost {
    /// Server CPU over the run, in cores (1.0 = one core busy).
    pub(crate) cpu_cores: Option<f64>,
    /// Resident memory at the end.
    pub(crate) rss_bytes: Option<u64>,
    /// WAL bytes written during the run.
    pub(crate) wal_bytes: Option<u64>,
}

/// One measured run with the server's costs.
pub(crate) async fn measured(
    r: &Ready,
    rate: f64,
    duration: Duration,
    requests_max: u64,
    run_id: &str,
) -> (report::Summary, ServerCost) {
    let cpu0 = r.pid.and_then(target::cpu_seconds);
    let wal0 = target::wal_bytes(&r.http, &r.base).await;
    let cfg = RunConfig {
        rate,
        duration,
        requests_max,
        inflight_max: r.inflight_max,
        seed: r.seed ^ rate.to_bits(),
        funding: r.funding,
        books: Arc::clone(&r.books),
    };
    let s = open_loop::run(
        &r.http,
        &r.base,
        &r.admin,
        Arc::clone(&r.tenants),
        &r.mix,
        &cfg,
        run_id,
    )
    .await;
    let cpu1 = r.pid.and_then(target::cpu_seconds);
    let wal1 = target::wal_bytes(&r.http, &r.base).await;
    let cost = ServerCost {
        cpu_cores: match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some((b - a) / s.elapsed_s.max(1e-9)),
            _ => None,
        },
        rss_bytes: r.pid.and_then(target::rss_bytes),
        wal_bytes: match (wal0, wal1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        },
    };
    (s, cost)
}

pub(crate) fn run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("{now:x}")
}

async fn cmd_run(
    t: TargetArgs,
    rate: f64,
    duration_s: u64,
    requests_max: u64,
    json: Option<PathBuf>,
) -> Result<(), String> {
    if !(rate > 0.0 && rate <= 1_000_000.0) {
        return Err("--rate must be in (0, 1000000]".into());
    }
    let r = prepare(&t).await?;
    let (s, cost) = measured(
        &r,
        rate,
        Duration::from_secs(duration_s.clamp(1, 3600)),
        requests_max,
        &run_id(),
    )
    .await;
    let mut text = s.text();
    if let Some(c) = cost.cpu_cores {
        text.push_str(&format!("server CPU {:.2} cores", c));
        if let Some(m) = cost.rss_bytes {
            text.push_str(&format!(", resident {:.1} MiB", m as f64 / 1048576.0));
        }
        text.push('\n');
    }
    if let Some(w) = cost.wal_bytes {
        let n = s.rec.overall().count().max(1);
        text.push_str(&format!(
            "WAL {} bytes, {:.0} bytes per request\n",
            w,
            w as f64 / n as f64
        ));
    }
    if let Some(m) = r.rss_per_tenant_bytes {
        text.push_str(&format!(
            "server memory per provisioned tenant {:.0} bytes\n",
            m
        ));
    }
    print!("{text}");
    if let Some(path) = json {
        let mut v = s.json();
        v["mix"] = r.mix.describe().into();
        v["tenants"] = r.tenants.len().into();
        v["server"] = serde_json::json!({
            "cpu_cores": cost.cpu_cores,
            "rss_bytes": cost.rss_bytes,
            "wal_bytes": cost.wal_bytes,
            "rss_per_tenant_bytes": r.rss_per_tenant_bytes,
        });
        v["funding"] = r.books.json(r.funding);
        std::fs::write(&path, format!("{v:#}\n"))
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(sp) = r.spawned {
        sp.stop();
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadtest: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Cmd::Run {
                target,
                rate,
                duration_s,
                requests_max,
                json,
            } => cmd_run(target, rate, duration_s, requests_max, json).await,
            Cmd::Plan { target, plan } => {
                let r = prepare(&target).await?;
                plan::plan(r, plan).await
            }
            Cmd::Soak { target, soak } => {
                let r = prepare(&target).await?;
                soak::soak(r, soak).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadtest: {e}");
            ExitCode::from(2)
        }
    }
}
