//! Delivery of finished videos (SPEC §7).
//!
//! - `store.rs` the video store (`object_store`: local directory by default)

pub mod store;
