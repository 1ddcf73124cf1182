//! Reading GGUF model files: metadata, tensors and the model fingerprint.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

/// An opened GGUF file whose header has been read and whose tensor data is known to be complete.
pub struct GgufFile {
    path: PathBuf,
    reader: BufReader<File>,
    content: Content,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

impl GgufFile {
    /// Opens a GGUF file, reads its header and checks that every tensor's data lies inside it.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| EngineError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io_err)?;
        let file_len = file.metadata().map_err(io_err)?.len();
        let mut reader = BufReader::new(file);
        let invalid = |reason: String| EngineError::InvalidGguf {
            path: path.clone(),
            reason,
        };
        // Every count, length and size checked against the file first: candle's reader
        // trusts some (a zero alignment divides by zero, element counts can overflow).
        check_layout(&mut reader, &path, file_len)?;
        reader.seek(SeekFrom::Start(0)).map_err(io_err)?;
        let content = Content::read(&mut reader).map_err(|e| invalid(e.to_string()))?;
        // Check all tensor extents up front: a truncated download must fail with a clear
        // error before any weight is loaded, not halfway through with an I/O error.
        let mut infos: Vec<_> = content.tensor_infos.iter().collect();
        infos.sort_by_key(|(_, info)| info.offset);
        for (name, info) in infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(EngineError::Tensor {
                    name: name.clone(),
                    reason: format!("{elems} elements is not a multiple of the block size {block}"),
                });
            }
            let bytes = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .map_or(u64::MAX, |b| b as u64);
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > file_len {
                return Err(EngineError::Truncated {
                    path,
                    tensor: name.clone(),
                    needed: end,
                    actual: file_len,
                });
            }
        }
        Ok(Self {
            path,
            reader,
            content,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The raw metadata value of `key`, if present.
    pub fn metadata(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn required(&self, key: &str) -> Result<&Value> {
        self.metadata(key).ok_or_else(|| EngineError::Metadata {
            key: key.to_string(),
            reason: "missing".into(),
        })
    }

    /// A required string value.
    pub fn string(&self, key: &str) -> Result<&str> {
        self.required(key)?
            .to_string()
            .map(String::as_str)
            .map_err(|e| metadata_error(key, e))
    }

    /// An optional string value.
    pub fn opt_string(&self, key: &str) -> Option<&str> {
        self.metadata(key)?.to_string().ok().map(String::as_str)
    }

    /// A required unsigned integer value (any integer width is accepted).
    pub fn usize(&self, key: &str) -> Result<usize> {
        value_as_u64(self.required(key)?)
            .map(|v| v as usize)
            .ok_or_else(|| metadata_error(key, "not an unsigned integer"))
    }

    /// An optional unsigned integer value.
    pub fn opt_usize(&self, key: &str) -> Option<usize> {
        self.metadata(key)
            .and_then(value_as_u64)
            .map(|v| v as usize)
    }

    /// An optional float value (f32 or f64).
    pub fn opt_f64(&self, key: &str) -> Option<f64> {
        match self.metadata(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            other => value_as_u64(other).map(|v| v as f64),
        }
    }

    /// An optional boolean value.
    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        self.metadata(key)?.to_bool().ok()
    }

    /// A required array value.
    pub fn array(&self, key: &str) -> Result<&[Value]> {
        self.required(key)?
            .to_vec()
            .map(Vec::as_slice)
            .map_err(|e| metadata_error(key, e))
    }

    /// Whether the file has a tensor called `name`.
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// How many tensors the file holds.
    pub fn tensor_count(&self) -> usize {
        self.content.tensor_infos.len()
    }

    /// The shape of tensor `name` in candle's (row-major) order.
    pub fn tensor_dims(&self, name: &str) -> Result<Vec<usize>> {
        self.content
            .tensor_infos
            .get(name)
            .map(|info| info.shape.dims().to_vec())
            .ok_or_else(|| EngineError::Tensor {
                name: name.to_string(),
                reason: "missing".into(),
            })
    }

    /// Loads tensor `name`, dequantized to `dtype` on `device`.
    pub fn dequantized(&mut self, name: &str, device: &Device, dtype: DType) -> Result<Tensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::Tensor {
                name: name.to_string(),
                reason: "missing".into(),
            });
        }
        let qtensor = self
            .content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| EngineError::Tensor {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(qtensor.dequantize(device)?.to_dtype(dtype)?)
    }

    /// The tensor's blocks as stored, when it is stored in Q4_1 (`None` for any other
    /// type): decode steps multiply by these blocks directly.
    pub fn q4_1_blocks(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        // The type is in the header: no tensor of another type is read for nothing.
        let stored = self.content.tensor_infos.get(name).map(|i| i.ggml_dtype);
        if stored.is_some_and(|t| t != candle_core::quantized::GgmlDType::Q4_1) {
            return Ok(None);
        }
        let qtensor = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::Tensor {
                name: name.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Some(qtensor.data()?.into_owned()))
    }

    /// A hash identifying the model: its metadata that shapes computation and all of its
    /// tensor data. Two files with equal fingerprints produce the same KV caches.
    ///
    /// The encoding is fixed here, not borrowed from a library's `Debug` text (which an
    /// upgrade may change, orphaning every stored cache): blake3 over
    /// `"ragcake-model-fingerprint-v2\0"`; then each metadata entry in key order, except
    /// `general.*` and `tokenizer.chat_template*`, as the key's UTF-8 bytes, a 0 byte and the
    /// value (integers and floats little-endian at their own width, booleans one byte,
    /// strings UTF-8 then a 0 byte, arrays their length as a little-endian u64 then each
    /// value); then each tensor in name order as its name, a 0 byte, its GGUF type id
    /// (little-endian u32), its rank and dimensions (little-endian u64s); then the tensor
    /// data region as stored in the file.
    pub fn fingerprint(&mut self) -> Result<LlmFingerprint> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ragcake-model-fingerprint-v2\0");
        let mut keys: Vec<&String> = self
            .content
            .metadata
            .keys()
            // Names, licenses and the like do not change what the model computes.
            .filter(|k| !k.starts_with("general.") && !k.starts_with("tokenizer.chat_template"))
            .collect();
        keys.sort();
        for key in keys {
            hasher.update(key.as_bytes());
            hasher.update(&[0]);
            hash_value(&mut hasher, &self.content.metadata[key]);
        }
        let mut infos: Vec<_> = self.content.tensor_infos.iter().collect();
        infos.sort_by(|a, b| a.0.cmp(b.0));
        for (name, info) in &infos {
            hasher.update(name.as_bytes());
            hasher.update(&[0]);
            hasher.update(&ggml_type_id(info.ggml_dtype).to_le_bytes());
            let dims = info.shape.dims();
            hasher.update(&(dims.len() as u64).to_le_bytes());
            for &dim in dims {
                hasher.update(&(dim as u64).to_le_bytes());
            }
        }
        // The tensor data region, in file order.
        let io_err = |source| EngineError::Io {
            path: self.path.clone(),
            source,
        };
        self.reader
            .seek(SeekFrom::Start(self.content.tensor_data_offset))
            .map_err(io_err)?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = self.reader.read(&mut buf).map_err(io_err)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(LlmFingerprint(*hasher.finalize().as_bytes()))
    }
}

