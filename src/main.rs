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
    /// Offline tools for the write-ahead log of a stopped server.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
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
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    let code = match cli.command {
        Command::Wal { command } => match command {
            WalCommand::Verify { data_dir } => {
                reelbatch::cli::offline::wal_verify(&data_dir, &mut out, &mut err)
            }
            WalCommand::Dump { data_dir } => {
                reelbatch::cli::offline::wal_dump(&data_dir, &mut out, &mut err)
            }
        },
    };
    ExitCode::from(code)
}
