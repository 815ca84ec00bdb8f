//! Fair scheduling of item attempts (SPEC §4).
//!
//! Batches announce items that are ready to run (`add_ready`); the dispatcher hands out
//! permits, one per attempt, round-robin across tenants with ready work and, inside a
//! tenant, round-robin across its batches, under two limits: a global one per provider and
//! one per tenant (from the plan). A permit is a value: dropping it (the attempt ended, or
//! the message carrying it was dropped because the batch stopped) returns both slots and
//! wakes the dispatcher, so capacity cannot leak.
//!
//! A provider that answered 429 is throttled until a deadline; its batches get no permits
//! meanwhile, other providers' batches keep running.
//!
//! Bounds: permits outstanding ≤ Σ provider limits; the dispatcher grants at most
//! `GRANTS_PER_ROUND_MAX` per lock hold and scans each tenant at most once per pass, so
//! one round is O(tenants with work).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::{Message, Recipient};

use crate::ids::{BatchId, TenantId};

/// Most permits granted under one lock hold (others wait for the next round).
const GRANTS_PER_ROUND_MAX: usize = 1024;

/// The right to run one attempt. Returned on drop.
pub struct Permit {
    sched: Arc<Scheduler>,
    tenant: TenantId,
    provider: Arc<str>,
}

impl Message for Permit {
    type Result = ();
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.sched.release(self.tenant, &self.provider);
    }
}

struct ProviderSlots {
    /// Jobs in flight allowed.
    limit: u32,
    /// Jobs in flight now.
    in_use: u32,
    /// No permits before this (after a 429).
    throttled_until: Option<Instant>,
}

struct BatchQ {
    batch: BatchId,
    provider: Arc<str>,
    /// Items ready to run that have no permit yet.
    ready: u64,
    /// Where permits go.
    to: Recipient<Permit>,
}

struct TenantQ {
    /// Attempts in flight allowed for this tenant (plan).
    limit: u32,
    /// Attempts in flight now.
    in_use: u32,
    /// Batches of the tenant, served round-robin.
    batches: VecDeque<BatchQ>,
}

#[derive(Default)]
struct State {
    providers: HashMap<Arc<str>, ProviderSlots>,
    tenants: HashMap<TenantId, TenantQ>,
    /// Tenants in service order (each once; those with nothing ready are dropped lazily).
    ring: VecDeque<TenantId>,
    /// Permits outstanding (for metrics and tests).
    outstanding: u64,
}

/// The scheduler. Shared by the engine, batch actors and permits.
pub struct Scheduler {
    state: Mutex<State>,
    wake: tokio::sync::Notify,
}

/// What the scheduler is doing (metrics, tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Permits handed out and not yet returned.
    pub outstanding: u64,
    /// Items announced ready and not yet granted.
    pub ready: u64,
    /// Tenants with batches registered.
    pub tenants: usize,
}