/// A tensor type's id in the GGUF format (the number a GGUF file stores for it).
fn ggml_type_id(dtype: candle_core::quantized::GgmlDType) -> u32 {
    use candle_core::quantized::GgmlDType as T;
    match dtype {
        T::F32 => 0,
        T::F16 => 1,
        T::Q4_0 => 2,
        T::Q4_1 => 3,
        T::Q5_0 => 6,
        T::Q5_1 => 7,
        T::Q8_0 => 8,
        T::Q8_1 => 9,
        T::Q2K => 10,
        T::Q3K => 11,
        T::Q4K => 12,
        T::Q5K => 13,
        T::Q6K => 14,
        T::Q8K => 15,
        T::BF16 => 30,
    }
}

fn metadata_error(key: &str, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Metadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

fn value_as_u64(value: &Value) -> Option<u64> {
    match value {
        Value::U8(v) => Some(*v as u64),
        Value::U16(v) => Some(*v as u64),
        Value::U32(v) => Some(*v as u64),
        Value::U64(v) => Some(*v),
        Value::I8(v) => u64::try_from(*v).ok(),
        Value::I16(v) => u64::try_from(*v).ok(),
        Value::I32(v) => u64::try_from(*v).ok(),
        Value::I64(v) => u64::try_from(*v).ok(),
        _ => None,
    }
}

fn hash_value(hasher: &mut blake3::Hasher, value: &Value) {
    match value {
        Value::U8(v) => hasher.update(&v.to_le_bytes()),
        Value::I8(v) => hasher.update(&v.to_le_bytes()),
        Value::U16(v) => hasher.update(&v.to_le_bytes()),
        Value::I16(v) => hasher.update(&v.to_le_bytes()),
        Value::U32(v) => hasher.update(&v.to_le_bytes()),
        Value::I32(v) => hasher.update(&v.to_le_bytes()),
        Value::U64(v) => hasher.update(&v.to_le_bytes()),
        Value::I64(v) => hasher.update(&v.to_le_bytes()),
        Value::F32(v) => hasher.update(&v.to_le_bytes()),
        Value::F64(v) => hasher.update(&v.to_le_bytes()),
        Value::Bool(v) => hasher.update(&[*v as u8]),
        Value::String(v) => hasher.update(v.as_bytes()).update(&[0]),
        Value::Array(values) => {
            hasher.update(&(values.len() as u64).to_le_bytes());
            for v in values {
                hash_value(hasher, v);
            }
            hasher
        }
    };
}

/// A 32-byte hash identifying a model's weights and architecture; KV caches are tagged with it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LlmFingerprint(pub [u8; 32]);

impl LlmFingerprint {
    /// Lower-case hex form.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses [`LlmFingerprint::to_hex`]'s form (64 hex digits, either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !hex.is_ascii() {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Self(bytes))
    }

    /// The first 16 hex digits, enough to tell models apart in logs and paths.
    pub fn short(&self) -> String {
        self.to_hex()[..16].to_string()
    }
}

