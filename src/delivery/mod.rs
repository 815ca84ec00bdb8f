//! Delivery of finished videos (SPEC §7).
//!
//! - `store.rs`  the video store (`object_store`: local directory by default), ranged reads
//! - `links.rs`  signed, expiring link and embed URLs (HMAC with the tenant's link secret)
//! - `access.rs` the access log: every download, link use and embed, allowed or denied

pub mod access;
pub mod links;
pub mod store;
