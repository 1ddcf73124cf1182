//! The blob format: one safetensors object per cached chunk.
//!
//! Tensors `k.{layer:03}` and `v.{layer:03}`, each `[n_kv_heads, tokens, head_dim]`, f16 by
//! default. safetensors lays tensors out sorted by name, so all keys come first, layer by
//! layer, then all values: any run of layers is two contiguous byte ranges, fetched with one
//! ranged-read call. Metadata (string map) records everything needed to refuse a wrong blob.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use ragcake_engine::{KvRange, KvShape, LlmFingerprint};
use safetensors::SafeTensors;
use safetensors::tensor::{Metadata, TensorInfo};

use crate::error::{KvStoreError, RejectReason, Result};
use crate::key::{CacheKey, CacheKind, hex, tokens_hash};

/// The `format` metadata value.
pub const FORMAT: &str = "ragcake-kv";
/// The `format_version` this code writes and reads.
pub const FORMAT_VERSION: &str = "1";

/// Name of layer `layer`'s key tensor.
pub fn k_name(layer: usize) -> String {
    format!("k.{layer:03}")
}

/// Name of layer `layer`'s value tensor.
pub fn v_name(layer: usize) -> String {
    format!("v.{layer:03}")
}

/// The metadata of a stored blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobMeta {
    /// The key the blob was written under.
    pub key: CacheKey,
    /// The model that computed it.
    pub model: LlmFingerprint,
    /// Tokens covered.
    pub token_count: usize,
    /// Position of the first token when it was computed.
    pub base_position: usize,
    /// blake3 of the token ids.
    pub tokens_hash: [u8; 32],
    /// Element type of the tensors.
    pub dtype: DType,
    /// Cache dimensions.
    pub shape: KvShape,
}

/// What a reader requires of a blob.
#[derive(Debug, Clone, Copy)]
pub struct Expectation<'a> {
    /// The key being read.
    pub key: &'a CacheKey,
    /// The reader's model.
    pub model: &'a LlmFingerprint,
    /// The reader's cache dimensions.
    pub shape: KvShape,
    /// The token ids the cache must have been computed from, when the reader knows them.
    pub tokens: Option<&'a [u32]>,
}

pub(crate) fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        _ => "other",
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        "f32" => Some(DType::F32),
        _ => None,
    }
}

/// Encodes `range` (the KV of `tokens`) as a blob for `key`, converting tensors to `dtype`.
pub fn encode(
    key: &CacheKey,
    model: &LlmFingerprint,
    tokens: &[u32],
    range: &KvRange,
    dtype: DType,
) -> Result<Vec<u8>> {
    if tokens.len() != range.len() {
        return Err(KvStoreError::Encode(format!(
            "{} token ids for a KV range of {} tokens",
            tokens.len(),
            range.len()
        )));
    }
    let shape = range.shape();
    let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * shape.n_layers);
    for (layer, (k, v)) in range.layers().iter().enumerate() {
        tensors.push((k_name(layer), k.to_dtype(dtype)?.contiguous()?));
        tensors.push((v_name(layer), v.to_dtype(dtype)?.contiguous()?));
    }
    let mut meta: HashMap<String, String> = HashMap::from([
        ("format".into(), FORMAT.into()),
        ("format_version".into(), FORMAT_VERSION.into()),
        ("key".into(), key.to_hex()),
        ("kind".into(), key.kind().as_str().into()),
        ("model_fingerprint".into(), model.to_hex()),
        ("token_count".into(), range.len().to_string()),
        ("base_position".into(), range.base_position().to_string()),
        ("tokens_blake3".into(), hex(&tokens_hash(tokens))),
        ("dtype".into(), dtype_name(dtype).into()),
        ("n_layers".into(), shape.n_layers.to_string()),
        ("n_kv_heads".into(), shape.n_kv_heads.to_string()),
        ("head_dim".into(), shape.head_dim.to_string()),
    ]);
    for (name, t) in &tensors {
        let bytes = safetensors::View::data(t);
        meta.insert(
            format!("crc32c.{name}"),
            format!("{:08x}", crc32c::crc32c(&bytes)),
        );
    }
    meta.insert("meta_crc32c".into(), meta_checksum(&meta));
    let blob = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| KvStoreError::Encode(e.to_string()))?;
    with_sorted_header(blob)
}

