//! The `reelbatch` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// reelbatch: AI video generation as a financially safe batch production line.
#[derive(Parser)]
#[command(name = "reelbatch", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server: recover the data directory, serve /v1 and /admin/v1 until SIGINT or
    /// SIGTERM, then drain, snapshot and close the log.
    Serve {
        /// Data directory (default: the config's `data_dir`, `./data`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// HOST:PORT to listen on (default: the config's `listen`, 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<String>,
        /// TOML config file (REELBATCH_* environment variables override it).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// The pilot, end to end, on embedded defaults: an in-process server in a fresh
    /// temporary data directory, a 20-video batch, webhooks, a report, reconciliation.
    Demo {
        /// Leave the server running afterwards (Ctrl-C stops it).
        #[arg(long)]
        keep: bool,
    },
    /// Submit a batch from a TOML or JSON file to a server: quote, confirm, submit with a
    /// request id kept in FILE.reelbatch.json (a re-run never creates a second batch),
    /// and with --wait follow it to a summary. Exit 0 completed (or accepted without
    /// --wait), 1 finished otherwise, 2 refused or declined, 3 unreachable (re-run).
    Submit(reelbatch::cli::submit::Args),
    /// Offline tools for the write-ahead log of a stopped server.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Offline: recompute every wallet and batch of a stopped server's data directory from
    /// the ledger and item outcomes (as GET /admin/v1/reconciliation does); exit 2 on any
    /// discrepancy or log corruption.
    Reconcile {
        /// The server's data directory.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Print the report as the admin endpoint's JSON (provenance goes to stderr).
        #[arg(long)]
        json: bool,
    },
    /// Offline tools for the hash-chained ledgers of a stopped server.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Verify every tenant's hash chain; exit 2 if any is broken.
    Verify {
        /// The server's data directory.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// One tenant's ledger as JSON lines with `prev_hash` and `hash`, then a chain line.
    Export {
        /// The server's data directory.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
        /// Tenant id (ten_…).
        #[arg(long)]
        tenant: String,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Check every frame; exit 0 when clean or torn only at the tail, 2 on corruption.
    Verify {
        /// The server's data directory (segments live in D/wal).
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Print one line per frame (LSN, segment, offset, length, crc), then the verdict.
    Dump {
        /// The server's data directory (segments live in D/wal).
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The std streams are locked only by the offline tools: `serve` runs threads that log
    // to stderr, and a lock held here for the program's life would block every one of them.
    let lock = || (std::io::stdout().lock(), std::io::stderr().lock());
    let code = match cli.command {
        Command::Serve {
            data_dir,
            listen,
            config,
        } => serve(data_dir, listen, config),
        Command::Demo { keep } => {
            // The report is the output: only warnings from the server in between.
            if let Ok(mut cfg) = reelbatch::config::Config::load(None) {
                cfg.log.level = "warn".into();
                init_logs(&cfg);
            }
            reelbatch::cli::demo::run(keep)
        }
        Command::Submit(args) => reelbatch::cli::submit::run(args),
        Command::Wal { command } => match command {
            WalCommand::Verify { data_dir } => {
                let (mut out, mut err) = lock();
                reelbatch::cli::offline::wal_verify(&data_dir, &mut out, &mut err)
            }
            WalCommand::Dump { data_dir } => {
                let (mut out, mut err) = lock();
                reelbatch::cli::offline::wal_dump(&data_dir, &mut out, &mut err)
            }
        },
        Command::Reconcile { data_dir, json } => {
            let (mut out, mut err) = lock();
            reelbatch::cli::offline::reconcile(&data_dir, json, &mut out, &mut err)
        }
        Command::Ledger { command } => {
            let (mut out, mut err) = lock();
            match command {
                LedgerCommand::Verify { data_dir } => {
                    reelbatch::cli::offline::ledger_verify(&data_dir, &mut out, &mut err)
                }
                LedgerCommand::Export { data_dir, tenant } => {
                    reelbatch::cli::offline::ledger_export(&data_dir, &tenant, &mut out, &mut err)
                }
            }
        }
    };
    ExitCode::from(code)
}

fn init_logs(cfg: &reelbatch::config::Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if cfg.log.format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

fn serve(data_dir: Option<PathBuf>, listen: Option<String>, config: Option<PathBuf>) -> u8 {
    let cfg = match reelbatch::config::Config::load(config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("reelbatch: {e}");
            return 2;
        }
    };
    init_logs(&cfg);
    // Before the runtimes and actors allocate their arenas' worth (see the function).
    if let Err(e) = reelbatch::heap::disable_transparent_huge_pages() {
        tracing::warn!(error = %e, "transparent huge pages stay on: resident memory may creep above the live heap");
    }
    let data_dir = data_dir.unwrap_or_else(|| PathBuf::from(&cfg.data_dir));
    let listen = listen.unwrap_or_else(|| cfg.listen.clone());
    // Archive reads and downloads run on its blocking pool: fixed and started now (see
    // `runtime`), so a disk stall queues reads instead of adding threads.
    let rt = match reelbatch::runtime::multi_thread(
        "http",
        None,
        reelbatch::runtime::BLOCKING_THREADS,
    ) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("reelbatch: cannot start the runtime: {e}");
            return 1;
        }
    };
    let result = rt.block_on(reelbatch::api::server::serve(
        cfg,
        data_dir,
        &listen,
        reelbatch::api::server::shutdown_signal(),
        |running| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "reelbatch listening on http://{}", running.addr);
            let _ = out.flush();
        },
    ));
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("reelbatch: {e}");
            1
        }
    }
}