impl std::fmt::Debug for LlmFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LlmFingerprint({})", self.short())
    }
}

impl std::fmt::Display for LlmFingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// The GGUF versions read (llama.cpp writes 3; 2 differs only in nothing read here).
const GGUF_VERSIONS: [u32; 2] = [2, 3];
/// Longest metadata key or tensor name accepted (llama.cpp's own limit is 64 bytes for
/// names; keys are short).
const MAX_NAME_BYTES: u64 = 1 << 16;
/// Arrays nested deeper than this are refused.
const MAX_ARRAY_DEPTH: usize = 4;

/// A reader that knows how many bytes of the file are left.
struct Cursor<'a, R> {
    inner: &'a mut R,
    left: u64,
    /// The file, for errors.
    path: &'a Path,
}

impl<R: Read> Cursor<'_, R> {
    /// The error of a file whose structure is wrong.
    fn invalid(&self, reason: String) -> EngineError {
        EngineError::InvalidGguf {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn bytes<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        if self.left < N as u64 {
            return Err(self.invalid(format!("the file ends inside {what}")));
        }
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.invalid(format!("reading {what}: {e}")))?;
        self.left -= N as u64;
        Ok(buf)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.bytes::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.bytes::<8>(what).map(u64::from_le_bytes)
    }

    /// Skips `n` bytes that must lie inside the file.
    fn skip(&mut self, n: u64, what: &str) -> Result<()> {
        if n > self.left {
            return Err(self.invalid(format!("{what} runs {n} bytes past the end of the file")));
        }
        let copied = std::io::copy(&mut self.inner.take(n), &mut std::io::sink())
            .map_err(|e| self.invalid(format!("reading {what}: {e}")))?;
        if copied != n {
            return Err(self.invalid(format!("the file ends inside {what}")));
        }
        self.left -= n;
        Ok(())
    }

    /// A length-prefixed string of at most `max` bytes, read (`keep`) or skipped.
    fn string(&mut self, max: u64, keep: bool, what: &str) -> Result<Option<String>> {
        let len = self.u64(what)?;
        if len > max.min(self.left) {
            return Err(self.invalid(format!(
                "{what} of {len} bytes (the file has {} left)",
                self.left
            )));
        }
        if !keep {
            self.skip(len, what)?;
            return Ok(None);
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.invalid(format!("reading {what}: {e}")))?;
        self.left -= len;
        String::from_utf8(buf)
            .map(Some)
            .map_err(|_| self.invalid(format!("{what} is not UTF-8")))
    }

    /// Skips one metadata value of type `ty`; returns it when it is an unsigned 32-bit
    /// integer (the one kind of value this check needs to know).
    fn value(&mut self, ty: u32, depth: usize, what: &str) -> Result<Option<u32>> {
        match ty {
            0 | 1 | 7 => self.skip(1, what)?,
            2 | 3 => self.skip(2, what)?,
            4 => return self.u32(what).map(Some),
            5 | 6 => self.skip(4, what)?,
            10..=12 => self.skip(8, what)?,
            8 => {
                self.string(u64::MAX, false, what)?;
            }
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.invalid(format!(
                        "{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep"
                    )));
                }
                let item = self.u32(what)?;
                let n = self.u64(what)?;
                match fixed_size(item) {
                    Some(size) => {
                        let bytes = n.checked_mul(size).ok_or_else(|| {
                            self.invalid(format!("{what}: an array of {n} items"))
                        })?;
                        self.skip(bytes, what)?;
                    }
                    None if item == 8 || item == 9 => {
                        // Each item takes at least 8 bytes on disk.
                        if n > self.left / 8 {
                            return Err(self.invalid(format!(
                                "{what}: an array of {n} items in {} bytes",
                                self.left
                            )));
                        }
                        for _ in 0..n {
                            self.value(item, depth + 1, what)?;
                        }
                    }
                    None => {
                        return Err(self.invalid(format!("{what}: unknown array item type {item}")));
                    }
                }
            }
            other => return Err(self.invalid(format!("{what}: unknown value type {other}"))),
        }
        Ok(None)
    }
}

