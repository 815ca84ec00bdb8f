//! Tenants and API keys: who may call, on which plan, with which scopes.
//!
//! Accounts change rarely (an admin creates a tenant or a key), so they live in one
//! `RwLock<AccountsState>` instead of actors: a change takes the write lock, appends its
//! event to the WAL (so log order is apply order), applies it, drops the lock and then
//! waits for durability before answering. Authentication only takes the read lock.
//!
//! A key's secret is `rbk_<26 chars of the key id>_<64 hex chars of 32 random bytes>`.
//! Only SHA-256 of the whole secret is stored (in memory, the WAL and snapshots); the id
//! inside the secret finds the key without scanning, and the hashes are compared in
//! constant time. No credit moves here: tenants' wallets are opened by the engine.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::ids::{KeyId, TenantId};

/// Customer scopes (SPEC §5), bit `i` of a key's scope set is `SCOPES[i]`.
pub const SCOPES: [&str; 5] = [
    "batches:write",
    "batches:read",
    "wallet:read",
    "videos:read",
    "webhooks:write",
];
/// Every scope (the default for a key created without a list).
pub const ALL_SCOPES: u8 = (1 << SCOPES.len()) - 1;
/// Longest tenant or key name.
pub const NAME_CHARS_MAX: usize = 200;
/// Keys one tenant may hold (revoked ones included: they stay listed for the audit).
pub const KEYS_PER_TENANT_MAX: usize = 1000;
/// Longest admin request id remembered with a tenant or key.
pub const REQUEST_ID_CHARS_MAX: usize = 255;

/// The bit of a scope name.
pub fn scope_bit(name: &str) -> Option<u8> {
    SCOPES.iter().position(|s| *s == name).map(|i| 1u8 << i)
}

/// Scope names of a set, in `SCOPES` order.
pub fn scope_names(set: u8) -> Vec<&'static str> {
    SCOPES
        .iter()
        .enumerate()
        .filter(|(i, _)| set & (1 << i) != 0)
        .map(|(_, s)| *s)
        .collect()
}

/// A fact about tenants or keys.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum AccountEvent {
    /// A tenant exists on a plan.
    TenantCreated {
        tenant: TenantId,
        name: String,
        plan: String,
        /// The admin's `Idempotency-Key`: a repeat after a crash finds this tenant.
        request_id: Option<String>,
        /// Key of its signed links and embeds (random; rotated to revoke them all).
        link_secret: [u8; 32],
        at_ms: u64,
    },
    /// A key exists; only its secret's hash is kept.
    KeyCreated {
        key: KeyId,
        tenant: TenantId,
        name: String,
        secret_hash: [u8; 32],
        scopes: u8,
        expires_at_ms: Option<u64>,
        daily_credit_limit: Option<u64>,
        request_id: Option<String>,
        at_ms: u64,
    },
    /// A key stops working.
    KeyRevoked { key: KeyId, at_ms: u64 },
    /// A new link secret: every link and embed URL signed before stops working.
    LinkSecretRotated {
        tenant: TenantId,
        link_secret: [u8; 32],
        at_ms: u64,
    },
    /// A domain (`example.com` or `*.example.com`) may embed the tenant's videos.
    EmbedDomainAdded {
        tenant: TenantId,
        domain: String,
        at_ms: u64,
    },
    /// A domain may no longer embed them.
    EmbedDomainRemoved {
        tenant: TenantId,
        domain: String,
        at_ms: u64,
    },
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Tenant {
    pub id: TenantId,
    /// Display name (not unique).
    pub name: String,
    /// Plan name; its limits come from the config (data, not code).
    pub plan: String,
    /// The admin request that created it (repeat detection).
    pub request_id: Option<String>,
    pub created_at_ms: u64,
    /// HMAC key of its signed links and embeds (never shown; rotation revokes them).
    pub link_secret: [u8; 32],
    /// Hosts whose pages may embed its videos (sorted, bounded).
    pub embed_domains: Vec<String>,
}

/// An API key.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ApiKey {
    pub id: KeyId,
    pub tenant: TenantId,
    pub name: String,
    /// SHA-256 of the secret: the secret itself is never stored.
    pub secret_hash: [u8; 32],
    /// Bit set over `SCOPES`.
    pub scopes: u8,
    /// After this the key is refused.
    pub expires_at_ms: Option<u64>,
    /// Credits the key may commit (hold) per UTC day.
    pub daily_credit_limit: Option<u64>,
    /// The admin request that created it (repeat detection).
    pub request_id: Option<String>,
    pub created_at_ms: u64,
    /// Set once revoked; revoked keys are refused.
    pub revoked_at_ms: Option<u64>,
}

