//! The KV cache: per-layer keys and values that can be appended to, exported and imported.

use std::borrow::Cow;
use std::ops::Range;

use candle_core::{DType, Device, Storage, Tensor};

use crate::correction::{AttentionCorrection, CorrectedKeys, LayerCorrection};
use crate::error::{EngineError, Result};
use crate::rope::LayerRopes;

/// The dimensions of a model's KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KvShape {
    /// Transformer layers.
    pub n_layers: usize,
    /// Key/value heads per layer.
    pub n_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl KvShape {
    /// Values stored per token: layers × (K and V) × heads × head width.
    pub fn values_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim
    }
}

/// Keys and values of a contiguous run of positions, detached from any cache.
///
/// Each layer holds `(k, v)`, both `[n_kv_heads, tokens, head_dim]`. Keys are rotated for the
/// positions `base_position..base_position + len`.
#[derive(Debug, Clone)]
pub struct KvRange {
    base_position: usize,
    len: usize,
    layers: Vec<(Tensor, Tensor)>,
}

impl KvRange {
    /// Builds a range from per-layer `(k, v)` tensors, checking that their shapes agree.
    pub fn new(base_position: usize, layers: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let first = layers
            .first()
            .ok_or_else(|| EngineError::KvMismatch("a KV range needs at least one layer".into()))?;
        let dims = first.0.dims3()?;
        for (i, (k, v)) in layers.iter().enumerate() {
            if k.dims() != [dims.0, dims.1, dims.2] || v.dims() != [dims.0, dims.1, dims.2] {
                return Err(EngineError::KvMismatch(format!(
                    "layer {i}: k {:?} / v {:?} differ from layer 0's {:?}",
                    k.dims(),
                    v.dims(),
                    dims
                )));
            }
        }
        Ok(Self {
            base_position,
            len: dims.1,
            layers,
        })
    }

    /// Position of the first token.
    pub fn base_position(&self) -> usize {
        self.base_position
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range holds no tokens.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The per-layer `(k, v)` tensors.
    pub fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// Consumes the range, returning its per-layer `(k, v)` tensors.
    pub fn into_layers(self) -> Vec<(Tensor, Tensor)> {
        self.layers
    }

    /// The cache shape this range fits.
    pub fn shape(&self) -> KvShape {
        let (n_kv_heads, _, head_dim) = self.layers[0].0.dims3().unwrap_or((0, 0, 0));
        KvShape {
            n_layers: self.layers.len(),
            n_kv_heads,
            head_dim,
        }
    }

    /// The element type of the tensors.
    pub fn dtype(&self) -> DType {
        self.layers[0].0.dtype()
    }

    /// Bytes held by the tensors.
    pub fn bytes(&self) -> usize {
        self.shape().values_per_token() * self.len * self.dtype().size_in_bytes()
    }

    /// The same range with its tensors converted to `dtype` (f16 for storage, say).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|(k, v)| Ok((k.to_dtype(dtype)?, v.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            ..self.clone()
        })
    }

    /// The same range with its keys re-rotated to start at `position`, each layer by its
    /// own table of `ropes` (the range holds the layers `first_layer..`).
    pub fn moved_to(
        &self,
        position: usize,
        ropes: &LayerRopes,
        first_layer: usize,
    ) -> Result<Self> {
        let delta = position as i64 - self.base_position as i64;
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, (k, v))| Ok((ropes.layer(first_layer + i)?.shift(k, delta)?, v.clone())))
            .collect::<Result<_>>()?;
        Ok(Self {
            base_position: position,
            len: self.len,
            layers,
        })
    }
}

#[derive(Debug, Clone)]
struct LayerBuffer {
    /// `[n_kv_heads, capacity, head_dim]`; slots `len..capacity` are unused.
    k: Tensor,
    v: Tensor,
}

/// A model's KV cache for one sequence: a contiguous run of positions starting at
/// `base_position`, stored in buffers that grow geometrically so appending is amortised O(1).
#[derive(Debug, Clone)]
pub struct KvCache {
    shape: KvShape,
    dtype: DType,
    device: Device,
    base_position: usize,
    len: usize,
    /// Tokens past `len` held by the bottom `partial_layers` layers only (a layer-split
    /// prefill computed them there; their top layers come later).
    partial: usize,
    partial_layers: usize,
    capacity: usize,
    layers: Vec<LayerBuffer>,
    /// Loaded position-independent chunk keys the tokens after them correct their
    /// attention to ([`KvCache::correct_attention`]).
    corrected: Option<CorrectedKeys>,
}

