//! The KV store with the real model: KV that went through the store continues the model's
//! forward pass exactly as the KV it was computed as does.
//!
//! The store's own suite (every backend, corrupt and foreign blobs, lifecycle, keys, storage
//! dtypes) runs on synthetic KV next to the store, in `kvstore/tests/conformance.rs`
//! (`cargo test -p ragcake-kvstore`).

use ragcake::engine::{DType, KvRange, ReturnLogits};
use ragcake::kvstore::CacheKey;

use crate::common::{engine, logits, max_abs_diff, prose_tokens, runtime, store_for};

/// KV of `tokens` computed from position 0, and the key it is stored under.
fn chunk_kv(tokens: &[u32]) -> (CacheKey, KvRange) {
    let engine = engine();
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, tokens, 256).unwrap();
    (
        CacheKey::chunk(&engine.fingerprint(), &[], tokens),
        cache.export(0..tokens.len()).unwrap(),
    )
}

#[test]
fn stored_kv_continues_with_the_same_logits_as_the_original() {
    runtime().block_on(async {
        let engine = engine();
        let store = store_for("memory://");
        let tokens = prose_tokens(120);
        let next = engine.tokenizer().encode(" The keepers", false).unwrap();
        let (key, range) = chunk_kv(&tokens);
        store.put(&key, &tokens, &range).await.unwrap();
        let loaded = store.get(&key, Some(&tokens)).await.unwrap().hit().unwrap();

        // Reference: the same cache rounded to f16 in memory, without the store.
        let mut reference = engine.new_cache();
        engine
            .import(&mut reference, &range.to_dtype(DType::F16).unwrap())
            .unwrap();
        let mut from_store = engine.new_cache();
        engine.import(&mut from_store, &loaded).unwrap();
        let a = logits(engine, &next, &mut reference, ReturnLogits::All);
        let b = logits(engine, &next, &mut from_store, ReturnLogits::All);
        assert_eq!(
            max_abs_diff(&a, &b),
            0.0,
            "storage must not change the cache"
        );
    });
}