/// The same safetensors blob with its JSON header's keys, and its metadata's, in sorted
/// order. safetensors writes the metadata from a `HashMap`, whose order differs from one
/// map to the next, so two writers of the same cache would store different bytes (and
/// ETags); sorted, the bytes depend on the cache alone. The header stays padded with spaces
/// to a multiple of 8 bytes, as safetensors pads it, so the data keeps its alignment.
fn with_sorted_header(blob: Vec<u8>) -> Result<Vec<u8>> {
    let encode = |e: &dyn std::fmt::Display| KvStoreError::Encode(e.to_string());
    let header_len = blob
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .ok_or_else(|| encode(&"no header"))?;
    let header = blob
        .get(8..8 + header_len)
        .ok_or_else(|| encode(&"short header"))?;
    let mut entries: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(header).map_err(|e| encode(&e))?;
    if let Some(metadata) = entries.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(metadata.take()).map_err(|e| encode(&e))?;
        *metadata = serde_json::to_value(sorted).map_err(|e| encode(&e))?;
    }
    let mut sorted = serde_json::to_vec(&entries).map_err(|e| encode(&e))?;
    sorted.resize(sorted.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + sorted.len() + blob.len() - 8 - header_len);
    out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&blob[8 + header_len..]);
    Ok(out)
}

/// crc32c over every metadata entry but itself, in sorted order, so a changed base position
/// or token count is caught like a changed tensor byte.
fn meta_checksum(meta: &HashMap<String, String>) -> String {
    let mut entries: Vec<_> = meta.iter().filter(|(k, _)| *k != "meta_crc32c").collect();
    entries.sort();
    let mut crc = 0u32;
    for (k, v) in entries {
        crc = crc32c::crc32c_append(crc, k.as_bytes());
        crc = crc32c::crc32c_append(crc, b"=");
        crc = crc32c::crc32c_append(crc, v.as_bytes());
        crc = crc32c::crc32c_append(crc, b"\n");
    }
    format!("{crc:08x}")
}

fn field<'m>(meta: &'m HashMap<String, String>, name: &str) -> Result<&'m str, RejectReason> {
    meta.get(name)
        .map(String::as_str)
        .ok_or_else(|| RejectReason::Metadata(name.to_string()))
}

fn number(meta: &HashMap<String, String>, name: &str) -> Result<usize, RejectReason> {
    field(meta, name)?
        .parse()
        .map_err(|_| RejectReason::Metadata(name.to_string()))
}

/// Reads and checks a blob's metadata against what the reader requires.
pub fn check_meta(
    meta: &HashMap<String, String>,
    expected: &Expectation<'_>,
) -> Result<BlobMeta, RejectReason> {
    let format = field(meta, "format").unwrap_or("");
    let version = field(meta, "format_version").unwrap_or("");
    if format != FORMAT || version != FORMAT_VERSION {
        return Err(RejectReason::UnknownFormat {
            format: format.into(),
            version: version.into(),
        });
    }
    if field(meta, "meta_crc32c")? != meta_checksum(meta) {
        return Err(RejectReason::Checksum("__metadata__".into()));
    }
    let model = field(meta, "model_fingerprint")?;
    if model != expected.model.to_hex() {
        return Err(RejectReason::LlmMismatch {
            expected: expected.model.to_hex(),
            found: model.into(),
        });
    }
    let kind = CacheKind::parse(field(meta, "kind")?)
        .ok_or_else(|| RejectReason::Metadata("kind".into()))?;
    let key = CacheKey::from_hex(kind, field(meta, "key")?)
        .ok_or_else(|| RejectReason::Metadata("key".into()))?;
    if key != *expected.key {
        return Err(RejectReason::KeyMismatch {
            expected: expected.key.to_hex(),
            found: key.to_hex(),
        });
    }
    let token_count = number(meta, "token_count")?;
    let stored_hash = field(meta, "tokens_blake3")?;
    if let Some(tokens) = expected.tokens {
        if tokens.len() != token_count {
            return Err(RejectReason::TokenCountMismatch {
                expected: tokens.len(),
                found: token_count,
            });
        }
        if stored_hash != hex(&tokens_hash(tokens)) {
            return Err(RejectReason::TokenMismatch);
        }
    }
    let dtype_str = field(meta, "dtype")?;
    let dtype = parse_dtype(dtype_str).ok_or_else(|| RejectReason::Dtype(dtype_str.into()))?;
    let shape = KvShape {
        n_layers: number(meta, "n_layers")?,
        n_kv_heads: number(meta, "n_kv_heads")?,
        head_dim: number(meta, "head_dim")?,
    };
    if shape != expected.shape {
        return Err(RejectReason::Shape {
            name: "cache".into(),
            reason: format!("stored {shape:?}, reader needs {:?}", expected.shape),
        });
    }
    let mut tokens_hash = [0u8; 32];
    let hash_ok = stored_hash.len() == 64
        && tokens_hash.iter_mut().enumerate().all(|(i, b)| {
            u8::from_str_radix(&stored_hash[2 * i..2 * i + 2], 16)
                .map(|v| *b = v)
                .is_ok()
        });
    if !hash_ok {
        return Err(RejectReason::Metadata("tokens_blake3".into()));
    }
    Ok(BlobMeta {
        key,
        model: *expected.model,
        token_count,
        base_position: number(meta, "base_position")?,
        tokens_hash,
        dtype,
        shape,
    })
}

