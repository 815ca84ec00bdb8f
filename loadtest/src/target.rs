//! The server under load: loopback only, optionally started by us (`--serve BIN`, on a
//! fresh data directory that is removed afterwards), and what we can read about it: CPU
//! time and resident memory from `/proc/<pid>`, WAL bytes from `/metrics`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Accepts only loopback targets (this tool must never load someone else's server).
pub fn loopback_base(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// loopback targets"))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if let Some(h) = authority.strip_prefix('[') {
        h.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!("{url}: {host} is not a loopback address"));
    }
    Ok(format!("http://{authority}"))
}

/// A server process we started.
pub struct Spawned {
    child: Child,
    /// Its pid.
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    /// Its admin token (random).
    pub admin: String,
    /// Its data directory (removed by `stop`).
    pub data_dir: PathBuf,
}

impl Spawned {
    /// Starts `bin serve` on a fresh data directory and a free port.
    pub fn start(bin: &Path, env: &[(String, String)]) -> Result<Spawned, String> {
        let mut token = [0u8; 16];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut token))
            .map_err(|e| format!("/dev/urandom: {e}"))?;
        let admin: String = token.iter().map(|b| format!("{b:02x}")).collect();
        let data_dir = std::env::temp_dir().join(format!(
            "reelbatch-loadtest-{}-{}",
            std::process::id(),
            &admin[..8]
        ));
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env("REELBATCH_ADMIN_TOKEN", &admin)
            .env("REELBATCH_LOG__LEVEL", "warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{}: {e}", bin.display()))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let Some(base) = line.trim().strip_prefix("reelbatch listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("the server did not start (said {line:?})"));
        };
        Ok(Spawned {
            pid: child.id(),
            base: base.to_owned(),
            admin,
            data_dir,
            child,
        })
    }

    /// SIGTERM, wait (bounded), then what `Drop` does.
    pub fn stop(mut self) {
        // SAFETY: a plain signal to our own child.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        for _ in 0..600 {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Spawned {
    /// Never leaves a server behind, whatever failed.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// CPU seconds (user + system) the process has used.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let tck = if tck > 0 { tck as f64 } else { 100.0 };
    Some((utime + stime) as f64 / tck)
}

/// Resident memory of the process, bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Threads of the process (a thread pool growing under load shows here).
pub fn threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Threads:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The server's `/metrics` page (Prometheus text).
pub async fn metrics_text(http: &reqwest::Client, base: &str) -> Option<String> {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// One unlabelled sample of a metrics page.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// Bytes the server's WAL has written (from `/metrics`).
pub async fn wal_bytes(http: &reqwest::Client, base: &str) -> Option<u64> {
    let text = metrics_text(http, base).await?;
    metric(&text, "reelbatch_wal_bytes_written_total").map(|v| v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_reads_one_unlabelled_sample() {
        let page = "# HELP x\nreelbatch_wal_fsyncs_total 12\nreelbatch_wal_fsyncs_total_x 3\n";
        assert_eq!(metric(page, "reelbatch_wal_fsyncs_total"), Some(12.0));
        assert_eq!(metric(page, "reelbatch_wal_fsync"), None);
        assert_eq!(threads(std::process::id()).map(|n| n >= 1), Some(true));
    }

    #[test]
    fn only_loopback_targets() {
        assert_eq!(
            loopback_base("http://127.0.0.1:8080/").unwrap(),
            "http://127.0.0.1:8080"
        );
        assert!(loopback_base("http://localhost:1").is_ok());
        assert!(loopback_base("http://[::1]:1").is_ok());
        assert!(loopback_base("http://127.9.9.9:1").is_ok());
        assert!(loopback_base("http://10.0.0.1:8080").is_err());
        assert!(loopback_base("http://example.com").is_err());
        assert!(loopback_base("https://127.0.0.1").is_err());
        assert!(loopback_base("http://127.0.0.1.evil.com:80").is_err());
    }

    #[test]
    fn our_own_process_is_readable() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(rss_bytes(me).unwrap() > 1 << 20);
    }
}
