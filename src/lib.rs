//! ragcake: retrieval-augmented generation with cache-aware, bidirectional prefill.
//!
//! This facade re-exports the workspace's crates and adds the model cache
//! ([`models`]) that fetches the default models and the default data locations
//! ([`paths`]).

pub mod models;
pub mod paths;

pub use ragcake_engine as engine;
pub use ragcake_kvstore as kvstore;
pub use ragcake_retriever as retriever;
