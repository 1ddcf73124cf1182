//! The blob format: one safetensors object per cached chunk.
//!
//! Tensors `k.{layer:03}` and `v.{layer:03}`, each `[n_kv_heads, tokens, head_dim]`, f16 by
//! default. safetensors lays tensors out sorted by name, so all keys come first, layer by
//! layer, then all values: any run of layers is two contiguous byte ranges, fetched with one
//! ranged-read call. Metadata (string map) records everything needed to refuse a wrong blob.
//!
//! In `int8` blobs keys and values are 8-bit integers with scales beside them, as KIVI
//! quantizes them: keys per channel (`ks.{layer:03}`, f32 `[n_kv_heads, 1, head_dim]`: a
//! key channel's outliers persist across tokens), values per token (`vs.{layer:03}`, f16
//! `[n_kv_heads, tokens, 1]`). Symmetric, absolute maximum to ±127. A layer run is then four
//! contiguous ranges.

use std::collections::{BTreeMap, HashMap};
use std::mem::MaybeUninit;
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
    /// How keys and values are stored.
    pub dtype: StorageDtype,
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
    match StorageDtype::from_dtype(dtype) {
        Some(storage) => storage.into(),
        None => "other",
    }
}

ragcake_scheduler::named_enum! {
    /// How a blob stores keys and values.
    pub enum StorageDtype in "lowercase" {
        /// 32-bit floats: the computed cache bit for bit.
        F32,
        /// 16-bit floats.
        F16,
        /// bfloat16.
        Bf16,
        /// 8-bit integers with per-channel key and per-token value scales; decoded to f32.
        Int8,
    }
}

impl StorageDtype {
    /// Every storage dtype.
    pub const ALL: [Self; 4] = [Self::F32, Self::F16, Self::Bf16, Self::Int8];

    /// The float storage dtype of `dtype` (f32, f16, bf16), if it is one.
    pub fn from_dtype(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::Bf16),
            _ => None,
        }
    }

    /// The dtype a loaded cache has: the stored one, or f32 for int8 (dequantized straight
    /// into the dtype the engine computes in, no second conversion).
    pub fn loaded_dtype(self) -> DType {
        match self {
            Self::F32 | Self::Int8 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The element type of the stored key and value tensors.
    fn element(self) -> safetensors::Dtype {
        match self {
            Self::F32 => safetensors::Dtype::F32,
            Self::F16 => safetensors::Dtype::F16,
            Self::Bf16 => safetensors::Dtype::BF16,
            Self::Int8 => safetensors::Dtype::I8,
        }
    }
}

/// Name of layer `layer`'s key scales (int8 blobs).
pub fn k_scale_name(layer: usize) -> String {
    format!("ks.{layer:03}")
}

/// Name of layer `layer`'s value scales (int8 blobs).
pub fn v_scale_name(layer: usize) -> String {
    format!("vs.{layer:03}")
}

/// A tensor to serialize: its element type, dimensions and bytes.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

impl RawTensor {
    /// A float tensor's bytes in `dtype`.
    fn float(t: &Tensor, dtype: DType) -> Result<Self> {
        let t = t.to_dtype(dtype)?.contiguous()?;
        Ok(Self {
            dtype: safetensors::View::dtype(&t),
            shape: t.dims().to_vec(),
            data: safetensors::View::data(&t).into_owned(),
        })
    }
}

/// The largest magnitude an int8 value takes (symmetric: -127..=127).
const INT8_MAX: f32 = 127.0;

fn scale_of(max_abs: f32) -> f32 {
    if max_abs > 0.0 && max_abs.is_finite() {
        max_abs / INT8_MAX
    } else {
        1.0
    }
}

fn quantize(x: f32, scale: f32) -> u8 {
    ((x / scale).round().clamp(-INT8_MAX, INT8_MAX) as i8) as u8
}

/// Keys `[heads, tokens, dim]` as int8 with one f32 scale per head and channel.
fn quantize_keys(k: &Tensor) -> Result<[RawTensor; 2]> {
    let (heads, tokens, dim) = k.dims3()?;
    let values = k.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut scales = vec![0f32; heads * dim];
    for h in 0..heads {
        for t in 0..tokens {
            let row = &values[(h * tokens + t) * dim..][..dim];
            for (m, x) in scales[h * dim..][..dim].iter_mut().zip(row) {
                *m = m.max(x.abs());
            }
        }
    }
    scales.iter_mut().for_each(|m| *m = scale_of(*m));
    let data = values
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let (h, c) = (i / (tokens * dim), i % dim);
            quantize(x, scales[h * dim + c])
        })
        .collect();
    let scales = RawTensor {
        dtype: safetensors::Dtype::F32,
        shape: vec![heads, 1, dim],
        data: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    };
    Ok(int8_with(data, [heads, tokens, dim], scales))
}