const MIN_CAPACITY: usize = 256;

impl KvCache {
    /// An empty cache whose first token will sit at `base_position`.
    pub fn new(shape: KvShape, base_position: usize, dtype: DType, device: &Device) -> Self {
        Self {
            shape,
            dtype,
            device: device.clone(),
            base_position,
            len: 0,
            partial: 0,
            partial_layers: 0,
            capacity: 0,
            layers: Vec::new(),
            corrected: None,
        }
    }

    /// From now on, every token appended (the question tail, the answer) attends to the
    /// keys at `spans` — loaded position-independent chunk caches, below [`KvCache::len`] —
    /// with `correction` (see [`crate::correction`]); a key recomputed in context later
    /// ([`KvCache::write_rows`]) is an ordinary key from the layer it was recomputed at.
    /// The identity or no spans clears any correction.
    pub fn correct_attention(
        &mut self,
        spans: &[Range<usize>],
        correction: AttentionCorrection,
    ) -> Result<()> {
        correction.validate()?;
        if let Some(span) = spans.iter().find(|s| s.end > self.len || s.start > s.end) {
            return Err(EngineError::KvMismatch(format!(
                "chunk tokens {span:?} are not in a cache of {} tokens",
                self.len
            )));
        }
        if correction.is_identity() || spans.iter().all(|s| s.is_empty()) {
            self.corrected = None;
            return Ok(());
        }
        let mut keys = vec![false; self.len];
        for span in spans {
            keys[span.clone()].fill(true);
        }
        self.corrected = Some(CorrectedKeys {
            correction,
            queries_from: self.len,
            layers: vec![keys; self.shape.n_layers],
        });
        Ok(())
    }

    /// The correction the tokens after the chunk caches apply, if any.
    pub fn attention_correction(&self) -> Option<AttentionCorrection> {
        self.corrected.as_ref().map(|c| c.correction)
    }