/// Checks one tensor's dtype, shape and checksum and copies it onto `device`.
pub fn tensor_from_bytes(
    name: &str,
    bytes: &[u8],
    stored_dims: &[usize],
    meta: &HashMap<String, String>,
    blob: &BlobMeta,
    device: &Device,
) -> Result<Tensor, RejectReason> {
    let dims = [blob.shape.n_kv_heads, blob.token_count, blob.shape.head_dim];
    if stored_dims != dims {
        return Err(RejectReason::Shape {
            name: name.into(),
            reason: format!("{stored_dims:?} instead of {dims:?}"),
        });
    }
    let expected_crc = field(meta, &format!("crc32c.{name}"))?;
    if format!("{:08x}", crc32c::crc32c(bytes)) != expected_crc {
        return Err(RejectReason::Checksum(name.into()));
    }
    Tensor::from_raw_buffer(bytes, blob.dtype, &dims, device).map_err(|e| RejectReason::Shape {
        name: name.into(),
        reason: e.to_string(),
    })
}

/// The stored tensors of `layers`, keys and values in layer order (`k.i`, `v.i`, …), each
/// checked to be present and of the blob's dtype and shape.
pub fn layer_tensors(
    header: &Metadata,
    blob: &BlobMeta,
    layers: Range<usize>,
) -> Result<Vec<(String, TensorInfo)>, RejectReason> {
    let mut out = Vec::with_capacity(2 * layers.len());
    for layer in layers {
        for name in [k_name(layer), v_name(layer)] {
            let info = header.info(&name).ok_or_else(|| RejectReason::Shape {
                name: name.clone(),
                reason: "missing".into(),
            })?;
            if info.dtype != safetensors_dtype(blob.dtype) {
                return Err(RejectReason::Dtype(format!("{:?} in {name}", info.dtype)));
            }
            // Checked before any byte range is fetched: the header's offsets (which
            // safetensors checks against shape and dtype) then bound what is read.
            let dims = [blob.shape.n_kv_heads, blob.token_count, blob.shape.head_dim];
            if info.shape != dims {
                return Err(RejectReason::Shape {
                    name,
                    reason: format!("shape {:?}, expected {dims:?}", info.shape),
                });
            }
            out.push((name, info.clone()));
        }
    }
    Ok(out)
}

/// Checks the bytes of tensors listed by [`layer_tensors`] (shapes, checksums) and builds
/// the KV range they form on `device`.
pub fn range_from_tensors<'b>(
    tensors: &[(String, TensorInfo)],
    bytes: impl IntoIterator<Item = &'b [u8]>,
    meta: &HashMap<String, String>,
    blob: &BlobMeta,
    device: &Device,
) -> Result<KvRange, RejectReason> {
    let mut decoded = tensors
        .iter()
        .zip(bytes)
        .map(|((name, info), b)| tensor_from_bytes(name, b, &info.shape, meta, blob, device));
    let mut layers = Vec::with_capacity(tensors.len() / 2);
    while let Some(k) = decoded.next() {
        let v = decoded
            .next()
            .ok_or_else(|| RejectReason::Malformed("odd tensor count".into()))?;
        layers.push((k?, v?));
    }
    KvRange::new(blob.base_position, layers).map_err(|e| RejectReason::Shape {
        name: "range".into(),
        reason: e.to_string(),
    })
}

/// Decodes and verifies a whole blob into a KV range on `device` (in the stored dtype).
/// The header is parsed once and each tensor is copied once, from the blob into its tensor.
pub fn decode(
    bytes: &[u8],
    expected: &Expectation<'_>,
    device: &Device,
) -> Result<(BlobMeta, KvRange), RejectReason> {
    // `read_metadata` checks that the tensors' offsets tile the data section exactly.
    let (header_len, header) =
        SafeTensors::read_metadata(bytes).map_err(|e| RejectReason::Malformed(e.to_string()))?;
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| RejectReason::Metadata("__metadata__".into()))?;
    let blob = check_meta(&meta, expected)?;
    let tensors = layer_tensors(&header, &blob, 0..blob.shape.n_layers)?;
    let data = &bytes[8 + header_len..];
    let slices = tensors
        .iter()
        .map(|(name, info)| {
            data.get(info.data_offsets.0..info.data_offsets.1)
                .ok_or_else(|| RejectReason::Malformed(format!("{name} lies outside the blob")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let range = range_from_tensors(&tensors, slices, &meta, &blob, device)?;
    Ok((blob, range))
}

/// The safetensors element type for a candle dtype.
pub fn safetensors_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}
