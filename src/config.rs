//! Configuration: one TOML file plus `REELBATCH_*` environment overrides over embedded
//! defaults (SPEC §9, §12). Every limit is a value here, never a constant in code.
//!
//! Layers, later wins: `DEFAULTS` (below, also the reference of every key) → the file →
//! the environment. `REELBATCH_<SECTION>__<KEY>` sets `section.key` (`__` separates
//! levels, names are lower-cased; `REELBATCH_PLANS__PRO__BURST=300`); a top-level key has no
//! section (`REELBATCH_ADMIN_TOKEN`, `REELBATCH_PUBLIC_URL`). A value is read as TOML
//! (`[200, 800]`, `true`, `5`) and falls back to a string. Any key the defaults do not
//! have is a startup error naming it; the one exception is a new plan under `[plans]`,
//! which must then give every plan key.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// The embedded defaults: every key with its default value.
pub const DEFAULTS: &str = r#"
# Base of signed links (SPEC §12).
public_url = "http://127.0.0.1:8080"
# Token of the admin API (/admin/v1). Empty: the admin API refuses every request.
admin_token = ""
# Where `serve` listens and keeps its data (the --listen and --data-dir flags win).
listen = "127.0.0.1:8080"
data_dir = "./data"

[durability]
# sync: acknowledge after fdatasync (group commit); interval: fdatasync every
# interval_ms (a crash loses up to that much acknowledged work); none: benchmarks only.
mode = "sync"
interval_ms = 5

[snapshots]
# A snapshot after this many events or this many seconds (whichever first, if anything
# happened); older log segments are then deleted. Snapshot files kept on disk. Each
# snapshot archives what finished since the last one: a short interval keeps that burst
# small (at 2,573 req/s, 300 s bursts stalled p99 to 61 ms, 60 s ones stayed under 5 ms).
every_events = 1000000
every_s = 60
kept = 2

# The default provider: deterministic fake videos (a GIF of the prompt); prompts with
# [reject] fail permanently, [flaky] fail twice then succeed, [slow] take 10× longer.
[provider.simulated]
latency_ms = [200, 800]
transient_failure_rate = 0.05
permanent_failure_rate = 0.02
seed = 0
concurrency_max = 1000

# Real providers: the API token is read from the environment variable named here.
[provider.replicate]
enabled = false
base_url = "https://api.replicate.com"
token_env = "REPLICATE_API_TOKEN"
concurrency_max = 50

[provider.fal]
enabled = false
base_url = "https://queue.fal.run"
token_env = "FAL_KEY"
concurrency_max = 50

[batches]
# Provider attempts per item (transient failures are retried with backoff).
attempts_max = 3
attempt_timeout_s = 900
# A batch's `expires_in` when not given, and its largest value.
expires_in_s_default = 86400
expires_in_s_max = 2592000
# Where videos go: "" = <data_dir>/videos; file://, memory://, s3:// (feature) …
store_url = ""

[webhooks]
# SSRF guard: refuse loopback/private/link-local targets and plain http (keep both false
# in production).
allow_private_targets = false
allow_http = false
# Delay before each automatic attempt (fractions allowed); its length is the attempt count.
retry_schedule_s = [0, 5, 300, 1800, 7200, 18000, 36000, 36000]
timeout_s = 15
# An endpoint failing this long without a success is disabled (5 days).
disable_after_s = 432000
# Attempts in flight in all, and to one endpoint.
concurrency_max = 64
concurrency_per_endpoint = 4
endpoints_per_tenant_max = 16
# Finished deliveries kept per tenant (log and redelivery).
deliveries_kept_per_tenant = 1000
# Pending deliveries per endpoint before new ones fail at once as backlog_full.
pending_per_endpoint_max = 100000

[limits]
# Largest request body (413 beyond).
body_bytes_max = 1048576
# Page size of list routes when `limit` is not given, and its largest value.
list_limit_default = 50
list_limit_max = 500
# How long an Idempotency-Key's stored response is replayed, and keys kept in memory at
# once (in flight or stored since the last snapshot; older ones are in an on-disk index).
idempotency_retention_s = 86400
idempotency_keys_max = 1000000
# API keys tracked by the rate limiter at once (idle ones are evicted).
rate_limiter_keys_max = 100000
# Messages queued per actor before senders wait (backpressure).
mailbox_capacity = 1024
# Access-log entries kept in memory and snapshots (the oldest beyond are dropped).
access_log_max = 200000

[log]
format = "text"        # text | json
level = "info"         # a tracing filter: error | warn | info | debug | "reelbatch=debug"

# Plans (SPEC §1): requests per second and burst per key (GCRA), items per batch and per
# day per tenant, items running at once per tenant, and what the plan may use.

