//! Signed, expiring URLs for links (`/v/{id}`) and embeds (`/embed/{id}`).
//!
//! ```text
//! signed: v1|{kind}|{vid_…}|{exp unix seconds}
//! sig:    base64url(HMAC-SHA256(tenant link secret, signed)), no padding
//! ```
//! The kind is inside the signature, so a link's signature does not open the embed page
//! (which has its own checks) or the other way round. Rotating the tenant's secret
//! revokes every URL it signed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::VideoId;

/// What a signed URL opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    /// The file itself.
    Link,
    /// The embed page.
    Embed,
}

impl LinkKind {
    fn as_str(self) -> &'static str {
        match self {
            LinkKind::Link => "link",
            LinkKind::Embed => "embed",
        }
    }
}

/// Why a signed URL is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// Missing, malformed or wrong signature (or a tampered expiry).
    InvalidSignature,
    /// Correctly signed, but its time is over.
    Expired,
}

fn mac(secret: &[u8; 32], kind: LinkKind, video: VideoId, exp_s: u64) -> Hmac<Sha256> {
    let mut m = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    m.update(format!("v1|{}|{video}|{exp_s}", kind.as_str()).as_bytes());
    m
}

/// The `sig` of a URL.
pub fn sign(secret: &[u8; 32], kind: LinkKind, video: VideoId, exp_s: u64) -> String {
    URL_SAFE_NO_PAD.encode(mac(secret, kind, video, exp_s).finalize().into_bytes())
}

/// Checks `exp` and `sig` as they came in the query (constant-time comparison).
pub fn verify(
    secret: &[u8; 32],
    kind: LinkKind,
    video: VideoId,
    exp: Option<&str>,
    sig: Option<&str>,
    now_s: u64,
) -> Result<(), LinkError> {
    let exp_s: u64 = exp
        .and_then(|e| e.parse().ok())
        .ok_or(LinkError::InvalidSignature)?;
    let sig = sig
        .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
        .ok_or(LinkError::InvalidSignature)?;
    mac(secret, kind, video, exp_s)
        .verify_slice(&sig)
        .map_err(|_| LinkError::InvalidSignature)?;
    if now_s >= exp_s {
        return Err(LinkError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tamper_expiry_kind_and_secret() {
        let k = [7u8; 32];
        let v = VideoId(42);
        let sig = sign(&k, LinkKind::Link, v, 1000);
        let ok =
            |kind, v, exp: &str, sig: &str, now| verify(&k, kind, v, Some(exp), Some(sig), now);
        assert_eq!(ok(LinkKind::Link, v, "1000", &sig, 999), Ok(()));
        assert_eq!(
            ok(LinkKind::Link, v, "1000", &sig, 1000),
            Err(LinkError::Expired)
        );
        assert_eq!(
            ok(LinkKind::Link, v, "2000", &sig, 999),
            Err(LinkError::InvalidSignature)
        );
        assert_eq!(
            ok(LinkKind::Embed, v, "1000", &sig, 999),
            Err(LinkError::InvalidSignature)
        );
        assert_eq!(
            ok(LinkKind::Link, VideoId(43), "1000", &sig, 999),
            Err(LinkError::InvalidSignature)
        );
        let mut bad = sig.clone();
        bad.replace_range(0..1, if sig.starts_with('A') { "B" } else { "A" });
        assert_eq!(
            ok(LinkKind::Link, v, "1000", &bad, 999),
            Err(LinkError::InvalidSignature)
        );
        assert_eq!(
            verify(&[8u8; 32], LinkKind::Link, v, Some("1000"), Some(&sig), 999),
            Err(LinkError::InvalidSignature)
        );
        assert_eq!(
            verify(&k, LinkKind::Link, v, None, Some(&sig), 999),
            Err(LinkError::InvalidSignature)
        );
        assert_eq!(
            verify(&k, LinkKind::Link, v, Some("x"), Some("!!"), 999),
            Err(LinkError::InvalidSignature)
        );
    }
}