impl ApiKey {
    /// Usable at `now_ms`: neither revoked nor expired.
    pub fn active(&self, now_ms: u64) -> bool {
        self.revoked_at_ms.is_none() && self.expires_at_ms.is_none_or(|e| now_ms < e)
    }
}

/// All tenants and keys.
#[derive(
    Debug, Clone, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct AccountsState {
    pub tenants: BTreeMap<TenantId, Tenant>,
    pub keys: BTreeMap<KeyId, ApiKey>,
    /// LSN of the last event applied: replay skips events at or below it (fuzzy snapshots).
    pub last_lsn: u64,
}

/// Why an account operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountError {
    /// No such tenant or key.
    #[error("not found")]
    NotFound,
    /// A field is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The request id was used with a different request.
    #[error("request id {0:?} was already used with a different request")]
    KeyReused(String),
    /// The log refused the write: nothing changed.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

impl AccountsState {
    /// Applies an event (live and in replay).
    pub fn apply(&mut self, event: &AccountEvent, lsn: u64) {
        assert!(lsn > self.last_lsn, "events apply in log order");
        match event {
            AccountEvent::TenantCreated {
                tenant,
                name,
                plan,
                request_id,
                link_secret,
                at_ms,
            } => {
                let prev = self.tenants.insert(
                    *tenant,
                    Tenant {
                        id: *tenant,
                        name: name.clone(),
                        plan: plan.clone(),
                        request_id: request_id.clone(),
                        created_at_ms: *at_ms,
                        link_secret: *link_secret,
                        embed_domains: Vec::new(),
                    },
                );
                assert!(prev.is_none(), "a tenant is created once");
            }
            AccountEvent::KeyCreated {
                key,
                tenant,
                name,
                secret_hash,
                scopes,
                expires_at_ms,
                daily_credit_limit,
                request_id,
                at_ms,
            } => {
                assert!(self.tenants.contains_key(tenant), "keys belong to tenants");
                let prev = self.keys.insert(
                    *key,
                    ApiKey {
                        id: *key,
                        tenant: *tenant,
                        name: name.clone(),
                        secret_hash: *secret_hash,
                        scopes: *scopes,
                        expires_at_ms: *expires_at_ms,
                        daily_credit_limit: *daily_credit_limit,
                        request_id: request_id.clone(),
                        created_at_ms: *at_ms,
                        revoked_at_ms: None,
                    },
                );
                assert!(prev.is_none(), "a key is created once");
            }
            AccountEvent::KeyRevoked { key, at_ms } => {
                let k = self.keys.get_mut(key).expect("revoked keys exist");
                if k.revoked_at_ms.is_none() {
                    k.revoked_at_ms = Some(*at_ms);
                }
            }
            AccountEvent::LinkSecretRotated {
                tenant,
                link_secret,
                ..
            } => {
                let t = self.tenants.get_mut(tenant).expect("tenants exist");
                t.link_secret = *link_secret;
            }
            AccountEvent::EmbedDomainAdded { tenant, domain, .. } => {
                let t = self.tenants.get_mut(tenant).expect("tenants exist");
                if let Err(i) = t.embed_domains.binary_search(domain) {
                    t.embed_domains.insert(i, domain.clone());
                }
            }
            AccountEvent::EmbedDomainRemoved { tenant, domain, .. } => {
                let t = self.tenants.get_mut(tenant).expect("tenants exist");
                t.embed_domains.retain(|d| d != domain);
            }
        }
        self.last_lsn = lsn;
    }

    /// A tenant created by this admin request id.
    pub fn tenant_by_request(&self, request_id: &str) -> Option<&Tenant> {
        self.tenants
            .values()
            .find(|t| t.request_id.as_deref() == Some(request_id))
    }

    /// A key of `tenant` created by this admin request id.
    pub fn key_by_request(&self, tenant: TenantId, request_id: &str) -> Option<&ApiKey> {
        self.keys
            .values()
            .find(|k| k.tenant == tenant && k.request_id.as_deref() == Some(request_id))
    }
}

