//! `reelbatch submit FILE [--wait]`: a batch from a TOML or JSON file, safely.
//!
//! Steps: read the file (the body of `POST /v1/batches`), quote it and show the price
//! beside the wallet, ask (unless `--yes`), then submit with a request id and, with
//! `--wait`, follow the batch with a progress bar to a summary.
//!
//! Never twice: before anything is sent, the request id is written durably to a ticket
//! next to the file (`FILE.reelbatch.json`, with the body's fingerprint, the server and
//! a fingerprint of the key, never the key). A re-run of the same file against the same
//! server and key reuses it, so after a network error, a crash or Ctrl-C the server
//! answers with the batch it already created (batch creation is idempotent by request
//! id), and once the batch id is known the re-run only follows it. Editing the file, or
//! `--new`, starts a new request.
//!
//! Exit codes: 0 the batch was accepted (without `--wait`) or completed (with it); 1 it
//! finished otherwise (partial, failed, canceled); 2 nothing was submitted or the server
//! refused (bad file, declined, 4xx); 3 the server could not be reached or the wait timed
//! out (re-run to resume).

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use reqwest::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cli::client::{CallError, Client};
use crate::cli::progress::{BatchProgress, Counts};
use crate::hex;

/// The batch completed, or (without `--wait`) was accepted.
pub const EXIT_COMPLETED: u8 = 0;
/// The batch finished partial, failed or canceled.
pub const EXIT_NOT_COMPLETED: u8 = 1;
/// Nothing submitted: bad file, declined, or refused by the server.
pub const EXIT_REFUSED: u8 = 2;
/// No answer from the server, or the wait timed out: re-run to resume.
pub const EXIT_UNREACHABLE: u8 = 3;

/// Largest batch file read.
const FILE_BYTES_MAX: u64 = 1 << 20;
/// Tries of one call when there is no answer or the server asks to wait.
const CALL_TRIES_MAX: u32 = 6;
/// Consecutive failed polls before giving up the wait (about a minute).
const POLL_FAILURES_MAX: u32 = 30;
/// Failed items listed in the summary.
const FAILED_SHOWN_MAX: usize = 10;
/// Items read to find them (pages of 200).
const ITEMS_SCANNED_MAX: usize = 2_000;
/// Version of the ticket file.
const TICKET_VERSION: u32 = 1;

/// What the command line asked for (`reelbatch submit …`).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The batch: the body of POST /v1/batches (template, variables, params, …).
    pub file: PathBuf,
    /// The server.
    #[arg(long, env = "REELBATCH_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// The API key.
    #[arg(
        long,
        env = "REELBATCH_API_KEY",
        hide_env_values = true,
        default_value = ""
    )]
    pub key: String,
    /// Follow the batch with a progress bar until it finishes.
    #[arg(long)]
    pub wait: bool,
    /// Submit without asking.
    #[arg(long, short)]
    pub yes: bool,
    /// Forget an earlier run of this file: submit a new batch.
    #[arg(long)]
    pub new: bool,
    /// Longest wait with --wait, in seconds.
    #[arg(long, default_value_t = 86_400)]
    pub timeout_s: u64,
    /// How often to poll the batch with --wait, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub poll_ms: u64,
}

/// The request id of a submission, kept next to the file so a re-run reuses it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Ticket {
    /// Format version.
    version: u32,
    /// Sent as the body's `request_id`.
    request_id: String,
    /// SHA-256 of the body without `request_id`: an edited file is a new request.
    fingerprint: String,
    /// The server it went to.
    url: String,
    /// The first 16 hex digits of the key's SHA-256 (the key itself is never written).
    key_fingerprint: String,
    /// Known once the server accepted the batch.
    batch_id: Option<String>,
}

fn ticket_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".reelbatch.json");
    file.with_file_name(name)
}

fn read_ticket(path: &Path) -> Option<Ticket> {
    let bytes = std::fs::read(path).ok()?;
    let t: Ticket = serde_json::from_slice(&bytes).ok()?;
    (t.version == TICKET_VERSION).then_some(t)
}

