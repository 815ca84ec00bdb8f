//! Every record the WAL holds: one enum, versioned by the journal header.

use crate::delivery::access::AccessEntry;
use crate::engine::accounts::AccountEvent;
use crate::engine::batch::state::BatchEvent;
use crate::engine::idempotency::StoredResponse;
use crate::engine::wallet::state::WalletEvent;
use crate::ids::{BatchId, TenantId};
use crate::webhooks::state::WebhookRecord;

/// A WAL record. New variants are added at the end; changing an existing variant's shape
/// needs a new `RECORD_VERSION` and a reader for the old one.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum Record {
    /// A fact about one tenant's wallet.
    Wallet {
        tenant: TenantId,
        event: WalletEvent,
    },
    /// A fact about one batch.
    Batch { batch: BatchId, event: BatchEvent },
    /// A fact about tenants or API keys.
    Account(AccountEvent),
    /// A response stored for an `Idempotency-Key`.
    Response(StoredResponse),
    /// A fact about webhook endpoints or deliveries.
    Webhook(WebhookRecord),
    /// A download, link use or embed, allowed or denied.
    Access(AccessEntry),
}