/// A fresh secret for `key` and its hash.
pub fn new_secret(key: KeyId) -> Result<(String, [u8; 32]), AccountError> {
    let mut random = [0u8; 32];
    getrandom::fill(&mut random)
        .map_err(|e| AccountError::Unavailable(format!("no randomness: {e}")))?;
    let mut secret = String::with_capacity(4 + 26 + 1 + 64);
    secret.push_str("rbk_");
    secret.push_str(&key.to_string()[KeyId::PREFIX.len()..]);
    secret.push('_');
    for b in random {
        secret.push_str(&format!("{b:02x}"));
    }
    let hash = hash_secret(&secret);
    Ok((secret, hash))
}

/// SHA-256 of a presented secret.
pub fn hash_secret(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// The key id a secret names, if it has the shape of one.
pub fn key_of_secret(secret: &str) -> Option<KeyId> {
    let rest = secret.strip_prefix("rbk_")?;
    let (id, random) = rest.split_once('_')?;
    if random.len() != 64 || !random.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    format!("{}{id}", KeyId::PREFIX).parse().ok()
}

/// Checks a presented secret against a key in constant time (over the hashes).
pub fn secret_matches(key: &ApiKey, secret: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(hash_secret(secret).ct_eq(&key.secret_hash))
}

fn check_name(what: &str, name: &str) -> Result<(), AccountError> {
    let n = name.chars().count();
    if n == 0 || n > NAME_CHARS_MAX || name.chars().any(char::is_control) {
        return Err(AccountError::Invalid(format!(
            "{what} must be 1..={NAME_CHARS_MAX} characters without control characters"
        )));
    }
    Ok(())
}

fn check_request_id(r: &Option<String>) -> Result<(), AccountError> {
    match r {
        Some(r) if r.is_empty() || r.chars().count() > REQUEST_ID_CHARS_MAX => {
            Err(AccountError::Invalid(format!(
                "Idempotency-Key must be 1..={REQUEST_ID_CHARS_MAX} characters"
            )))
        }
        _ => Ok(()),
    }
}

/// Embed domains one tenant may list.
pub const EMBED_DOMAINS_MAX: usize = 100;

fn random_secret() -> Result<[u8; 32], AccountError> {
    let mut s = [0u8; 32];
    getrandom::fill(&mut s).map_err(|e| AccountError::Unavailable(e.to_string()))?;
    Ok(s)
}

/// A whitelist entry: a lowercase host name (`example.com`) or a wildcard over its
/// subdomains (`*.example.com`); no scheme, port, path or IP address.
pub fn check_embed_domain(raw: &str) -> Result<String, AccountError> {
    let d = raw.trim().to_ascii_lowercase();
    let host = d.strip_prefix("*.").unwrap_or(&d);
    let bad = || {
        AccountError::Invalid(format!(
            "domain {raw:?} must be a host name like example.com or *.example.com"
        ))
    };
    if host.len() > 253 || !host.contains('.') || host.parse::<std::net::IpAddr>().is_ok() {
        return Err(bad());
    }
    for label in host.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(d)
}

/// Whether a request's host (from `Origin` or `Referer`) is on a whitelist:
/// `example.com` matches itself only, `*.example.com` matches any subdomain of it.
pub fn embed_allowed(whitelist: &[String], host: &str) -> bool {
    let host = host.to_ascii_lowercase();
    whitelist.iter().any(|d| match d.strip_prefix("*.") {
        Some(base) => host
            .strip_suffix(base)
            .is_some_and(|rest| rest.len() > 1 && rest.ends_with('.')),
        None => host == *d,
    })
}

/// A key to create.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub name: String,
    /// Bit set over `SCOPES`.
    pub scopes: u8,
    pub expires_at_ms: Option<u64>,
    pub daily_credit_limit: Option<u64>,
    /// The admin's `Idempotency-Key`.
    pub request_id: Option<String>,
}

impl crate::engine::Engine {
    fn append_account(
        &self,
        acc: &mut AccountsState,
        event: AccountEvent,
    ) -> Result<wal::Durable, AccountError> {
        let record = crate::engine::events::Record::Account(event.clone());
        let durable = crate::engine::journal::append(&self.inner.wal, &record)
            .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        acc.apply(&event, durable.lsn());
        self.inner
            .events_appended
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(durable)
    }