/// Writes the ticket durably (tmp, fsync, rename, fsync the directory): it must exist
/// before the request it names is sent.
fn write_ticket(path: &Path, t: &Ticket) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(t).map_err(std::io::Error::other)?)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Ok(d) = std::fs::File::open(dir.unwrap_or(Path::new("."))) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads the batch file into the JSON body of `POST /v1/batches`.
fn read_body(file: &Path) -> Result<Value, String> {
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    if meta.len() > FILE_BYTES_MAX {
        return Err(format!(
            "{}: {} bytes is more than the {FILE_BYTES_MAX} a batch file may have",
            file.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let body: Value = match ext.as_str() {
        "toml" => toml::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?,
        "json" => serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?,
        _ => {
            return Err(format!(
                "{}: a batch file ends in .toml or .json",
                file.display()
            ))
        }
    };
    if !body.is_object() || !body["template"].is_string() {
        return Err(format!(
            "{}: a batch needs at least `template` (and usually `variables`)",
            file.display()
        ));
    }
    Ok(body)
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn warn(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "reelbatch submit: {line}");
}

/// Runs `submit`; returns the exit code.
pub fn run(args: Args) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn(&format!("cannot start the runtime: {e}"));
            return EXIT_UNREACHABLE;
        }
    };
    rt.block_on(submit(args))
}

/// A call retried (same idempotency) while there is no answer or the server asks to wait.
async fn call_retrying(
    c: &Client,
    method: Method,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> Result<Value, CallError> {
    let mut delay = Duration::from_millis(500);
    let mut tries = 0;
    loop {
        tries += 1;
        match c.call(method.clone(), path, key, body, None).await {
            Ok(v) => return Ok(v),
            Err(e) if e.retryable() && tries < CALL_TRIES_MAX => {
                let wait = match &e {
                    CallError::Status {
                        retry_after_s: Some(s),
                        ..
                    } => Duration::from_secs((*s).min(60)),
                    _ => delay,
                };
                warn(&format!("{e}; trying again in {:.1} s", wait.as_secs_f64()));
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(8));
            }
            Err(e) => return Err(e),
        }
    }
}

fn refused_or_unreachable(e: &CallError) -> u8 {
    match e {
        CallError::Network(_) => EXIT_UNREACHABLE,
        CallError::Status { .. } if e.retryable() => EXIT_UNREACHABLE,
        CallError::Status { .. } => EXIT_REFUSED,
    }
}

/// Asks on the terminal (or reads a piped answer); anything but yes is no.
fn confirm(question: &str) -> bool {
    {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "{question} [y/N] ");
        let _ = out.flush();
    }
    let mut line = String::new();
    // A bounded read: one short line is all an answer is.
    let stdin = std::io::stdin();
    let mut handle = stdin.lock().take(64);
    if handle.read_line(&mut line).is_err() {
        return false;
    }
    matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

async fn submit(args: Args) -> u8 {
    let mut body = match read_body(&args.file) {
        Ok(b) => b,
        Err(e) => {
            warn(&e);
            return EXIT_REFUSED;
        }
    };
    if args.key.is_empty() {
        warn("no API key: pass --key or set REELBATCH_API_KEY");
        return EXIT_REFUSED;
    }
    let c = match Client::new(&args.url, Duration::from_secs(30)) {
        Ok(c) => c,
        Err(e) => {
            warn(&e);
            return EXIT_REFUSED;
        }
    };
    // The request id: the file's own, an earlier run's, or a new one.
    let explicit = body["request_id"].as_str().map(str::to_owned);
    if let Some(o) = body.as_object_mut() {
        o.remove("request_id");
    }
    let fingerprint = hex(&Sha256::digest(body.to_string().as_bytes()));
    let key_fingerprint = hex(&Sha256::digest(args.key.as_bytes())[..8]);
    let ticket_at = ticket_path(&args.file);
    let earlier = read_ticket(&ticket_at).filter(|t| {
        !args.new
            && t.fingerprint == fingerprint
            && t.url == c.base
            && t.key_fingerprint == key_fingerprint
            && explicit.as_ref().is_none_or(|r| *r == t.request_id)
    });
    let mut ticket = match earlier {
        Some(t) => {
            say(&format!(
                "resuming request {} from {}",
                t.request_id,
                ticket_at.display()
            ));
            t
        }
        None => {
            let request_id = match explicit {
                Some(r) => r,
                None => {
                    let mut rnd = [0u8; 16];
                    if let Err(e) = getrandom::fill(&mut rnd) {
                        warn(&format!("no randomness for a request id: {e}"));
                        return EXIT_REFUSED;
                    }
                    format!("cli_{}", hex(&rnd))
                }
            };
            Ticket {
                version: TICKET_VERSION,
                request_id,
                fingerprint,
                url: c.base.clone(),
                key_fingerprint,
                batch_id: None,
            }
        }
    };

    let id = match ticket.batch_id.clone() {
        // Accepted by an earlier run: only follow it.
        Some(id) => id,
        None => {
            let id = match quote_and_create(&c, &args, &mut body, &mut ticket, &ticket_at).await {
                Ok(id) => id,
                Err(code) => return code,
            };
            ticket.batch_id = Some(id.clone());
            if let Err(e) = write_ticket(&ticket_at, &ticket) {
                warn(&format!(
                    "cannot record batch {id} in {}: {e} (a re-run still finds it by its request id)",
                    ticket_at.display()
                ));
            }
            id
        }
    };
    if !args.wait {
        say(&format!(
            "follow it: reelbatch submit {} --wait   (or GET {}/v1/batches/{id})",
            args.file.display(),
            c.base
        ));
        return EXIT_COMPLETED;
    }
    follow(&c, &args, &id).await
}