/// The on-disk size of a fixed-size metadata value type.
fn fixed_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Checks a GGUF file's structure against its length before anything is allocated by
/// it: magic and version; tensor and key counts the rest of the file can hold; every key,
/// string and array inside the file, no key twice; `general.alignment` a power of two;
/// tensor names unique, at most 4 dimensions, element counts that neither overflow nor
/// exceed what the file's bytes can encode, data offsets aligned.
fn check_layout<R: Read>(reader: &mut R, path: &Path, file_len: u64) -> Result<()> {
    let mut r = Cursor {
        inner: reader,
        left: file_len,
        path,
    };
    let magic = r.bytes::<4>("the magic number")?;
    if &magic != b"GGUF" {
        return Err(r.invalid(format!("not a GGUF file (magic {magic:02x?})")));
    }
    let version = r.u32("the version")?;
    if !GGUF_VERSIONS.contains(&version) {
        return Err(r.invalid(format!(
            "GGUF version {version} (versions 2 and 3 are read)"
        )));
    }
    let tensor_count = r.u64("the tensor count")?;
    let kv_count = r.u64("the metadata count")?;
    // A key-value pair takes at least 13 bytes, a tensor description at least 24.
    if kv_count > r.left / 13 || tensor_count > r.left / 24 {
        return Err(r.invalid(format!(
            "{tensor_count} tensors and {kv_count} metadata entries in a file of {file_len} bytes"
        )));
    }
    let mut keys = std::collections::HashSet::new();
    let mut alignment = 32u64;
    for _ in 0..kv_count {
        let key = r
            .string(MAX_NAME_BYTES, true, "a metadata key")?
            .unwrap_or_default();
        let ty = r.u32(&key)?;
        let value = r.value(ty, 0, &key)?;
        if key == "general.alignment" {
            alignment = match value {
                Some(a) if a.is_power_of_two() => a as u64,
                _ => return Err(r.invalid("general.alignment is not a u32 power of two".into())),
            };
        }
        if !keys.insert(key.clone()) {
            return Err(r.invalid(format!("metadata key {key} appears twice")));
        }
    }
    let mut names = std::collections::HashSet::new();
    for _ in 0..tensor_count {
        let name = r
            .string(MAX_NAME_BYTES, true, "a tensor name")?
            .unwrap_or_default();
        let n_dims = r.u32(&name)?;
        if n_dims > 4 {
            return Err(r.invalid(format!("tensor {name} has {n_dims} dimensions (at most 4)")));
        }
        let mut elements = 1u64;
        for _ in 0..n_dims {
            let dim = r.u64(&name)?;
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| r.invalid(format!("tensor {name}: its dimensions overflow")))?;
        }
        // No weight type takes less than one bit per element.
        if elements > file_len.saturating_mul(8) {
            return Err(r.invalid(format!(
                "tensor {name} of {elements} elements in a file of {file_len} bytes"
            )));
        }
        let _dtype = r.u32(&name)?;
        let offset = r.u64(&name)?;
        if !offset.is_multiple_of(alignment) {
            return Err(r.invalid(format!(
                "tensor {name}: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(r.invalid(format!("tensor {name} appears twice")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    use super::GgufFile;

    /// A two-tensor GGUF with metadata of each kind the encoding distinguishes.
    fn tiny_gguf(path: &std::path::Path, weight: f32) {
        let w = Tensor::new(&[1.0f32, 2.0, 3.0, weight], &Device::Cpu).unwrap();
        let b = Tensor::zeros((2, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = QTensor::quantize(&w, GgmlDType::F32).unwrap();
        let b = QTensor::quantize(&b, GgmlDType::Q8_0).unwrap();
        let metadata = [
            ("general.name", Value::String("left out".into())),
            ("llama.block_count", Value::U32(2)),
            ("llama.rope.freq_base", Value::F32(10000.0)),
            ("llama.use_parallel_residual", Value::Bool(false)),
            (
                "tokenizer.ggml.tokens",
                Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            ),
        ];
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
        let mut file = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut file, &metadata, &[("w", &w), ("b", &b)]).unwrap();
    }

    #[test]
    fn the_fingerprint_encoding_is_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.gguf");
        tiny_gguf(&path, 4.0);
        let fingerprint = GgufFile::open(&path).unwrap().fingerprint().unwrap();
        // The documented encoding of this file; a change here orphans every stored cache.
        assert_eq!(
            fingerprint.to_hex(),
            "a9eca5f6aa3291010cd344a6b030cf4e993bb25ea3a41733ad96c876f986bd2f"
        );
        tiny_gguf(&path, 5.0);
        let changed = GgufFile::open(&path).unwrap().fingerprint().unwrap();
        assert_ne!(changed, fingerprint);
    }
}
