//! The README's commands, run as written (with `cargo run --release --` replaced by the
//! binary under test, `./data` by a temporary directory and port 8080 by a free one): the
//! `serve` line, the curl core flow (needs `curl` and `jq`, which `.ci/run` installs when
//! missing), the batch file with `submit --wait`, the offline money tools after a
//! graceful stop; and the configuration reference is the embedded defaults, verbatim.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const README: &str = include_str!("../README.md");

/// The body of the first fenced block of language `lang` after `marker`.
fn block_after(marker: &str, lang: &str) -> String {
    let at = README
        .find(marker)
        .unwrap_or_else(|| panic!("README has no {marker:?}"));
    let fence = format!("```{lang}\n");
    let start = at + README[at..].find(&fence).expect("a fenced block") + fence.len();
    let end = start + README[start..].find("```").expect("a closing fence");
    README[start..end].to_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The README's text with the machine-specific parts of this run.
fn localise(text: &str, data: &Path, port: u16) -> String {
    text.replace(
        "cargo run --release --",
        &format!("'{}'", env!("CARGO_BIN_EXE_reelbatch")),
    )
    .replace("./data", data.to_str().unwrap())
    .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
}

fn bash(script: &str, cwd: &Path, stdin: &str) -> Output {
    support::run_with_stdin(
        Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(cwd)
            .env_remove("REELBATCH_URL")
            .env_remove("REELBATCH_API_KEY"),
        stdin,
    )
}

#[test]
fn the_configuration_reference_is_the_embedded_defaults() {
    let block = block_after("## Configuration reference", "toml");
    assert_eq!(block.trim(), reelbatch::config::DEFAULTS.trim());
}

#[test]
fn the_readme_commands_run_as_written() {
    for tool in ["curl", "jq"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        assert!(found, "{tool} is needed (.ci/run installs it)");
    }
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path();
    let data = work.join("data");
    let port = free_port();

    // The serve line, as written (the environment prefix included).
    let serve_line = block_after("## Run the server", "sh");
    let serve_line = localise(serve_line.trim(), &data, port);
    let mut server = Command::new("bash")
        .args(["-c", &format!("exec env {serve_line}")])
        .current_dir(work)
        .env_remove("RUST_LOG")
        .env("REELBATCH_LOG__LEVEL", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the serve line starts");
    let stdout = server.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
    assert!(line.contains("listening on"), "serve printed {line:?}");

    // The curl flow, then what the later sections need from it.
    let flow = localise(&block_after("The core flow with curl", "sh"), &data, port);
    let out = bash(
        &format!("{flow}\necho\necho \"T=$T K=$K ID=$ID\"\n"),
        work,
        "",
    );
    assert!(out.status.success(), "{}", support::output_text(&out));
    let o = String::from_utf8_lossy(&out.stdout).into_owned();
    for needle in [
        "\"items\":4",
        "\"total\":160",
        "line,reference,credits",
        "\"discrepancies\":[]",
        "\"expires_at\"",
        "\"kind\":\"download\"",
    ] {
        assert!(
            o.contains(needle),
            "missing {needle:?}\n{}",
            support::output_text(&out)
        );
    }
    let ids = o.lines().last().unwrap();
    let get = |k: &str| {
        ids.split_whitespace()
            .find_map(|p| p.strip_prefix(&format!("{k}=")))
            .unwrap()
            .to_owned()
    };
    let (tenant, key) = (get("T"), get("K"));
    assert!(
        tenant.starts_with("ten_") && get("ID").starts_with("bat_"),
        "{ids}"
    );
    let gif = std::fs::read(work.join("video.gif")).expect("the video was downloaded");
    assert!(gif.starts_with(b"GIF8"), "a GIF");

    // The batch file with submit: confirmed at the prompt, followed to the end (the
    // [reject] scene makes it partial: exit 1).
    std::fs::write(
        work.join("pilot.toml"),
        block_after("## Submit a batch from a file", "toml"),
    )
    .unwrap();
    let submit = localise(
        &block_after("## Submit a batch from a file", "sh"),
        &data,
        port,
    )
    .replace("$K", &key);
    let out = bash(&submit, work, "y\n");
    let o = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", support::output_text(&out));
    assert!(
        o.contains("quote: 6 videos"),
        "{}",
        support::output_text(&out)
    );
    assert!(o.contains(": partial"), "{}", support::output_text(&out));
    assert!(work.join("pilot.toml.reelbatch.json").exists());

    // A graceful stop, then the offline block line by line.
    unsafe {
        libc::kill(server.id() as i32, libc::SIGTERM);
    }
    assert!(server.wait().unwrap().success());
    let offline = localise(
        &block_after("## Check the money offline", "sh"),
        &data,
        port,
    )
    .replace("ten_…", &tenant);
    for line in offline.lines().filter(|l| !l.trim().is_empty()) {
        let out = bash(line, work, "");
        assert!(
            out.status.success(),
            "{line}\n{}",
            support::output_text(&out)
        );
    }
    let out = bash(offline.lines().nth(1).unwrap(), work, "");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["discrepancies"], serde_json::json!([]));
    assert_eq!(v["batches_checked"], 2);
}
