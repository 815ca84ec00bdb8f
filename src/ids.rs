//! Prefixed, sortable identifiers (`ten_…`, `bat_…`): a 128-bit value shown as the prefix
//! and 26 Crockford base32 characters. Generated ids put the millisecond time in the high
//! 48 bits, so they sort by creation time; the low 80 bits make them unique.

use std::sync::atomic::{AtomicU64, Ordering};

const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

fn encode(v: u128) -> String {
    let mut s = String::with_capacity(26);
    for i in 0..26 {
        let shift = 125 - 5 * i;
        s.push(ALPHABET[((v >> shift) & 31) as usize] as char);
    }
    s
}

fn decode(s: &str) -> Option<u128> {
    if s.len() != 26 {
        return None;
    }
    let mut v: u128 = 0;
    for (i, c) in s.bytes().enumerate() {
        let d = ALPHABET.iter().position(|&a| a == c.to_ascii_uppercase())? as u128;
        if i == 0 && d > 7 {
            return None; // would overflow 128 bits
        }
        v = (v << 5) | d;
    }
    Some(v)
}

/// Low 80 bits for generated ids: a per-process random start plus a counter, so two ids
/// made in the same millisecond differ and still sort in creation order.
fn next_low_bits() -> u128 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(std::process::id() as u128);
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    (((seed >> 48) as u128) << 64) | (seed.wrapping_add(n) as u128)
}

macro_rules! prefixed_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[rkyv(derive(Hash, PartialEq, Eq, PartialOrd, Ord, Debug))]
        pub struct $name(pub u128);

        impl $name {
            /// The textual prefix, including the underscore.
            pub const PREFIX: &'static str = $prefix;

            /// A new id for something created at `now_ms`.
            pub fn generate(now_ms: u64) -> Self {
                $name(((now_ms as u128 & 0xFFFF_FFFF_FFFF) << 80) | (next_low_bits() & ((1u128 << 80) - 1)))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "{}{}", $prefix, encode(self.0))
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                std::fmt::Display::fmt(self, f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                s.strip_prefix($prefix)
                    .and_then(decode)
                    .map($name)
                    .ok_or(InvalidId)
            }
        }
    };
}

/// A string that is not an id of the expected kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed id")]
pub struct InvalidId;

prefixed_id!(
    /// A tenant (one wallet, many keys and batches).
    TenantId,
    "ten_"
);
prefixed_id!(
    /// A batch (one hold).
    BatchId,
    "bat_"
);
prefixed_id!(
    /// An API key (its secret is shown once and stored only as a hash).
    KeyId,
    "key_"
);
prefixed_id!(
    /// A stored video (one succeeded item's output).
    VideoId,
    "vid_"
);
prefixed_id!(
    /// One access-log entry (a download, link use or embed, allowed or denied).
    AccessId,
    "acc_"
);
prefixed_id!(
    /// A webhook endpoint (a tenant's URL that receives signed events).
    EndpointId,
    "ep_"
);
prefixed_id!(
    /// A webhook event: the LSN of the record that caused it (high bits) and its number
    /// within that record (low 8 bits), so it is the same live and after a replay.
    EventId,
    "evt_"
);
prefixed_id!(
    /// One event's delivery to one endpoint: the event id (high bits) and the endpoint's
    /// number (low 32 bits); its attempts share the event's `webhook-id`.
    DeliveryId,
    "whd_"
);

/// An item's id: `itm_` + its batch's 26 characters + the 0-based index in 7 characters,
/// so item ids sort by batch, then index, and need no table to resolve.
pub fn item_id(batch: BatchId, index: u32) -> String {
    let mut s = String::with_capacity(4 + 26 + 7);
    s.push_str("itm_");
    s.push_str(&encode(batch.0));
    for i in 0..7 {
        s.push(ALPHABET[((index as u64 >> (30 - 5 * i)) & 31) as usize] as char);
    }
    s
}

/// The (batch, index) of an item id.
pub fn parse_item_id(s: &str) -> Result<(BatchId, u32), InvalidId> {
    let rest = s.strip_prefix("itm_").ok_or(InvalidId)?;
    if rest.len() != 33 || !rest.is_ascii() {
        return Err(InvalidId);
    }
    let batch = decode(&rest[..26]).ok_or(InvalidId)?;
    let mut index: u64 = 0;
    for c in rest[26..].bytes() {
        let d = ALPHABET
            .iter()
            .position(|&a| a == c.to_ascii_uppercase())
            .ok_or(InvalidId)? as u64;
        index = (index << 5) | d;
    }
    let index = u32::try_from(index).map_err(|_| InvalidId)?;
    Ok((BatchId(batch), index))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_order() {
        let a = TenantId::generate(1_700_000_000_000);
        let b = TenantId::generate(1_700_000_000_001);
        assert!(a < b);
        assert!(a.to_string() < b.to_string());
        assert_eq!(a.to_string().len(), 4 + 26);
        assert_eq!(a.to_string().parse::<TenantId>(), Ok(a));
        assert_eq!(
            TenantId(u128::MAX).to_string().parse(),
            Ok(TenantId(u128::MAX))
        );
        assert!("bat_00000000000000000000000000"
            .parse::<TenantId>()
            .is_err());
        assert!("ten_80000000000000000000000000"
            .parse::<TenantId>()
            .is_err());
        assert!("ten_0000".parse::<TenantId>().is_err());
        let b = BatchId::generate(1_700_000_000_000);
        for i in [0u32, 1, 31, 32, 9_999, u32::MAX] {
            let id = item_id(b, i);
            assert_eq!(id.len(), 4 + 26 + 7);
            assert_eq!(parse_item_id(&id), Ok((b, i)));
        }
        assert!(item_id(b, 2) < item_id(b, 10));
        assert!(parse_item_id("itm_").is_err());
        assert!(parse_item_id(&format!("itm_{}ZZZZZZZ", &b.to_string()[4..])).is_err());
    }
}