    /// What queries correct at `layer`; `None` when nothing is corrected there.
    pub(crate) fn layer_correction(&self, layer: usize) -> Option<LayerCorrection<'_>> {
        self.corrected.as_ref()?.layer(layer)
    }

    /// The cache's dimensions.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// The element type of the stored keys and values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the cache lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Position of the first token.
    pub fn base_position(&self) -> usize {
        self.base_position
    }

    /// Position the next appended token will take.
    pub fn next_position(&self) -> usize {
        self.base_position + self.len
    }

    /// Tokens after [`KvCache::len`] held by the bottom [`KvCache::partial_layers`] layers
    /// only: computed there by a layer-split prefill, their top layers not yet filled.
    pub fn partial_len(&self) -> usize {
        self.partial
    }

    /// How many bottom layers hold the partial tokens (0 when there are none).
    pub fn partial_layers(&self) -> usize {
        self.partial_layers
    }

    /// Bytes of keys and values held by the tokens in the cache.
    pub fn bytes_used(&self) -> usize {
        self.len * self.shape.values_per_token() * self.dtype.size_in_bytes()
    }

    /// Bytes allocated, used or not.
    pub fn bytes_reserved(&self) -> usize {
        self.capacity * self.shape.values_per_token() * self.dtype.size_in_bytes()
    }

    /// Makes room for `additional` more tokens without reallocating on the way.
    pub fn reserve(&mut self, additional: usize) -> Result<()> {
        let held = self.len + self.partial;
        let needed = held + additional;
        if needed <= self.capacity {
            return Ok(());
        }
        let capacity = needed.max(self.capacity * 2).max(MIN_CAPACITY);
        let dims = (self.shape.n_kv_heads, capacity, self.shape.head_dim);
        let mut layers = Vec::with_capacity(self.shape.n_layers);
        for i in 0..self.shape.n_layers {
            let k = Tensor::zeros(dims, self.dtype, &self.device)?;
            let v = Tensor::zeros(dims, self.dtype, &self.device)?;
            if held > 0 {
                let old = &self.layers[i];
                k.slice_set(&old.k.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
                v.slice_set(&old.v.narrow(1, 0, held)?.contiguous()?, 1, 0)?;
            }
            layers.push(LayerBuffer { k, v });
        }
        self.layers = layers;
        self.capacity = capacity;
        Ok(())
    }

    /// Writes `k`, `v` (`[n_kv_heads, tokens, head_dim]`) of `layer` into the slots after the
    /// committed tokens and returns views of keys and values up to and including them.
    /// The tokens count only once [`KvCache::commit`] is called after the last layer.
    pub(crate) fn write_layer(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.write_layer_at(layer, self.len, k, v)
    }

    /// [`KvCache::write_layer`] at token index `offset` (past the committed tokens when a
    /// layer-split prefill computes bottom layers ahead of the top ones).
    pub(crate) fn write_layer_at(
        &mut self,
        layer: usize,
        offset: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let tokens = k.dim(1)?;
        let total = offset + tokens;
        if total > self.len + self.partial {
            self.reserve(total - self.len - self.partial)?;
        }
        let buf = &self.layers[layer];
        buf.k
            .slice_set(&k.to_dtype(self.dtype)?.contiguous()?, 1, offset)?;
        buf.v
            .slice_set(&v.to_dtype(self.dtype)?.contiguous()?, 1, offset)?;
        Ok((buf.k.narrow(1, 0, total)?, buf.v.narrow(1, 0, total)?))
    }

    /// Overwrites the keys and values of `layer` at the cache indices `indices` (ascending,
    /// below [`KvCache::len`]) with `k`, `v` (`[n_kv_heads, indices.len(), head_dim]`), and
    /// returns views of keys and values up to and including the last of them. Scattered
    /// tokens of a chunk recomputed in context replace their loaded values this way.
    pub(crate) fn write_rows(
        &mut self,
        layer: usize,
        indices: &[usize],
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let end = indices.last().map_or(0, |&last| last + 1);
        if end > self.len || indices.windows(2).any(|w| w[0] >= w[1]) {
            return Err(EngineError::KvMismatch(format!(
                "cannot overwrite tokens {indices:?} of a cache of {} tokens",
                self.len
            )));
        }
        let buf = &self.layers[layer];
        let (k, v) = (k.to_dtype(self.dtype)?, v.to_dtype(self.dtype)?);
        // One copy per run of consecutive indices.
        let mut row = 0;
        while row < indices.len() {
            let mut run = 1;
            while row + run < indices.len() && indices[row + run] == indices[row] + run {
                run += 1;
            }
            buf.k
                .slice_set(&k.narrow(1, row, run)?.contiguous()?, 1, indices[row])?;
            buf.v
                .slice_set(&v.narrow(1, row, run)?.contiguous()?, 1, indices[row])?;
            row += run;
        }
        // Recomputed in context: no longer a loaded chunk key at this layer.
        if let Some(corrected) = &mut self.corrected {
            let keys = &mut corrected.layers[layer];
            for &i in indices {
                if let Some(key) = keys.get_mut(i) {
                    *key = false;
                }
            }
        }
        Ok((buf.k.narrow(1, 0, end)?, buf.v.narrow(1, 0, end)?))
    }

    /// Copies of the keys and values of `layer` at the cache indices `indices`, each
    /// `[n_kv_heads, indices.len(), head_dim]`.
    pub(crate) fn rows(&self, layer: usize, indices: &[usize]) -> Result<(Tensor, Tensor)> {
        if indices.iter().any(|&i| i >= self.len) {
            return Err(EngineError::KvMismatch(format!(
                "tokens {indices:?} are not all in a cache of {} tokens",
                self.len
            )));
        }
        let buf = &self.layers[layer];
        let index: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let index = Tensor::new(index.as_slice(), &self.device)?;
        Ok((
            buf.k.index_select(&index, 1)?,
            buf.v.index_select(&index, 1)?,
        ))
    }

    /// Counts `tokens` written by [`KvCache::write_layer`] into every layer. Partial tokens
    /// they cover (recomputed or imported in full) are partial no more.
    pub(crate) fn commit(&mut self, tokens: usize) {
        self.len += tokens;
        self.partial = self.partial.saturating_sub(tokens);
        if self.partial == 0 {
            self.partial_layers = 0;
        }
    }

    /// Counts `tokens` written into the bottom `layers` layers only, after the partial
    /// tokens already there.
    pub(crate) fn commit_bottom(&mut self, tokens: usize, layers: usize) {
        self.partial += tokens;
        self.partial_layers = layers;
    }

    /// Fills the top layers of the oldest partial tokens with `range`, which holds the
    /// layers `first_layer..` of those tokens (a ranged read of a stored cache), re-rotating
    /// its keys when it was computed at another position. The tokens are then whole.
    pub fn fill_top(
        &mut self,
        range: &KvRange,
        first_layer: usize,
        ropes: &LayerRopes,
    ) -> Result<()> {
        let expected = KvShape {
            n_layers: self.shape.n_layers.saturating_sub(first_layer),
            ..self.shape
        };
        if self.partial == 0 || first_layer != self.partial_layers {
            return Err(EngineError::KvMismatch(format!(
                "no partial tokens below layer {first_layer} to fill ({} held below layer {})",
                self.partial, self.partial_layers
            )));
        }
        if range.shape() != expected || range.len() > self.partial {
            return Err(EngineError::KvMismatch(format!(
                "range of {} tokens, shape {:?}, does not fill {} partial tokens of shape {:?}",
                range.len(),
                range.shape(),
                self.partial,
                expected
            )));
        }
        let range = self.placed(range, ropes, first_layer)?;
        for (i, (k, v)) in range.layers().iter().enumerate() {
            self.write_layer(first_layer + i, k, v)?;
        }
        self.commit(range.len());
        Ok(())
    }

    /// Runs `f` on one layer's key and value buffers as plain f32 slices, row-major
    /// `[n_kv_heads, capacity, head_dim]`, with the capacity: the slice-level decode path
    /// reads the cache without building tensors. CPU f32 caches only.
    pub(crate) fn with_layer_buffers<R>(
        &self,
        layer: usize,
        f: impl FnOnce(&[f32], &[f32], usize) -> R,
    ) -> Result<R> {
        let buf = self.layers.get(layer).ok_or_else(|| {
            EngineError::KvMismatch(format!("layer {layer} of {}", self.shape.n_layers))
        })?;
        let (k_storage, k_layout) = buf.k.storage_and_layout();
        let (v_storage, v_layout) = buf.v.storage_and_layout();
        match (&*k_storage, &*v_storage) {
            (Storage::Cpu(k), Storage::Cpu(v))
                if k_layout.is_contiguous() && v_layout.is_contiguous() =>
            {
                let k = &k.as_slice::<f32>()?[k_layout.start_offset()..];
                let v = &v.as_slice::<f32>()?[v_layout.start_offset()..];
                Ok(f(k, v, self.capacity))
            }
            _ => Err(EngineError::KvMismatch(
                "plain buffers are read from contiguous CPU caches only".into(),
            )),
        }
    }

    /// Views `[n_kv_heads, len, head_dim]` of one layer's keys and values.
    pub fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        if self.len == 0 {
            return Err(EngineError::EmptyInput);
        }
        let buf = self.layers.get(layer).ok_or_else(|| {
            EngineError::KvMismatch(format!("layer {layer} of {}", self.shape.n_layers))
        })?;
        Ok((buf.k.narrow(1, 0, self.len)?, buf.v.narrow(1, 0, self.len)?))
    }

    /// Copies out the tokens in `range` (indices into this cache, not positions).
    pub fn export(&self, range: Range<usize>) -> Result<KvRange> {
        if range.start >= range.end || range.end > self.len {
            return Err(EngineError::KvMismatch(format!(
                "cannot export {range:?} from a cache of {} tokens",
                self.len
            )));
        }
        let n = range.end - range.start;
        // `copy` so the exported tensors never alias buffers a later write may reuse.
        let layers = self
            .layers
            .iter()
            .map(|b| {
                Ok((
                    b.k.narrow(1, range.start, n)?.copy()?,
                    b.v.narrow(1, range.start, n)?.copy()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        KvRange::new(self.base_position + range.start, layers)
    }

    /// Appends `range` at [`KvCache::next_position`], re-rotating its keys by the position
    /// difference when it was computed elsewhere (a position-independent chunk cache).
    pub fn import(&mut self, range: &KvRange, ropes: &LayerRopes) -> Result<()> {
        if range.shape() != self.shape {
            return Err(EngineError::KvMismatch(format!(
                "range shape {:?} does not match cache shape {:?}",
                range.shape(),
                self.shape
            )));
        }
        let range = self.placed(range, ropes, 0)?;
        self.reserve(range.len())?;
        for (i, (k, v)) in range.layers().iter().enumerate() {
            self.write_layer(i, k, v)?;
        }
        self.commit(range.len());
        Ok(())
    }

    /// `range` with its keys at [`KvCache::next_position`]: as it is when it was computed
    /// there, else re-rotated by the position difference (a position-independent cache).
    fn placed<'a>(
        &self,
        range: &'a KvRange,
        ropes: &LayerRopes,
        first_layer: usize,
    ) -> Result<Cow<'a, KvRange>> {
        Ok(if range.base_position() == self.next_position() {
            Cow::Borrowed(range)
        } else {
            Cow::Owned(range.moved_to(self.next_position(), ropes, first_layer)?)
        })
    }

    /// Drops every token from index `len` on (and every partial token), keeping the
    /// buffers for reuse.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
        // Cut before the first correcting query: the tokens after the chunks are gone.
        if self
            .corrected
            .as_ref()
            .is_some_and(|c| self.len < c.queries_from)
        {
            self.corrected = None;
        }
        self.partial = 0;
        self.partial_layers = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: KvShape = KvShape {
        n_layers: 2,
        n_kv_heads: 3,
        head_dim: 4,
    };

    fn tokens(start: f32, n: usize) -> Tensor {
        Tensor::arange(start, start + (3 * n * 4) as f32, &Device::Cpu)
            .unwrap()
            .reshape((3, n, 4))
            .unwrap()
    }

    fn append(cache: &mut KvCache, start: f32, n: usize) {
        for layer in 0..SHAPE.n_layers {
            let k = tokens(start, n);
            let v = (tokens(start, n) * -1.0).unwrap();
            cache.write_layer(layer, &k, &v).unwrap();
        }
        cache.commit(n);
    }

    fn empty_cache() -> KvCache {
        KvCache::new(SHAPE, 0, DType::F32, &Device::Cpu)
    }

    fn rope() -> LayerRopes {
        let rope = crate::rope::Rope::plain_f32(4, 64);
        LayerRopes::uniform(rope, SHAPE.n_layers)
    }

    /// Asserts that every layer's keys and values are bit-equal in both caches.
    fn assert_same_layers(a: &KvCache, b: &KvCache) {
        for layer in 0..SHAPE.n_layers {
            let (a, b) = (a.layer(layer).unwrap(), b.layer(layer).unwrap());
            for (x, y) in [(a.0, b.0), (a.1, b.1)] {
                let diff = (x - y).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "layer {layer}");
            }
        }
    }

    #[test]
    fn appends_grow_the_buffers_and_keep_earlier_tokens() {
        let mut cache = empty_cache();
        append(&mut cache, 0.0, 200);
        append(&mut cache, 10_000.0, 100); // forces a reallocation past 256
        assert_eq!(cache.len(), 300);
        assert!(cache.bytes_reserved() >= cache.bytes_used());
        assert_eq!(cache.bytes_used(), 300 * SHAPE.values_per_token() * 4);
        let (k, _) = cache.layer(1).unwrap();
        let first = k.narrow(1, 0, 200).unwrap().contiguous().unwrap();
        assert_eq!(
            first.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            tokens(0.0, 200)
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }

    #[test]
    fn export_copies_so_later_writes_do_not_change_it() {
        let mut cache = KvCache::new(SHAPE, 7, DType::F32, &Device::Cpu);
        append(&mut cache, 0.0, 10);
        let range = cache.export(4..10).unwrap();
        assert_eq!((range.base_position(), range.len()), (11, 6));
        let before = range.layers()[0]
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        cache.truncate(4);
        append(&mut cache, 555.0, 6); // overwrites the slots the range came from
        let after = range.layers()[0]
            .0
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn import_at_the_same_position_is_exact() {
        let rope = rope();
        let mut source = empty_cache();
        append(&mut source, 0.0, 8);
        let mut target = empty_cache();
        target.import(&source.export(0..5).unwrap(), &rope).unwrap();
        target.import(&source.export(5..8).unwrap(), &rope).unwrap();
        assert_same_layers(&source, &target);
    }

    #[test]
    fn scattered_rows_overwrite_only_their_tokens() {
        let mut cache = empty_cache();
        append(&mut cache, 0.0, 10);
        let before = cache.export(0..10).unwrap();
        let indices = [2usize, 3, 7];
        let k = Tensor::full(99f32, (3, 3, 4), &Device::Cpu).unwrap();
        let v = Tensor::full(-99f32, (3, 3, 4), &Device::Cpu).unwrap();
        let (keys, _) = cache.write_rows(1, &indices, &k, &v).unwrap();
        assert_eq!(keys.dim(1).unwrap(), 8, "views end at the last row written");
        let (rk, rv) = cache.rows(1, &indices).unwrap();
        assert_eq!(
            rk.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![99.0; 36]
        );
        assert_eq!(
            rv.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![-99.0; 36]
        );
        let mut original = empty_cache();
        original.import(&before, &rope()).unwrap();
        let flat = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let untouched = [0usize, 1, 4, 5, 6, 8, 9];
        for layer in 0..SHAPE.n_layers {
            let rows = if layer == 1 {
                &untouched[..]
            } else {
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9][..]
            };
            let (a, b) = (
                cache.rows(layer, rows).unwrap(),
                original.rows(layer, rows).unwrap(),
            );
            assert_eq!(flat(a.0), flat(b.0), "layer {layer}");
            assert_eq!(flat(a.1), flat(b.1), "layer {layer}");
        }
        let (k2, v2) = (k.narrow(1, 0, 2).unwrap(), v.narrow(1, 0, 2).unwrap());
        assert!(
            cache.write_rows(1, &[3, 2], &k2, &v2).is_err(),
            "out of order"
        );
        assert!(
            cache.write_rows(1, &[9, 10], &k2, &v2).is_err(),
            "past the end"
        );
        assert!(cache.rows(0, &[10]).is_err());
    }

    #[test]
    fn ranges_with_mismatched_layers_are_rejected() {
        let a = tokens(0.0, 4);
        let b = tokens(0.0, 5);
        assert!(KvRange::new(0, vec![(a.clone(), a.clone()), (b.clone(), b)]).is_err());
        assert!(KvRange::new(0, vec![]).is_err());
    }

    #[test]
    fn bottom_layers_run_ahead_and_filled_tops_make_the_tokens_whole() {
        let rope = rope();
        let mut whole = empty_cache();
        append(&mut whole, 0.0, 300);
        // Two chunks' bottom layer written ahead (past a reallocation), then the tops.
        let mut split = empty_cache();
        for (offset, n) in [(0usize, 200usize), (200, 100)] {
            let bottom = whole.export(offset..offset + n).unwrap();
            let (k, v) = &bottom.layers()[0];
            split.write_layer_at(0, offset, k, v).unwrap();
            split.commit_bottom(n, 1);
        }
        assert_eq!(
            (split.len(), split.partial_len(), split.partial_layers()),
            (0, 300, 1)
        );
        let top = |range: Range<usize>| {
            let full = whole.export(range).unwrap();
            KvRange::new(full.base_position(), full.layers()[1..].to_vec()).unwrap()
        };
        // A range of the wrong layers or too long is refused and changes nothing.
        assert!(
            split
                .fill_top(&whole.export(0..200).unwrap(), 1, &rope)
                .is_err()
        );
        assert!(split.fill_top(&top(0..200), 0, &rope).is_err());
        split.fill_top(&top(0..200), 1, &rope).unwrap();
        assert_eq!((split.len(), split.partial_len()), (200, 100));
        split.fill_top(&top(200..300), 1, &rope).unwrap();
        assert_eq!(
            (split.len(), split.partial_len(), split.partial_layers()),
            (300, 0, 0)
        );
        assert_same_layers(&whole, &split);
        assert!(
            split.fill_top(&top(0..10), 1, &rope).is_err(),
            "nothing left to fill"
        );
    }
}