/// Quote, confirm, record the request id, create. Returns the batch id.
async fn quote_and_create(
    c: &Client,
    args: &Args,
    body: &mut Value,
    ticket: &mut Ticket,
    ticket_at: &Path,
) -> Result<String, u8> {
    let q = call_retrying(c, Method::POST, "/v1/batches/quote", &args.key, Some(body))
        .await
        .map_err(|e| {
            warn(&format!("quote: {e}"));
            refused_or_unreachable(&e)
        })?;
    let wallet = call_retrying(c, Method::GET, "/v1/wallet", &args.key, None)
        .await
        .map_err(|e| {
            warn(&format!("wallet: {e}"));
            refused_or_unreachable(&e)
        })?;
    say(&format!(
        "quote: {} videos × {} credits = {} credits (wallet: {} available)",
        q["items"], q["unit_price"], q["total"], wallet["available"]
    ));
    if let Some(samples) = q["sample_prompts"].as_array() {
        for p in samples.iter().take(3).filter_map(Value::as_str) {
            say(&format!("  e.g. {p:?}"));
        }
    }
    if !args.yes
        && !confirm(&format!(
            "Submit {} videos for {} credits?",
            q["items"], q["total"]
        ))
    {
        say("nothing submitted");
        return Err(EXIT_REFUSED);
    }
    // The id is on disk before the request that carries it leaves.
    if let Err(e) = write_ticket(ticket_at, ticket) {
        warn(&format!(
            "cannot write {}: {e}; without it a re-run could not find this request again, so \
             nothing was submitted (pass request_id in the file to manage ids yourself)",
            ticket_at.display()
        ));
        return Err(EXIT_REFUSED);
    }
    body["request_id"] = Value::String(ticket.request_id.clone());
    let b = call_retrying(c, Method::POST, "/v1/batches", &args.key, Some(body))
        .await
        .map_err(|e| {
            warn(&format!("submit: {e}"));
            if refused_or_unreachable(&e) == EXIT_UNREACHABLE {
                warn(&format!(
                    "the batch may or may not exist: re-run the same command to find out \
                     (request id {}; nothing is created twice)",
                    ticket.request_id
                ));
            }
            refused_or_unreachable(&e)
        })?;
    let id = b["id"].as_str().unwrap_or_default().to_owned();
    if id.is_empty() {
        warn("the server accepted the batch but sent no id");
        return Err(EXIT_UNREACHABLE);
    }
    say(&format!(
        "batch {id}: {} credits held (request id {})",
        b["credits"]["held"], ticket.request_id
    ));
    Ok(id)
}

/// Follows the batch to a final state, then prints the summary.
async fn follow(c: &Client, args: &Args, id: &str) -> u8 {
    let started = Instant::now();
    let deadline = Duration::from_secs(args.timeout_s);
    let poll = Duration::from_millis(args.poll_ms.clamp(50, 60_000));
    let path = format!("/v1/batches/{id}");
    let mut bar: Option<BatchProgress> = None;
    let mut failures = 0u32;
    let fin = loop {
        match c.call(Method::GET, &path, &args.key, None, None).await {
            Ok(v) => {
                failures = 0;
                let bar = bar.get_or_insert_with(|| BatchProgress::new(Counts::of(&v).total));
                bar.update(&v);
                if ["completed", "partial", "failed", "canceled"]
                    .contains(&v["status"].as_str().unwrap_or(""))
                {
                    break v;
                }
            }
            Err(e) if e.retryable() && failures + 1 < POLL_FAILURES_MAX => {
                failures += 1;
                if failures == 1 || failures % 10 == 0 {
                    warn(&format!("{e}; still trying"));
                }
            }
            Err(e) => {
                warn(&format!("following {id}: {e}"));
                return refused_or_unreachable(&e);
            }
        }
        if started.elapsed() > deadline {
            warn(&format!(
                "{id} is still running after {} s; re-run to keep following it",
                args.timeout_s
            ));
            return EXIT_UNREACHABLE;
        }
        tokio::time::sleep(poll).await;
    };
    if let Some(bar) = bar {
        bar.finish(&fin);
    }
    summary(c, args, id, &fin).await;
    if fin["status"] == "completed" {
        EXIT_COMPLETED
    } else {
        EXIT_NOT_COMPLETED
    }
}