impl Scheduler {
    /// A scheduler with these providers' limits.
    pub fn new(providers: impl IntoIterator<Item = (String, u32)>) -> Arc<Scheduler> {
        let mut st = State::default();
        for (name, limit) in providers {
            st.providers.insert(
                Arc::from(name.as_str()),
                ProviderSlots {
                    limit: limit.max(1),
                    in_use: 0,
                    throttled_until: None,
                },
            );
        }
        Arc::new(Scheduler {
            state: Mutex::new(st),
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Registers a batch (no items ready yet). `tenant_limit` is the tenant's plan
    /// concurrency; the latest registration's value applies to the tenant.
    pub fn register(
        &self,
        tenant: TenantId,
        tenant_limit: u32,
        batch: BatchId,
        provider: &str,
        to: Recipient<Permit>,
    ) {
        let mut st = self.state.lock().expect("not poisoned");
        let provider: Arc<str> = match st.providers.get_key_value(provider) {
            Some((k, _)) => Arc::clone(k),
            None => {
                // An unknown provider never gets a slot; the batch actor fails such items
                // itself (it checks the registry), so this only keeps the map total.
                let k: Arc<str> = Arc::from(provider);
                st.providers.insert(
                    Arc::clone(&k),
                    ProviderSlots {
                        limit: 1,
                        in_use: 0,
                        throttled_until: None,
                    },
                );
                k
            }
        };
        let t = st.tenants.entry(tenant).or_insert_with(|| TenantQ {
            limit: 1,
            in_use: 0,
            batches: VecDeque::new(),
        });
        t.limit = tenant_limit.max(1);
        if !t.batches.iter().any(|b| b.batch == batch) {
            t.batches.push_back(BatchQ {
                batch,
                provider,
                ready: 0,
                to,
            });
        }
    }

    /// `n` more items of `batch` are ready to run.
    pub fn add_ready(&self, tenant: TenantId, batch: BatchId, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.state.lock().expect("not poisoned");
        let Some(t) = st.tenants.get_mut(&tenant) else {
            return;
        };
        let Some(b) = t.batches.iter_mut().find(|b| b.batch == batch) else {
            return;
        };
        b.ready += n;
        if !st.ring.contains(&tenant) {
            st.ring.push_back(tenant);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Forgets `batch` (finished, canceled or expired); permits already granted stay valid.
    pub fn unregister(&self, tenant: TenantId, batch: BatchId) {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(t) = st.tenants.get_mut(&tenant) {
            t.batches.retain(|b| b.batch != batch);
            if t.batches.is_empty() && t.in_use == 0 {
                st.tenants.remove(&tenant);
            }
        }
    }

    /// Sets `batch`'s ready count to zero (cancel, expiry).
    pub fn clear_ready(&self, tenant: TenantId, batch: BatchId) {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(t) = st.tenants.get_mut(&tenant) {
            if let Some(b) = t.batches.iter_mut().find(|b| b.batch == batch) {
                b.ready = 0;
            }
        }
    }

    /// The provider answered 429: no permits for it until `for_ms` from now.
    pub fn throttle(&self, provider: &str, for_ms: u64) {
        let mut st = self.state.lock().expect("not poisoned");
        if let Some(p) = st.providers.get_mut(provider) {
            let until = Instant::now() + Duration::from_millis(for_ms);
            p.throttled_until = Some(p.throttled_until.map_or(until, |t| t.max(until)));
        }
        drop(st);
        self.wake.notify_one();
    }

    /// Current figures.
    pub fn stats(&self) -> SchedulerStats {
        let st = self.state.lock().expect("not poisoned");
        SchedulerStats {
            outstanding: st.outstanding,
            ready: st
                .tenants
                .values()
                .flat_map(|t| t.batches.iter())
                .map(|b| b.ready)
                .sum(),
            tenants: st.tenants.len(),
        }
    }

    fn release(&self, tenant: TenantId, provider: &str) {
        let mut st = self.state.lock().expect("not poisoned");
        st.outstanding -= 1;
        if let Some(p) = st.providers.get_mut(provider) {
            assert!(p.in_use > 0, "provider slot returned twice");
            p.in_use -= 1;
        }
        let mut readd = false;
        if let Some(t) = st.tenants.get_mut(&tenant) {
            assert!(t.in_use > 0, "tenant slot returned twice");
            t.in_use -= 1;
            readd = t.batches.iter().any(|b| b.ready > 0);
            if t.batches.is_empty() && t.in_use == 0 {
                st.tenants.remove(&tenant);
            }
        }
        if readd && !st.ring.contains(&tenant) {
            st.ring.push_back(tenant);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// One dispatch round: grants permits fairly; returns them with their recipients and
    /// the earliest throttle deadline that blocked a grant.
    fn round(self: &Arc<Self>) -> (Vec<(Recipient<Permit>, Permit)>, Option<Instant>) {
        let now = Instant::now();
        let mut grants = Vec::new();
        let mut wake_at: Option<Instant> = None;
        let mut st = self.state.lock().expect("not poisoned");
        let st = &mut *st;
        // Passes over the ring; each pass grants at most one permit per tenant, so tenants
        // alternate. Stops when a pass grants nothing or the round is full.
        loop {
            let mut granted_in_pass = false;
            let n = st.ring.len();
            for _ in 0..n {
                let Some(tenant) = st.ring.pop_front() else {
                    break;
                };
                let Some(t) = st.tenants.get_mut(&tenant) else {
                    continue; // gone: drop from the ring
                };
                if !t.batches.iter().any(|b| b.ready > 0) {
                    continue; // nothing ready: drop from the ring until add_ready
                }
                if t.in_use >= t.limit {
                    continue; // at its limit: re-added when a permit returns
                }
                // The first batch (round-robin) whose provider has room.
                let mut pick = None;
                for (k, b) in t.batches.iter().enumerate() {
                    if b.ready == 0 {
                        continue;
                    }
                    let p = st.providers.get_mut(&b.provider).expect("registered");
                    if let Some(until) = p.throttled_until {
                        if until > now {
                            wake_at = Some(wake_at.map_or(until, |w| w.min(until)));
                            continue;
                        }
                        p.throttled_until = None;
                    }
                    if p.in_use < p.limit {
                        pick = Some(k);
                        break;
                    }
                }
                match pick {
                    Some(k) => {
                        let mut b = t.batches.remove(k).expect("index valid");
                        b.ready -= 1;
                        t.in_use += 1;
                        st.providers
                            .get_mut(&b.provider)
                            .expect("registered")
                            .in_use += 1;
                        st.outstanding += 1;
                        grants.push((
                            b.to.clone(),
                            Permit {
                                sched: Arc::clone(self),
                                tenant,
                                provider: Arc::clone(&b.provider),
                            },
                        ));
                        t.batches.push_back(b);
                        granted_in_pass = true;
                        st.ring.push_back(tenant);
                    }
                    // Blocked by its providers: stays in the ring for the next round.
                    None => st.ring.push_back(tenant),
                }
                if grants.len() >= GRANTS_PER_ROUND_MAX {
                    return (grants, Some(now));
                }
            }
            if !granted_in_pass {
                return (grants, wake_at);
            }
        }
    }

    /// The dispatcher loop (spawned once on the engine's worker runtime). Ends when the
    /// scheduler is dropped by everyone else.
    pub async fn run(self: Arc<Self>) {
        loop {
            let notified = self.wake.notified();
            let (grants, wake_at) = self.round();
            let full_round = grants.len() >= GRANTS_PER_ROUND_MAX;
            for (to, permit) in grants {
                // A stopped batch drops the message, and with it the permit: the slot
                // returns through Drop.
                to.do_send(permit);
            }
            if full_round {
                tokio::task::yield_now().await;
                continue;
            }
            if Arc::strong_count(&self) == 1 {
                return;
            }
            match wake_at {
                Some(at) => {
                    let _ = tokio::time::timeout_at(at.into(), notified).await;
                }
                None => {
                    // Also wake now and then, so an engine that was dropped is noticed.
                    let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                }
            }
        }
    }
}