    /// Creates a tenant (and its wallet). A repeat of `request_id` returns the first
    /// tenant (`false`: not created now); with a different name or plan it is refused.
    pub async fn create_tenant(
        &self,
        name: &str,
        plan: &str,
        request_id: Option<String>,
    ) -> Result<(Tenant, bool), AccountError> {
        check_name("name", name)?;
        check_request_id(&request_id)?;
        let (tenant, durable) = {
            let mut acc = self.inner.accounts.write().expect("not poisoned");
            if let Some(t) = request_id.as_deref().and_then(|r| acc.tenant_by_request(r)) {
                if t.name != name || t.plan != plan {
                    return Err(AccountError::KeyReused(request_id.unwrap_or_default()));
                }
                (t.clone(), None)
            } else {
                let now = self.now_ms();
                let id = TenantId::generate(now);
                let event = AccountEvent::TenantCreated {
                    tenant: id,
                    name: name.to_owned(),
                    plan: plan.to_owned(),
                    request_id,
                    link_secret: random_secret()?,
                    at_ms: now,
                };
                let durable = self.append_account(&mut acc, event)?;
                (acc.tenants[&id].clone(), Some(durable))
            }
        };
        let created = durable.is_some();
        if let Some(d) = durable {
            d.await
                .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        }
        // Also for a repeat: the opening may have been lost in a crash.
        self.open_wallet(tenant.id)
            .await
            .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        Ok((tenant, created))
    }

    /// A tenant.
    pub fn tenant(&self, id: TenantId) -> Option<Tenant> {
        self.inner
            .accounts
            .read()
            .expect("not poisoned")
            .tenants
            .get(&id)
            .cloned()
    }

