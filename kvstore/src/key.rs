//! Content-addressed cache keys and their object paths.

use ragcake_engine::LlmFingerprint;

/// What a stored cache holds (the scheduler's kinds: prefix or chunk).
pub use ragcake_scheduler::CacheKind;

/// A cache key: a blake3 hash of the model fingerprint, the kind, (for prefix caches) the
/// parent key or (for chunk caches) the context they were computed after, and the chunk's
/// token ids. Deterministic across processes and machines.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey {
    kind: CacheKind,
    hash: [u8; 32],
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CacheKey({}:{})",
            <&str>::from(self.kind),
            &self.to_hex()[..16]
        )
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// blake3 of token ids as little-endian u32s.
pub fn tokens_hash(tokens: &[u32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for t in tokens {
        hasher.update(&t.to_le_bytes());
    }
    *hasher.finalize().as_bytes()
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl CacheKey {
    /// Key of the exact (in-context) cache of `tokens` following the chunk whose key is
    /// `parent` (`None` for the first chunk of a prompt).
    pub fn prefix(model: &LlmFingerprint, parent: Option<&CacheKey>, tokens: &[u32]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-kv-key-v1\0prefix\0");
        hasher.update(&model.0);
        match parent {
            Some(p) => hasher.update(&[1]).update(&p.hash),
            None => hasher.update(&[0]),
        };
        hasher.update(&tokens_hash(tokens));
        Self {
            kind: CacheKind::Prefix,
            hash: *hasher.finalize().as_bytes(),
        }
    }

    /// Key of the position-independent cache of `tokens` computed after `context` (the
    /// standard preamble a prompt starts with; empty: alone at position 0), holding only
    /// the KV of `tokens`.
    pub fn chunk(model: &LlmFingerprint, context: &[u32], tokens: &[u32]) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-kv-key-v2\0chunk\0");
        hasher.update(&model.0);
        hasher.update(&tokens_hash(context));
        hasher.update(&tokens_hash(tokens));
        Self {
            kind: CacheKind::Chunk,
            hash: *hasher.finalize().as_bytes(),
        }
    }

    /// The root of the prefix chains of cache salt `salt`: never the key of a stored cache
    /// itself, only the parent of a salted chain's first key.
    pub fn salt(model: &LlmFingerprint, salt: &str) -> Self {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-kv-key-v1\0salt\0");
        hasher.update(&model.0);
        hasher.update(salt.as_bytes());
        Self {
            kind: CacheKind::Prefix,
            hash: *hasher.finalize().as_bytes(),
        }
    }

    /// The kind of cache this key names.
    pub fn kind(&self) -> CacheKind {
        self.kind
    }

    /// Full hex form.
    pub fn to_hex(&self) -> String {
        hex(&self.hash)
    }

    /// The object path relative to the store's prefix:
    /// `{model 16 hex}/{kind}/{first 2 hex}/{64 hex}.safetensors` — grouped by model and kind
    /// in a bucket listing, and fanned out so no directory grows huge.
    pub fn relative_path(&self, model: &LlmFingerprint) -> String {
        format!("{}/{}", model.short(), self.object_name())
    }

    /// The object's path below its model's directory:
    /// `{kind}/{first 2 hex}/{64 hex}.safetensors`.
    pub fn object_name(&self) -> String {
        let h = self.to_hex();
        format!("{}/{}/{}.safetensors", <&str>::from(self.kind), &h[..2], h)
    }

    /// Parses a key back from its kind and hex form.
    pub fn from_hex(kind: CacheKind, hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut hash = [0u8; 32];
        for (i, byte) in hash.iter_mut().enumerate() {
            *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self { kind, hash })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: LlmFingerprint = LlmFingerprint([7; 32]);

    #[test]
    fn keys_are_deterministic_and_known() {
        // A fixed value: keys must not change between processes, machines or releases.
        let key = CacheKey::chunk(&MODEL, &[], &[1, 2, 3]);
        assert_eq!(key, CacheKey::chunk(&MODEL, &[], &[1, 2, 3]));
        assert_eq!(
            CacheKey::from_hex(CacheKind::Chunk, &key.to_hex()),
            Some(key)
        );
        let again = blake3::Hasher::new()
            .update(b"ragcake-kv-key-v2\0chunk\0")
            .update(&[7; 32])
            .update(&tokens_hash(&[]))
            .update(&tokens_hash(&[1, 2, 3]))
            .finalize();
        assert_eq!(key.to_hex(), hex(again.as_bytes()));
    }

    #[test]
    fn keys_separate_models_kinds_parents_and_tokens() {
        let other = LlmFingerprint([8; 32]);
        let a = CacheKey::prefix(&MODEL, None, &[1, 2]);
        assert_ne!(a, CacheKey::prefix(&other, None, &[1, 2]));
        assert_ne!(a, CacheKey::prefix(&MODEL, None, &[1, 3]));
        assert_ne!(a.to_hex(), CacheKey::chunk(&MODEL, &[], &[1, 2]).to_hex());
        assert_ne!(
            CacheKey::chunk(&MODEL, &[], &[1, 2]),
            CacheKey::chunk(&MODEL, &[9], &[1, 2]),
            "the context a chunk cache was computed after is part of its key"
        );
        let b = CacheKey::prefix(&MODEL, Some(&a), &[5]);
        let c = CacheKey::prefix(&MODEL, None, &[5]);
        assert_ne!(b, c, "the parent is part of a prefix key");
    }

    #[test]
    fn paths_are_readable_in_a_listing() {
        let key = CacheKey::chunk(&MODEL, &[], &[1]);
        let path = key.relative_path(&MODEL);
        let h = key.to_hex();
        assert_eq!(
            path,
            format!("0707070707070707/chunk/{}/{h}.safetensors", &h[..2])
        );
    }
}