async fn summary(c: &Client, args: &Args, id: &str, fin: &Value) {
    let n = Counts::of(fin);
    let cr = &fin["credits"];
    say(&format!(
        "batch {id}: {}",
        fin["status"].as_str().unwrap_or("?")
    ));
    say(&format!(
        "  videos   {} succeeded, {} failed (refunded), {} canceled (refunded), of {}",
        n.succeeded, n.failed, n.canceled, n.total
    ));
    say(&format!(
        "  credits  held {}  settled {}  released {}  remaining {}",
        cr["held"], cr["settled"], cr["released"], cr["remaining"]
    ));
    if n.failed > 0 {
        let mut shown = 0usize;
        let mut scanned = 0usize;
        let mut cursor: Option<String> = None;
        while shown < FAILED_SHOWN_MAX && scanned < ITEMS_SCANNED_MAX {
            let mut path = format!("/v1/batches/{id}/items?limit=200");
            if let Some(cur) = &cursor {
                path.push_str(&format!("&cursor={cur}"));
            }
            let Ok(page) = c.call(Method::GET, &path, &args.key, None, None).await else {
                break;
            };
            let items = page["data"].as_array().cloned().unwrap_or_default();
            scanned += items.len();
            for i in items.iter().filter(|i| i["status"] == "failed") {
                if shown < FAILED_SHOWN_MAX {
                    say(&format!(
                        "  failed   #{} {:?}: {}",
                        i["index"],
                        i["prompt"].as_str().unwrap_or(""),
                        i["failure_code"].as_str().unwrap_or("")
                    ));
                }
                shown += 1;
            }
            match page["next_cursor"].as_str() {
                Some(cur) if !items.is_empty() => cursor = Some(cur.to_owned()),
                _ => break,
            }
        }
        if (n.failed as usize) > shown.min(FAILED_SHOWN_MAX) {
            say(&format!(
                "  …        {} failed in all: GET {}/v1/batches/{id}/items",
                n.failed, c.base
            ));
        }
    }
    if let Ok(w) = c
        .call(Method::GET, "/v1/wallet", &args.key, None, None)
        .await
    {
        say(&format!(
            "  wallet   {} available, {} held",
            w["available"], w["held"]
        ));
    }
    say(&format!(
        "  videos   GET {}/v1/batches/{id}/items, then /v1/videos/{{video_id}}/content",
        c.base
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_and_json_files_read_to_the_same_body() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("b.toml");
        std::fs::write(
            &t,
            "template = \"{a} of {b}\"\nexpires_in = 600\n[variables]\na = [\"x\", \"y\"]\nb = [\"z\"]\n",
        )
        .unwrap();
        let j = dir.path().join("b.json");
        std::fs::write(
            &j,
            r#"{"template":"{a} of {b}","variables":{"a":["x","y"],"b":["z"]},"expires_in":600}"#,
        )
        .unwrap();
        assert_eq!(read_body(&t).unwrap(), read_body(&j).unwrap());
        let bad = dir.path().join("b.yaml");
        std::fs::write(&bad, "template: x").unwrap();
        assert!(read_body(&bad).unwrap_err().contains(".toml or .json"));
        std::fs::write(&j, r#"{"variables":{}}"#).unwrap();
        assert!(read_body(&j).unwrap_err().contains("template"));
        std::fs::write(&t, "template = ").unwrap();
        assert!(read_body(&t).is_err());
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; FILE_BYTES_MAX as usize + 1]).unwrap();
        assert!(read_body(&big).unwrap_err().contains("bytes"));
    }

    #[test]
    fn the_ticket_round_trips_and_sits_next_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pilot.toml");
        let at = ticket_path(&file);
        assert_eq!(at, dir.path().join("pilot.toml.reelbatch.json"));
        assert_eq!(read_ticket(&at), None);
        let t = Ticket {
            version: TICKET_VERSION,
            request_id: "cli_1".into(),
            fingerprint: "f".into(),
            url: "http://127.0.0.1:1".into(),
            key_fingerprint: "k".into(),
            batch_id: None,
        };
        write_ticket(&at, &t).unwrap();
        assert_eq!(read_ticket(&at), Some(t.clone()));
        // A ticket of another version is not trusted.
        let mut v = serde_json::to_value(&t).unwrap();
        v["version"] = 99.into();
        std::fs::write(&at, v.to_string()).unwrap();
        assert_eq!(read_ticket(&at), None);
    }
}