    /// Tenants with id > `after`, oldest first, at most `limit`.
    pub fn tenant_page(&self, after: Option<TenantId>, limit: usize) -> Vec<Tenant> {
        let acc = self.inner.accounts.read().expect("not poisoned");
        let from = after.map_or(TenantId(0), |a| TenantId(a.0.saturating_add(1)));
        acc.tenants
            .range(from..)
            .filter(|(id, _)| after.is_none_or(|a| **id > a))
            .take(limit)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Creates a key for `tenant`; the secret is returned only when created now (a repeat
    /// of `request_id` returns the first key without its secret: it is not stored).
    pub async fn create_key(
        &self,
        tenant: TenantId,
        new: NewKey,
    ) -> Result<(ApiKey, Option<String>), AccountError> {
        check_name("name", &new.name)?;
        check_request_id(&new.request_id)?;
        if new.scopes == 0 || new.scopes & !ALL_SCOPES != 0 {
            return Err(AccountError::Invalid(
                "scopes must be a non-empty list of known scopes".into(),
            ));
        }
        let (key, secret, durable) = {
            let mut acc = self.inner.accounts.write().expect("not poisoned");
            if !acc.tenants.contains_key(&tenant) {
                return Err(AccountError::NotFound);
            }
            if let Some(k) = new
                .request_id
                .as_deref()
                .and_then(|r| acc.key_by_request(tenant, r))
            {
                if k.name != new.name
                    || k.scopes != new.scopes
                    || k.expires_at_ms != new.expires_at_ms
                    || k.daily_credit_limit != new.daily_credit_limit
                {
                    return Err(AccountError::KeyReused(new.request_id.unwrap_or_default()));
                }
                (k.clone(), None, None)
            } else {
                let held = acc.keys.values().filter(|k| k.tenant == tenant).count();
                if held >= KEYS_PER_TENANT_MAX {
                    return Err(AccountError::Invalid(format!(
                        "a tenant holds at most {KEYS_PER_TENANT_MAX} keys"
                    )));
                }
                let now = self.now_ms();
                let id = KeyId::generate(now);
                let (secret, secret_hash) = new_secret(id)?;
                let event = AccountEvent::KeyCreated {
                    key: id,
                    tenant,
                    name: new.name,
                    secret_hash,
                    scopes: new.scopes,
                    expires_at_ms: new.expires_at_ms,
                    daily_credit_limit: new.daily_credit_limit,
                    request_id: new.request_id,
                    at_ms: now,
                };
                let durable = self.append_account(&mut acc, event)?;
                (acc.keys[&id].clone(), Some(secret), Some(durable))
            }
        };
        if let Some(d) = durable {
            d.await
                .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        }
        Ok((key, secret))
    }

    /// Revokes a key (a repeat changes nothing and returns the key).
    pub async fn revoke_key(&self, key: KeyId) -> Result<ApiKey, AccountError> {
        let (k, durable) = {
            let mut acc = self.inner.accounts.write().expect("not poisoned");
            let k = acc.keys.get(&key).ok_or(AccountError::NotFound)?;
            if k.revoked_at_ms.is_some() {
                (k.clone(), None)
            } else {
                let event = AccountEvent::KeyRevoked {
                    key,
                    at_ms: self.now_ms(),
                };
                let durable = self.append_account(&mut acc, event)?;
                (acc.keys[&key].clone(), Some(durable))
            }
        };
        if let Some(d) = durable {
            d.await
                .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        }
        Ok(k)
    }

    /// A new link secret for a tenant: every signed link and embed URL it issued stops
    /// working.
    pub async fn rotate_link_secret(&self, tenant: TenantId) -> Result<(), AccountError> {
        let durable = {
            let mut acc = self.inner.accounts.write().expect("not poisoned");
            if !acc.tenants.contains_key(&tenant) {
                return Err(AccountError::NotFound);
            }
            let event = AccountEvent::LinkSecretRotated {
                tenant,
                link_secret: random_secret()?,
                at_ms: self.now_ms(),
            };
            self.append_account(&mut acc, event)?
        };
        durable
            .await
            .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        Ok(())
    }

    /// Adds (`true`) or removes an embed domain; returns it as stored (normalised).
    pub async fn set_embed_domain(
        &self,
        tenant: TenantId,
        domain: &str,
        add: bool,
    ) -> Result<String, AccountError> {
        let domain = check_embed_domain(domain)?;
        let durable = {
            let mut acc = self.inner.accounts.write().expect("not poisoned");
            let t = acc.tenants.get(&tenant).ok_or(AccountError::NotFound)?;
            let present = t.embed_domains.contains(&domain);
            if present == add {
                None // already so: nothing to record
            } else {
                if add && t.embed_domains.len() >= EMBED_DOMAINS_MAX {
                    return Err(AccountError::Invalid(format!(
                        "a tenant may list at most {EMBED_DOMAINS_MAX} embed domains"
                    )));
                }
                let at_ms = self.now_ms();
                let domain = domain.clone();
                let event = if add {
                    AccountEvent::EmbedDomainAdded {
                        tenant,
                        domain,
                        at_ms,
                    }
                } else {
                    AccountEvent::EmbedDomainRemoved {
                        tenant,
                        domain,
                        at_ms,
                    }
                };
                Some(self.append_account(&mut acc, event)?)
            }
        };
        if let Some(d) = durable {
            d.await
                .map_err(|e| AccountError::Unavailable(e.to_string()))?;
        } else if !add {
            return Err(AccountError::NotFound);
        }
        Ok(domain)
    }

    /// A key.
    pub fn api_key(&self, id: KeyId) -> Option<ApiKey> {
        self.inner
            .accounts
            .read()
            .expect("not poisoned")
            .keys
            .get(&id)
            .cloned()
    }

    /// The tenant's keys, oldest first.
    pub fn keys_of(&self, tenant: TenantId) -> Vec<ApiKey> {
        self.inner
            .accounts
            .read()
            .expect("not poisoned")
            .keys
            .values()
            .filter(|k| k.tenant == tenant)
            .cloned()
            .collect()
    }

    /// The active key a presented secret belongs to (checked in constant time), with its
    /// tenant, read under one lock.
    pub fn authenticate(&self, secret: &str) -> Option<(ApiKey, Tenant)> {
        let id = key_of_secret(secret)?;
        let now = self.now_ms();
        let acc = self.inner.accounts.read().expect("not poisoned");
        let key = acc.keys.get(&id)?;
        if !(secret_matches(key, secret) && key.active(now)) {
            return None;
        }
        let tenant = acc.tenants.get(&key.tenant)?;
        Some((key.clone(), tenant.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_name_their_key_and_only_their_hash_matches() {
        let id = KeyId::generate(1_700_000_000_000);
        let (secret, hash) = new_secret(id).unwrap();
        assert_eq!(key_of_secret(&secret), Some(id));
        let key = ApiKey {
            id,
            tenant: TenantId(1),
            name: "k".into(),
            secret_hash: hash,
            scopes: ALL_SCOPES,
            expires_at_ms: Some(10),
            daily_credit_limit: None,
            request_id: None,
            created_at_ms: 0,
            revoked_at_ms: None,
        };
        assert!(secret_matches(&key, &secret));
        let mut wrong = secret.clone();
        wrong.pop();
        wrong.push(if secret.ends_with('0') { '1' } else { '0' });
        assert!(!secret_matches(&key, &wrong));
        assert!(key.active(9) && !key.active(10));
        assert_eq!(key_of_secret("rbk_short_00"), None);
        assert_eq!(key_of_secret("Bearer nonsense"), None);
        assert_eq!(scope_names(ALL_SCOPES).len(), SCOPES.len());
        assert_eq!(scope_bit("wallet:read"), Some(4));
        assert_eq!(scope_bit("admin"), None);
    }
}