/// int8 data of `dims` with its scales beside it.
fn int8_with(data: Vec<u8>, dims: [usize; 3], scales: RawTensor) -> [RawTensor; 2] {
    let data = RawTensor {
        dtype: safetensors::Dtype::I8,
        shape: dims.to_vec(),
        data,
    };
    [data, scales]
}

/// Values `[heads, tokens, dim]` as int8 with one f16 scale per head and token.
fn quantize_values(v: &Tensor) -> Result<[RawTensor; 2]> {
    let (heads, tokens, dim) = v.dims3()?;
    let values = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut data = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(heads * tokens);
    for row in values.chunks_exact(dim.max(1)) {
        let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        // Rounded to f16 first: the scale used to quantize is the one stored.
        let scale = half::f16::from_f32(scale_of(max));
        let scale = if scale.to_f32() > 0.0 && scale.is_finite() {
            scale
        } else {
            half::f16::ONE
        };
        data.extend(row.iter().map(|&x| quantize(x, scale.to_f32())));
        scales.push(scale);
    }
    let scales = RawTensor {
        dtype: safetensors::Dtype::F16,
        shape: vec![heads, tokens, 1],
        data: scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
    };
    Ok(int8_with(data, [heads, tokens, dim], scales))
}

/// Encodes `range` (the KV of `tokens`) as a blob for `key`, storing it as `dtype`.
pub fn encode(
    key: &CacheKey,
    model: &LlmFingerprint,
    tokens: &[u32],
    range: &KvRange,
    dtype: StorageDtype,
) -> Result<Vec<u8>> {
    if tokens.len() != range.len() {
        return Err(KvStoreError::Encode(format!(
            "{} token ids for a KV range of {} tokens",
            tokens.len(),
            range.len()
        )));
    }
    let shape = range.shape();
    let mut tensors: Vec<(String, RawTensor)> = Vec::with_capacity(4 * shape.n_layers);
    for (layer, (k, v)) in range.layers().iter().enumerate() {
        match dtype {
            StorageDtype::Int8 => {
                let [kq, ks] = quantize_keys(k)?;
                let [vq, vs] = quantize_values(v)?;
                tensors.push((k_name(layer), kq));
                tensors.push((k_scale_name(layer), ks));
                tensors.push((v_name(layer), vq));
                tensors.push((v_scale_name(layer), vs));
            }
            float => {
                let dtype = float.loaded_dtype();
                tensors.push((k_name(layer), RawTensor::float(k, dtype)?));
                tensors.push((v_name(layer), RawTensor::float(v, dtype)?));
            }
        }
    }
    let mut meta: HashMap<String, String> = HashMap::from([
        ("format".into(), FORMAT.into()),
        ("format_version".into(), FORMAT_VERSION.into()),
        ("key".into(), key.to_hex()),
        ("kind".into(), key.kind().to_string()),
        ("model_fingerprint".into(), model.to_hex()),
        ("token_count".into(), range.len().to_string()),
        ("base_position".into(), range.base_position().to_string()),
        ("tokens_blake3".into(), hex(&tokens_hash(tokens))),
        ("dtype".into(), dtype.to_string()),
        ("n_layers".into(), shape.n_layers.to_string()),
        ("n_kv_heads".into(), shape.n_kv_heads.to_string()),
        ("head_dim".into(), shape.head_dim.to_string()),
    ]);
    for (name, t) in &tensors {
        meta.insert(
            format!("crc32c.{name}"),
            format!("{:08x}", crc32c::crc32c(&t.data)),
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
    let kind = field(meta, "kind")?
        .parse::<CacheKind>()
        .map_err(|_| RejectReason::Metadata("kind".into()))?;
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
    let dtype = dtype_str
        .parse::<StorageDtype>()
        .map_err(|_| RejectReason::Dtype(dtype_str.into()))?;
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

/// The tensors layer `layer` of a blob of `blob`'s dtype holds, with their element types
/// and dimensions, in the order they are stored.
fn layer_layout(blob: &BlobMeta, layer: usize) -> Vec<(String, safetensors::Dtype, Vec<usize>)> {
    let (heads, tokens, dim) = (blob.shape.n_kv_heads, blob.token_count, blob.shape.head_dim);
    let data = |name| (name, blob.dtype.element(), vec![heads, tokens, dim]);
    match blob.dtype {
        StorageDtype::Int8 => vec![
            data(k_name(layer)),
            (
                k_scale_name(layer),
                safetensors::Dtype::F32,
                vec![heads, 1, dim],
            ),
            data(v_name(layer)),
            (
                v_scale_name(layer),
                safetensors::Dtype::F16,
                vec![heads, tokens, 1],
            ),
        ],
        _ => vec![data(k_name(layer)), data(v_name(layer))],
    }
}

/// The stored tensors of `layers`, layer by layer in the order [`layer_layout`] gives (`k.i`,
/// `v.i`, with `ks.i` and `vs.i` in int8 blobs), each checked to be present and of its
/// element type and shape.
pub fn layer_tensors(
    header: &Metadata,
    blob: &BlobMeta,
    layers: Range<usize>,
) -> Result<Vec<(String, TensorInfo)>, RejectReason> {
    let mut out = Vec::with_capacity(4 * layers.len());
    for layer in layers {
        for (name, dtype, dims) in layer_layout(blob, layer) {
            let info = header.info(&name).ok_or_else(|| RejectReason::Shape {
                name: name.clone(),
                reason: "missing".into(),
            })?;
            if info.dtype != dtype {
                return Err(RejectReason::Dtype(format!("{:?} in {name}", info.dtype)));
            }
            // Checked before any byte range is fetched: the header's offsets (which
            // safetensors checks against shape and dtype) then bound what is read.
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

/// Checks a tensor's bytes against their checksum.
fn check_crc(name: &str, bytes: &[u8], meta: &HashMap<String, String>) -> Result<(), RejectReason> {
    let expected_crc = field(meta, &format!("crc32c.{name}"))?;
    if format!("{:08x}", crc32c::crc32c(bytes)) != expected_crc {
        return Err(RejectReason::Checksum(name.into()));
    }
    Ok(())
}

/// Keys `[heads, tokens, dim]` from int8 bytes and per-channel f32 scales, in f32.
fn dequantize_keys(q: &[u8], scales: &[u8], dims: [usize; 3]) -> Vec<f32> {
    let scales: Vec<f32> = scales
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
        .collect();
    // Written in place row by row: these loops vectorize, collecting would not.
    let mut out = vec![0f32; q.len()];
    let [heads, tokens, dim] = dims;
    let dim = dim.max(1);
    for h in 0..heads {
        let scale = &scales[h * dim..][..dim];
        let rows = h * tokens * dim..(h + 1) * tokens * dim;
        let (q_rows, out_rows) = (&q[rows.clone()], &mut out[rows]);
        for (o, x) in out_rows.chunks_exact_mut(dim).zip(q_rows.chunks_exact(dim)) {
            for ((o, &x), &s) in o.iter_mut().zip(x).zip(scale) {
                *o = f32::from(x as i8) * s;
            }
        }
    }
    out
}

/// Values `[heads, tokens, dim]` from int8 bytes and per-token f16 scales, in f32.
fn dequantize_values(q: &[u8], scales: &[u8], dims: [usize; 3]) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    let dim = dims[2].max(1);
    let rows = out.chunks_exact_mut(dim).zip(q.chunks_exact(dim));
    for ((o, x), s) in rows.zip(scales.chunks_exact(2)) {
        let scale = half::f16::from_le_bytes([s[0], s[1]]).to_f32();
        for (o, &x) in o.iter_mut().zip(x) {
            *o = f32::from(x as i8) * scale;
        }
    }
    out
}

/// Dequantizes int8 data with its scales (bytes as stored) of the given dimensions.
type Dequantize = fn(&[u8], &[u8], [usize; 3]) -> Vec<f32>;

/// Where [`range_from_tensors`] reads stored tensors from: `fill(i, info, dest)` writes
/// the bytes of tensor `i` of the list (described by `info`) into `dest`, which has exactly
/// their length. The destination is the loaded cache's own buffer, not yet initialized, so
/// a source reading a file copies each byte once and nothing is zeroed first.
///
/// # Safety
/// `fill` returns `Ok` only when it has written every byte of `dest`.
pub(crate) unsafe trait TensorSource {
    /// Fills all of `dest` with the stored bytes of tensor `index`.
    fn fill(
        &mut self,
        index: usize,
        info: &TensorInfo,
        dest: &mut [MaybeUninit<u8>],
    ) -> Result<(), RejectReason>;
}

// SAFETY: forwards to a source that keeps the contract.
unsafe impl<T: TensorSource + ?Sized> TensorSource for &mut T {
    fn fill(
        &mut self,
        index: usize,
        info: &TensorInfo,
        dest: &mut [MaybeUninit<u8>],
    ) -> Result<(), RejectReason> {
        (**self).fill(index, info, dest)
    }
}

/// Tensors already in memory, one byte slice per listed tensor.
// SAFETY: a slice of the destination's length is copied over all of it, or it fails.
unsafe impl TensorSource for Vec<&[u8]> {
    fn fill(
        &mut self,
        index: usize,
        _: &TensorInfo,
        dest: &mut [MaybeUninit<u8>],
    ) -> Result<(), RejectReason> {
        match self.get(index) {
            Some(src) if src.len() == dest.len() => {
                dest.write_copy_of_slice(src);
                Ok(())
            }
            _ => Err(RejectReason::Malformed(format!(
                "tensor {index} is not {} bytes",
                dest.len()
            ))),
        }
    }
}

/// Reads listed tensors into fresh buffers, each checked against its checksum where it
/// landed (still in cache).
struct Reader<'a, S> {
    tensors: &'a [(String, TensorInfo)],
    source: S,
    meta: &'a HashMap<String, String>,
    dims: [usize; 3],
    device: &'a Device,
}

impl<S: TensorSource> Reader<'_, S> {
    /// Tensor `index` as `len` elements of `T`, read straight into a new buffer and checked
    /// against its checksum. safetensors stores little-endian values, taken here as native
    /// ones (as candle reads raw buffers).
    fn read<T: bytemuck::Pod>(&mut self, index: usize, len: usize) -> Result<Vec<T>, RejectReason> {
        let (name, info) = &self.tensors[index];
        let bytes = len * size_of::<T>();
        if info.data_offsets.1 - info.data_offsets.0 != bytes {
            return Err(RejectReason::Malformed(format!(
                "{name} is not {bytes} bytes"
            )));
        }
        let mut data: Vec<T> = Vec::with_capacity(len);
        let spare = data.spare_capacity_mut();
        // SAFETY: the spare capacity holds at least `len` elements of `T`, which are
        // `bytes` bytes; any byte may be left uninitialized in a `MaybeUninit<u8>`.
        let dest = unsafe {
            std::slice::from_raw_parts_mut(spare.as_mut_ptr().cast::<MaybeUninit<u8>>(), bytes)
        };
        self.source.fill(index, info, dest)?;
        // SAFETY: `fill` succeeded, so all `bytes` bytes are written, and every bit
        // pattern is a valid `T` (`Pod`).
        unsafe { data.set_len(len) };
        check_crc(name, bytemuck::cast_slice(&data), self.meta)?;
        Ok(data)
    }

    fn tensor<T: candle_core::WithDType>(
        &self,
        index: usize,
        data: Vec<T>,
    ) -> Result<Tensor, RejectReason> {
        Tensor::from_vec(data, &self.dims, self.device).map_err(|e| RejectReason::Shape {
            name: self.tensors[index].0.clone(),
            reason: e.to_string(),
        })
    }

    /// A float tensor read straight into its buffer.
    fn float<T: candle_core::WithDType + bytemuck::Pod>(
        &mut self,
        index: usize,
    ) -> Result<Tensor, RejectReason> {
        let data = self.read::<T>(index, self.dims.iter().product())?;
        self.tensor(index, data)
    }

    /// An int8 tensor and its scales (tensors `index` and `index + 1`, `scale_bytes` of
    /// them), dequantized by `dequantize` into f32.
    fn int8(
        &mut self,
        index: usize,
        scale_bytes: usize,
        dequantize: Dequantize,
    ) -> Result<Tensor, RejectReason> {
        let quants = self.read::<u8>(index, self.dims.iter().product())?;
        let scales = self.read::<u8>(index + 1, scale_bytes)?;
        self.tensor(index, dequantize(&quants, &scales, self.dims))
    }
}

/// Builds the KV range that tensors listed by [`layer_tensors`] form on `device`, in
/// [`StorageDtype::loaded_dtype`], reading each from `source` once and checking its
/// checksum.
pub(crate) fn range_from_tensors(
    tensors: &[(String, TensorInfo)],
    source: impl TensorSource,
    meta: &HashMap<String, String>,
    blob: &BlobMeta,
    device: &Device,
) -> Result<KvRange, RejectReason> {
    let (heads, dim) = (blob.shape.n_kv_heads, blob.shape.head_dim);
    let per_layer = match blob.dtype {
        StorageDtype::Int8 => 4,
        _ => 2,
    };
    if !tensors.len().is_multiple_of(per_layer) {
        return Err(RejectReason::Malformed("incomplete layer".into()));
    }
    let mut reader = Reader {
        tensors,
        source,
        meta,
        dims: [heads, blob.token_count, dim],
        device,
    };
    let mut layers = Vec::with_capacity(tensors.len() / per_layer);
    for at in (0..tensors.len()).step_by(per_layer) {
        let (k, v) = match blob.dtype {
            StorageDtype::Int8 => (
                reader.int8(at, 4 * heads * dim, dequantize_keys)?,
                reader.int8(at + 2, 2 * heads * blob.token_count, dequantize_values)?,
            ),
            StorageDtype::F32 => (reader.float::<f32>(at)?, reader.float::<f32>(at + 1)?),
            StorageDtype::F16 => (
                reader.float::<half::f16>(at)?,
                reader.float::<half::f16>(at + 1)?,
            ),
            StorageDtype::Bf16 => (
                reader.float::<half::bf16>(at)?,
                reader.float::<half::bf16>(at + 1)?,
            ),
        };
        layers.push((k, v));
    }
    KvRange::new(blob.base_position, layers).map_err(|e| RejectReason::Shape {
        name: "range".into(),
        reason: e.to_string(),
    })
}

/// The length of the JSON header that a blob's first bytes `first` announce, refused when
/// the blob is shorter than the length field, or the header longer than `max_header` or
/// than the `blob_len`-byte blob itself.
pub fn header_len(first: &[u8], blob_len: u64, max_header: u64) -> Result<u64, RejectReason> {
    let Some(field) = first.get(..8) else {
        return Err(RejectReason::Malformed("shorter than 8 bytes".into()));
    };
    let len = u64::from_le_bytes(field.try_into().expect("8 bytes"));
    if len > max_header || 8 + len > blob_len {
        return Err(RejectReason::Malformed(format!(
            "a {len}-byte header in a {blob_len}-byte blob"
        )));
    }
    Ok(len)
}

/// Parses the JSON header (the bytes after the 8-byte length) of a blob `blob_len` bytes
/// long: safetensors' own header type checks that the tensors' offsets tile the data, and
/// the data must end where the blob does.
pub fn parse_header(header: &[u8], blob_len: u64) -> Result<Metadata, RejectReason> {
    let parsed: Metadata = serde_json::from_slice(header)
        .map_err(|e| RejectReason::Malformed(format!("unparsable header: {e}")))?;
    let end = 8 + header.len() as u64 + parsed.data_len() as u64;
    if end != blob_len {
        return Err(RejectReason::Malformed(format!(
            "the tensors end at byte {end} of a {blob_len}-byte blob"
        )));
    }
    Ok(parsed)
}

/// What a parsed header says, checked: its metadata, the blob it describes, and the
/// tensors a read of it takes.
pub struct CheckedHeader {
    /// The metadata (with each tensor's checksum).
    pub meta: HashMap<String, String>,
    /// The blob, checked against what the reader requires.
    pub blob: BlobMeta,
    /// The tensors of the layers read, each checked for element type and shape.
    pub tensors: Vec<(String, TensorInfo)>,
}

/// Checks a parsed header against `expected` and lists the tensors of `layers` (every
/// layer when `None`).
pub fn check_header(
    header: &Metadata,
    expected: &Expectation<'_>,
    layers: Option<Range<usize>>,
) -> Result<CheckedHeader, RejectReason> {
    let meta = header
        .metadata()
        .clone()
        .ok_or_else(|| RejectReason::Metadata("__metadata__".into()))?;
    let blob = check_meta(&meta, expected)?;
    let layers = layers.unwrap_or(0..blob.shape.n_layers);
    let tensors = layer_tensors(header, &blob, layers)?;
    Ok(CheckedHeader {
        meta,
        blob,
        tensors,
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
    let CheckedHeader {
        meta,
        blob,
        tensors,
    } = check_header(&header, expected, None)?;
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
