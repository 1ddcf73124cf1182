//! ragcake: retrieval-augmented generation with cache-aware, bidirectional prefill.
//!
//! This facade re-exports the workspace's crates and adds the model cache
//! ([`model_cache`]) that fetches the default models, the default data locations
//! ([`paths`]), and [`default_pipeline_builder`], a pipeline on those defaults.

pub mod model_cache;
pub mod paths;

pub use ragcake_engine as engine;
pub use ragcake_ingest as ingest;
pub use ragcake_kvstore as kvstore;
pub use ragcake_pipeline as pipeline;
pub use ragcake_retriever as retriever;
pub use ragcake_scheduler as scheduler;

/// A pipeline builder on the embedded defaults: the default LLM and embedder (fetched into
/// the model cache on first use), the index [`paths::default_index_location`] and the KV
/// store [`paths::default_kv_url`] (embedded Qdrant and a local directory unless
/// `RAGCAKE_INDEX` or `RAGCAKE_KV` say otherwise), and the model's attention correction
/// from [`paths::calibration_dir`] when `ragcake calibrate` wrote one, else the one bundled
/// for it ([`engine::correction::BUNDLED`]). Any of them can still be replaced on the
/// builder.
pub fn default_pipeline_builder() -> Result<pipeline::PipelineBuilder, model_cache::ModelCacheError>
{
    let cache = model_cache::ModelCache::default();
    Ok(pipeline::Pipeline::builder()
        .model_path(cache.fetch(&model_cache::SMOLLM2)?.into_path())
        .embedder_dir(cache.fetch(&model_cache::MINILM)?.into_path())
        .index_location(paths::default_index_location())
        .kv_url(paths::default_kv_url())
        .calibration_dir(Some(paths::calibration_dir())))
}

/// The README's Rust snippets, compiled as doc tests so they keep up with the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

#[cfg(test)]
mod tests {
    use std::fmt::Debug;
    use std::str::FromStr;

    use serde::Serialize;
    use serde::de::DeserializeOwned;
    use strum::VariantNames;

    /// Every name of `T` parses, prints back, and is the name serde reads and writes: the
    /// command line, the configuration and the HTTP schema use one set of names.
    fn names_agree<T>()
    where
        T: VariantNames + FromStr + ToString + Serialize + DeserializeOwned + PartialEq + Debug,
        T::Err: Debug,
    {
        assert!(!T::VARIANTS.is_empty());
        for name in T::VARIANTS {
            let value: T = name.parse().unwrap();
            assert_eq!(value.to_string(), *name);
            let json = serde_json::to_string(&value).unwrap();
            assert_eq!(json, format!("\"{name}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), value);
        }
        assert!(
            format!("{}-no-such-name", T::VARIANTS[0])
                .parse::<T>()
                .is_err()
        );
    }

    #[test]
    fn every_string_named_enum_has_one_set_of_names_for_serde_and_the_command_line() {
        names_agree::<crate::scheduler::Mode>();
        names_agree::<crate::scheduler::Policy>();
        names_agree::<crate::scheduler::RecomputeRule>();
        names_agree::<crate::scheduler::Fidelity>();
        names_agree::<crate::scheduler::CacheKind>();
        names_agree::<crate::engine::DTypeChoice>();
        names_agree::<crate::engine::Role>();
        names_agree::<crate::kvstore::StorageDtype>();
        names_agree::<crate::retriever::Split>();
    }
}
