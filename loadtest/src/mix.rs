//! The operation mix: what a request does, how often, and the HTTP request for it.

use serde_json::json;

use crate::provision::Tenant;

/// One kind of request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Op {
    /// `POST /v1/batches/quote` (3 × 3 template; no hold).
    Quote,
    /// `POST /v1/batches` (2 items, a fresh `Idempotency-Key`): a durable hold, then work.
    Create,
    /// `GET /v1/batches/{id}`.
    Batch,
    /// `GET /v1/batches/{id}/items?limit=50`.
    Items,
    /// `GET /v1/wallet`.
    Wallet,
    /// `GET /v1/wallet/ledger?limit=50`.
    Ledger,
    /// `GET /v1/videos/{id}/content` (the whole body).
    Download,
    /// `POST /admin/v1/tenants/{id}/top-ups` (a fresh key; the amount depends on the
    /// funding mode, `funding.rs`): a durable write.
    TopUp,
}

/// Every op, in report order.
pub const OPS: [Op; 8] = [
    Op::Quote,
    Op::Create,
    Op::Batch,
    Op::Items,
    Op::Wallet,
    Op::Ledger,
    Op::Download,
    Op::TopUp,
];

impl Op {
    /// The name used in `--mix` and reports.
    pub fn name(self) -> &'static str {
        match self {
            Op::Quote => "quote",
            Op::Create => "create",
            Op::Batch => "batch",
            Op::Items => "items",
            Op::Wallet => "wallet",
            Op::Ledger => "ledger",
            Op::Download => "download",
            Op::TopUp => "topup",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        OPS.iter().copied().find(|o| o.name() == s)
    }

    /// Videos this op asks for (the capacity table converts videos/day into requests).
    pub fn videos(self) -> u64 {
        match self {
            Op::Create => CREATE_ITEMS,
            _ => 0,
        }
    }
}

/// Items of each `create`.
pub const CREATE_ITEMS: u64 = 2;

/// The default mix: mostly reads, as dashboards and integrations poll; a few creations.
pub const DEFAULT_MIX: &str =
    "quote=10,create=5,batch=25,items=10,wallet=25,ledger=10,download=10,topup=5";

/// Weighted ops.
#[derive(Debug, Clone)]
pub struct Mix {
    /// (op, weight), weights > 0.
    pub ops: Vec<(Op, u32)>,
    /// Sum of the weights.
    pub total: u32,
}

impl Mix {
    /// Parses `op=weight,…`.
    pub fn parse(s: &str) -> Result<Mix, String> {
        let mut ops = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, w) = part
                .split_once('=')
                .ok_or_else(|| format!("mix entry {part:?} is not op=weight"))?;
            let op = Op::parse(name.trim()).ok_or_else(|| {
                let names: Vec<&str> = OPS.iter().map(|o| o.name()).collect();
                format!("unknown op {name:?} (one of {})", names.join(", "))
            })?;
            let w: u32 = w
                .trim()
                .parse()
                .map_err(|_| format!("weight of {name} is not a whole number"))?;
            if w > 10_000 {
                return Err(format!("weight of {name} is above 10000"));
            }
            if ops.iter().any(|(o, _)| *o == op) {
                return Err(format!("{name} appears twice"));
            }
            if w > 0 {
                ops.push((op, w));
            }
        }
        let total = ops.iter().map(|(_, w)| w).sum();
        if total == 0 {
            return Err("the mix has no op with a weight above 0".into());
        }
        Ok(Mix { ops, total })
    }

    /// The op for a uniform random number.
    pub fn pick(&self, r: u64) -> Op {
        let mut x = (r % self.total as u64) as u32;
        for (op, w) in &self.ops {
            if x < *w {
                return *op;
            }
            x -= w;
        }
        self.ops[0].0
    }

    /// Videos per request on average.
    pub fn videos_per_request(&self) -> f64 {
        let v: u64 = self.ops.iter().map(|(o, w)| o.videos() * *w as u64).sum();
        v as f64 / self.total as f64
    }

    /// As given to `--mix`.
    pub fn describe(&self) -> String {
        let parts: Vec<String> = self
            .ops
            .iter()
            .map(|(o, w)| format!("{}={w}", o.name()))
            .collect();
        parts.join(",")
    }
}

/// The request for `op` on `tenant`; `n` makes idempotency keys unique within `run`.
#[allow(clippy::too_many_arguments)]
pub fn request(
    http: &reqwest::Client,
    base: &str,
    admin: &str,
    op: Op,
    tenant: &Tenant,
    run: &str,
    n: u64,
    topup_credits: u64,
) -> reqwest::RequestBuilder {
    let key = &tenant.key;
    match op {
        Op::Quote => http
            .post(format!("{base}/v1/batches/quote"))
            .bearer_auth(key)
            .json(&json!({"template": "{a} shot of {b}", "variables": {
                "a": ["calm", "neon", "noir"], "b": ["rain", "dawn", "a harbour"]}})),
        Op::Create => http
            .post(format!("{base}/v1/batches"))
            .bearer_auth(key)
            .header("idempotency-key", format!("lt-{run}-{n}"))
            .json(&json!({"template": "{a} at dawn", "variables": {"a": ["fox", "owl"]}})),
        Op::Batch => http
            .get(format!("{base}/v1/batches/{}", tenant.batch))
            .bearer_auth(key),
        Op::Items => http
            .get(format!("{base}/v1/batches/{}/items?limit=50", tenant.batch))
            .bearer_auth(key),
        Op::Wallet => http.get(format!("{base}/v1/wallet")).bearer_auth(key),
        Op::Ledger => http
            .get(format!("{base}/v1/wallet/ledger?limit=50"))
            .bearer_auth(key),
        Op::Download => http
            .get(format!("{base}/v1/videos/{}/content", tenant.video))
            .bearer_auth(key),
        Op::TopUp => http
            .post(format!("{base}/admin/v1/tenants/{}/top-ups", tenant.id))
            .bearer_auth(admin)
            .header("idempotency-key", format!("lt-{run}-{n}"))
            .json(&json!({"amount": topup_credits, "kind": "paid"})),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixes_parse_pick_by_weight_and_refuse_nonsense() {
        let m = Mix::parse(DEFAULT_MIX).unwrap();
        assert_eq!(m.total, 100);
        let mut counts = std::collections::BTreeMap::new();
        for r in 0..100u64 {
            *counts.entry(m.pick(r)).or_insert(0) += 1;
        }
        assert_eq!(counts[&Op::Batch], 25);
        assert_eq!(counts[&Op::Create], 5);
        assert!((m.videos_per_request() - 0.1).abs() < 1e-9);
        assert_eq!(Mix::parse(&m.describe()).unwrap().total, 100);
        assert!(Mix::parse("wallet=0").is_err());
        assert!(Mix::parse("nope=1").is_err());
        assert!(Mix::parse("wallet").is_err());
        assert!(Mix::parse("wallet=1,wallet=2").is_err());
        assert!(Mix::parse("wallet=99999").is_err());
        assert_eq!(Mix::parse("wallet=1").unwrap().pick(12345), Op::Wallet);
    }
}