[plans.starter]
rate_per_s = 5
burst = 10
max_items_per_batch = 1
items_per_day = 20
concurrency = 2
watermark = true
webhooks = false
embed_whitelist = false
key_spend_caps = false

[plans.pro]
rate_per_s = 50
burst = 100
max_items_per_batch = 200
items_per_day = 1000
concurrency = 16
watermark = false
webhooks = true
embed_whitelist = false
key_spend_caps = false

[plans.enterprise]
rate_per_s = 1000
burst = 2000
max_items_per_batch = 10000
items_per_day = 10000000
concurrency = 256
watermark = false
webhooks = true
embed_whitelist = true
key_spend_caps = true
"#;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "REELBATCH_";

/// Variables with the prefix that belong to the `submit` client, not to the server's
/// configuration (so one shell can export both without the server refusing to start).
pub const CLIENT_ENV_VARS: [&str; 2] = ["REELBATCH_URL", "REELBATCH_API_KEY"];

/// A configuration that cannot be used (the message names the key).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: String, message: String },
    #[error("unknown config key `{0}`")]
    UnknownKey(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub public_url: String,
    pub admin_token: String,
    pub listen: String,
    pub data_dir: String,
    pub durability: DurabilityConfig,
    pub snapshots: SnapshotConfig,
    pub provider: ProvidersConfig,
    pub batches: BatchesConfig,
    pub webhooks: WebhooksConfig,
    pub limits: LimitsConfig,
    pub log: LogConfig,
    pub plans: BTreeMap<String, Plan>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DurabilityConfig {
    /// `sync`, `interval` or `none`.
    pub mode: String,
    /// Flush period of `interval`.
    pub interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    pub every_events: u64,
    pub every_s: u64,
    pub kept: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvidersConfig {
    pub simulated: SimulatedConfig,
    pub replicate: HttpProviderConfig,
    pub fal: HttpProviderConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulatedConfig {
    pub latency_ms: [u64; 2],
    pub transient_failure_rate: f64,
    pub permanent_failure_rate: f64,
    pub seed: u64,
    pub concurrency_max: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpProviderConfig {
    pub enabled: bool,
    pub base_url: String,
    /// Name of the environment variable holding the token (the token is never in a file).
    pub token_env: String,
    pub concurrency_max: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchesConfig {
    pub attempts_max: u32,
    pub attempt_timeout_s: u64,
    pub expires_in_s_default: u64,
    pub expires_in_s_max: u64,
    pub store_url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhooksConfig {
    pub allow_private_targets: bool,
    pub allow_http: bool,
    pub retry_schedule_s: Vec<f64>,
    pub timeout_s: f64,
    pub disable_after_s: f64,
    pub concurrency_max: usize,
    pub concurrency_per_endpoint: usize,
    pub endpoints_per_tenant_max: usize,
    pub deliveries_kept_per_tenant: usize,
    pub pending_per_endpoint_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body (413 beyond).
    pub body_bytes_max: usize,
    pub list_limit_default: usize,
    pub list_limit_max: usize,
    pub idempotency_retention_s: u64,
    pub idempotency_keys_max: usize,
    /// Keys tracked by the rate limiter before stale ones are evicted.
    pub rate_limiter_keys_max: usize,
    pub mailbox_capacity: usize,
    pub access_log_max: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub format: String,
    pub level: String,
}

/// A plan's limits (SPEC §1: data, not code).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Sustained requests per second per key (GCRA).
    pub rate_per_s: u32,
    /// Requests a key may make at once after being idle.
    pub burst: u32,
    pub max_items_per_batch: u64,
    /// Items the tenant may create per UTC day.
    pub items_per_day: u64,
    /// Attempts in flight for the tenant.
    pub concurrency: u32,
    /// Downloads carry a watermark.
    pub watermark: bool,
    /// Webhook endpoints allowed.
    pub webhooks: bool,
    /// Embed domain whitelist allowed.
    pub embed_whitelist: bool,
    /// Keys may carry a daily credit spend cap.
    pub key_spend_caps: bool,
}

impl Config {
    /// Defaults, then the file (if any), then the process environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_with_env(file, std::env::vars())
    }

    /// As `load`, with the environment given (tests).
    pub fn load_with_env(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut merged: toml::Table = DEFAULTS.parse().expect("the embedded defaults parse");
        let defaults = merged.clone();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let user: toml::Table =
                text.parse()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        path: path.display().to_string(),
                        message: e.to_string(),
                    })?;
            check_known(&user, &defaults, "")?;
            merge(&mut merged, user);
        }
        let mut overrides = toml::Table::new();
        let mut vars: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX) && !CLIENT_ENV_VARS.contains(&k.as_str()))
            .collect();
        vars.sort();
        for (name, raw) in vars {
            let path: Vec<String> = name[ENV_PREFIX.len()..]
                .split("__")
                .map(|p| p.to_ascii_lowercase())
                .collect();
            if path.iter().any(String::is_empty) {
                return Err(ConfigError::UnknownKey(name));
            }
            set_path(&mut overrides, &path, parse_env_value(&raw))
                .map_err(|_| ConfigError::UnknownKey(name.clone()))?;
            check_known(&overrides, &defaults, "").map_err(|_| {
                ConfigError::UnknownKey(format!("{} (from {name})", path.join(".")))
            })?;
        }
        // A new plan given only by environment is incomplete by nature; its keys were
        // checked above against the plan keys.
        merge(&mut merged, overrides);
        let cfg: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.message().to_owned()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if !["sync", "interval", "none"].contains(&self.durability.mode.as_str()) {
            return bad(format!(
                "durability.mode must be sync, interval or none, not {:?}",
                self.durability.mode
            ));
        }
        if !["text", "json"].contains(&self.log.format.as_str()) {
            return bad(format!(
                "log.format must be text or json, not {:?}",
                self.log.format
            ));
        }
        let s = &self.provider.simulated;
        if s.latency_ms[0] > s.latency_ms[1] {
            return bad("provider.simulated.latency_ms must be [min, max] with min <= max".into());
        }
        for (k, r) in [
            ("transient_failure_rate", s.transient_failure_rate),
            ("permanent_failure_rate", s.permanent_failure_rate),
        ] {
            if !(0.0..=1.0).contains(&r) {
                return bad(format!("provider.simulated.{k} must be within 0..=1"));
            }
        }
        if s.transient_failure_rate + s.permanent_failure_rate > 1.0 {
            return bad("provider.simulated failure rates must add up to at most 1".into());
        }
        if self.plans.is_empty() {
            return bad("at least one plan is needed".into());
        }
        for (name, p) in &self.plans {
            if p.rate_per_s == 0 || p.burst == 0 {
                return bad(format!(
                    "plans.{name}: rate_per_s and burst must be at least 1"
                ));
            }
            if p.max_items_per_batch == 0 || p.concurrency == 0 {
                return bad(format!(
                    "plans.{name}: max_items_per_batch and concurrency must be at least 1"
                ));
            }
        }
        let l = &self.limits;
        if l.body_bytes_max == 0
            || l.list_limit_default == 0
            || l.list_limit_max < l.list_limit_default
            || l.rate_limiter_keys_max == 0
            || l.mailbox_capacity == 0
        {
            return bad(
                "limits: sizes must be at least 1 and list_limit_max >= list_limit_default".into(),
            );
        }
        if self.batches.attempts_max == 0 || self.batches.attempts_max > 100 {
            return bad("batches.attempts_max must be within 1..=100".into());
        }
        let w = &self.webhooks;
        if w.retry_schedule_s.is_empty() || w.retry_schedule_s.len() > 100 {
            return bad("webhooks.retry_schedule_s must have 1..=100 entries".into());
        }
        let seconds = |v: f64| v.is_finite() && (0.0..=30.0 * 86_400.0).contains(&v);
        if !w.retry_schedule_s.iter().all(|&s| seconds(s)) {
            return bad("webhooks.retry_schedule_s: each delay within 0..=2592000 s".into());
        }
        if !seconds(w.timeout_s) || w.timeout_s < 0.1 || !seconds(w.disable_after_s) {
            return bad(
                "webhooks: timeout_s within 0.1..=2592000, disable_after_s within 0..=2592000"
                    .into(),
            );
        }
        if w.concurrency_max == 0
            || w.concurrency_per_endpoint == 0
            || w.endpoints_per_tenant_max == 0
            || w.deliveries_kept_per_tenant == 0
            || w.pending_per_endpoint_max == 0
        {
            return bad("webhooks: concurrency and size limits must be at least 1".into());
        }
        url::Url::parse(&self.public_url)
            .map_err(|e| ConfigError::Invalid(format!("public_url: {e}")))?;
        Ok(())
    }

    /// The WAL durability mode.
    pub fn durability(&self) -> wal::Durability {
        match self.durability.mode.as_str() {
            "interval" => wal::Durability::Interval(self.durability.interval_ms.max(1)),
            "none" => wal::Durability::None,
            _ => wal::Durability::Sync,
        }
    }
}

