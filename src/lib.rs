//! ragcake: retrieval-augmented generation with cache-aware, bidirectional prefill.
//!
//! This facade re-exports the workspace's crates and adds the model cache
//! ([`models`]) that fetches the default models.

pub mod models;

pub use ragcake_engine as engine;
pub use ragcake_kvstore as kvstore;
