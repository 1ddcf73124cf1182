//! Shared fixtures of the store's tests: a synthetic model (a fingerprint, a cache shape and
//! deterministic pseudo-random KV computed from token ids), stores of its caches, and the
//! servers and clients the cloud tests point at. No real model is loaded: the store only
//! moves, checks and converts tensors, whatever numbers they hold.

use std::sync::Arc;

use ragcake_engine::{Device, KvRange, KvShape, LlmFingerprint, Tensor};
use ragcake_kvstore::KvStore;
use ragcake_kvstore::object_store::ObjectStore;
use ragcake_kvstore::object_store::path::Path;

pub use ragcake_test_support::{
    max_abs, max_abs_diff, runtime, s3_options, silent_server, stored_bytes,
};

/// The synthetic model's fingerprint (any value no test uses as "another model").
pub const MODEL: LlmFingerprint = LlmFingerprint([7; 32]);

/// The synthetic model's cache: three KV heads of 64 channels, as SmolLM2-135M's, and 16
/// layers, enough for the suite's ranged reads of layers 10..13 to stop short of the last.
pub const SHAPE: KvShape = KvShape {
    n_layers: 16,
    n_kv_heads: 3,
    head_dim: 64,
};

/// The synthetic model's context, the longest cache a blob may hold (SmolLM2-135M's).
pub const CONTEXT: usize = 8192;

/// `n` token ids of the synthetic model: a fixed sequence, so `token_ids(m)` for `m < n`
/// is a prefix of `token_ids(n)`, as a longer excerpt of the same text would be.
pub fn token_ids(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| (i * 37 + 11) % 5000).collect()
}

/// The synthetic model's KV of `tokens` computed from position 0, in f32 like a CPU
/// engine's: each element a pseudo-random number in [-2, 2) drawn from its token id,
/// position, layer, keys or values, head and channel. The same tokens always give the same
/// cache, bit for bit; other tokens give another.
pub fn kv_of(tokens: &[u32]) -> KvRange {
    let KvShape {
        n_layers,
        n_kv_heads,
        head_dim,
    } = SHAPE;
    // One layer's keys (`which` 0) or values (1), laid out `[heads, tokens, head_dim]`.
    let tensor = |layer: usize, which: u64| {
        let mut data = Vec::with_capacity(n_kv_heads * tokens.len() * head_dim);
        for head in 0..n_kv_heads {
            for (position, &token) in tokens.iter().enumerate() {
                for channel in 0..head_dim {
                    data.push(uniform([
                        u64::from(token),
                        position as u64,
                        layer as u64,
                        which,
                        head as u64,
                        channel as u64,
                    ]));
                }
            }
        }
        Tensor::from_vec(data, (n_kv_heads, tokens.len(), head_dim), &Device::Cpu).unwrap()
    };
    let layers = (0..n_layers)
        .map(|layer| (tensor(layer, 0), tensor(layer, 1)))
        .collect();
    KvRange::new(0, layers).unwrap()
}

/// A number in [-2, 2) determined by `parts`, each mixed in by splitmix64's finalizer.
fn uniform(parts: [u64; 6]) -> f32 {
    let mut x = 0u64;
    for part in parts {
        x = splitmix64(x ^ part);
    }
    // The top 24 bits: exactly representable in an f32, so the scaling below is exact.
    (x >> 40) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
}

/// splitmix64's output function: every input bit affects every output bit.
fn splitmix64(x: u64) -> u64 {
    let x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A store of the synthetic model's caches over the object store `url` names, opened as
/// an engine's is (a local directory's reads go straight into the cache's buffers).
pub fn store_for(url: &str) -> KvStore {
    KvStore::open(url, Vec::new(), MODEL, SHAPE, Device::Cpu)
        .unwrap()
        .with_max_tokens(CONTEXT)
}

/// A store of the synthetic model's caches over `store`.
pub fn store_over(store: Arc<dyn ObjectStore>, prefix: Path) -> KvStore {
    KvStore::new(store, prefix, MODEL, SHAPE, Device::Cpu).with_max_tokens(CONTEXT)
}
