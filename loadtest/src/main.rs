//! `loadtest`: the open-loop load generator and capacity planner for reelbatch.
//!
//! Not built yet: it needs the HTTP API (issue 5) and is delivered by issue 9. Until then
//! this binary says so and exits with status 2 rather than pretending to measure anything.

fn main() -> std::process::ExitCode {
    eprintln!(
        "loadtest: not implemented yet; it needs the HTTP API and is tracked by issue 9. \
         The WAL benchmark runs with `cargo bench --bench wal`."
    );
    std::process::ExitCode::from(2)
}