/// Refuses keys of `user` that `defaults` does not have (plans: any name, plan keys).
fn check_known(
    user: &toml::Table,
    defaults: &toml::Table,
    prefix: &str,
) -> Result<(), ConfigError> {
    for (k, v) in user {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let known = if prefix == "plans" {
            // Any plan name; its keys are those of a default plan.
            defaults.get("pro")
        } else {
            defaults.get(k)
        };
        match (known, v) {
            (None, _) => return Err(ConfigError::UnknownKey(path)),
            (Some(toml::Value::Table(d)), toml::Value::Table(u)) => check_known(u, d, &path)?,
            _ => {}
        }
    }
    Ok(())
}

/// Deep merge: tables merge key by key, anything else replaces.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(t: &mut toml::Table, path: &[String], v: toml::Value) -> Result<(), ()> {
    match path {
        [] => Err(()),
        [last] => {
            t.insert(last.clone(), v);
            Ok(())
        }
        [first, rest @ ..] => {
            let e = t
                .entry(first.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            match e {
                toml::Value::Table(inner) => set_path(inner, rest, v),
                _ => Err(()),
            }
        }
    }
}

/// An environment value as TOML (`5`, `true`, `[1, 2]`, `"x"`), else a plain string.
fn parse_env_value(raw: &str) -> toml::Value {
    let doc = format!("v = {raw}");
    match doc.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn defaults_match_the_spec() {
        let c = Config::load_with_env(None, env(&[])).unwrap();
        assert_eq!(c.public_url, "http://127.0.0.1:8080");
        assert_eq!(c.durability.mode, "sync");
        assert_eq!(c.provider.simulated.latency_ms, [200, 800]);
        assert_eq!(c.limits.body_bytes_max, 1_048_576);
        assert_eq!(c.plans["starter"].max_items_per_batch, 1);
        assert_eq!(c.plans["pro"].rate_per_s, 50);
        assert_eq!(c.plans["enterprise"].burst, 2000);
        assert_eq!(
            c.webhooks.retry_schedule_s,
            vec![0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0]
        );
    }

    #[test]
    fn file_and_env_layers_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "[plans.pro]\nburst = 7\n[plans.agency]\nrate_per_s = 1\nburst = 1\nmax_items_per_batch = 5\nitems_per_day = 9\nconcurrency = 1\nwatermark = false\nwebhooks = true\nembed_whitelist = false\nkey_spend_caps = true\n",
        )
        .unwrap();
        let c = Config::load_with_env(
            Some(&f),
            env(&[
                ("REELBATCH_PLANS__PRO__RATE_PER_S", "9"),
                ("REELBATCH_ADMIN_TOKEN", "s3cret"),
                ("REELBATCH_PROVIDER__SIMULATED__LATENCY_MS", "[1, 2]"),
                ("OTHER_VAR", "ignored"),
            ]),
        )
        .unwrap();
        assert_eq!(c.plans["pro"].burst, 7);
        assert_eq!(c.plans["pro"].rate_per_s, 9);
        assert_eq!(
            c.plans["pro"].max_items_per_batch, 200,
            "unset keys keep defaults"
        );
        assert_eq!(c.plans["agency"].max_items_per_batch, 5);
        assert_eq!(c.admin_token, "s3cret");
        assert_eq!(c.provider.simulated.latency_ms, [1, 2]);

        std::fs::write(&f, "[limits]\nbody_bytes_mx = 5\n").unwrap();
        let e = Config::load_with_env(Some(&f), env(&[])).unwrap_err();
        assert!(e.to_string().contains("limits.body_bytes_mx"), "{e}");
        std::fs::write(&f, "[plans.pro]\nburst_size = 5\n").unwrap();
        let e = Config::load_with_env(Some(&f), env(&[])).unwrap_err();
        assert!(e.to_string().contains("plans.pro.burst_size"), "{e}");
        // The submit client's variables are not configuration.
        Config::load_with_env(
            None,
            env(&[("REELBATCH_URL", "http://x"), ("REELBATCH_API_KEY", "rb_x")]),
        )
        .unwrap();
        let e = Config::load_with_env(None, env(&[("REELBATCH_LIMITS__NOPE", "1")])).unwrap_err();
        assert!(e.to_string().contains("limits.nope"), "{e}");
        let e = Config::load_with_env(None, env(&[("REELBATCH_DURABILITY__MODE", "fast")]))
            .unwrap_err();
        assert!(e.to_string().contains("durability.mode"), "{e}");
        let e = Config::load_with_env(None, env(&[("REELBATCH_LIMITS__BODY_BYTES_MAX", "big")]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)), "{e}");
        std::fs::write(&f, "[plans.tiny]\nrate_per_s = 1\n").unwrap();
        let e = Config::load_with_env(Some(&f), env(&[])).unwrap_err();
        assert!(e.to_string().contains("missing field"), "{e}");
    }
}
