//! Rotary position embeddings: the two pairings GGUF files use, and the tables of every
//! layer of a model (layers may rotate with different bases, as Gemma 3's local and global
//! layers do).

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// Which elements of a head rotate together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Adjacent pairs `(x[2i], x[2i+1])`: llama files, whose converter permuted the query
    /// and key weights for it (llama.cpp's "norm" rope).
    Interleaved,
    /// The two halves `(x[i], x[i + d/2])`: Qwen, Gemma, Phi-3 (llama.cpp's "neox" rope).
    Halves,
}

/// Precomputed rotation tables for positions `0..max_positions`.
#[derive(Debug, Clone)]
pub struct Rope {
    /// Angular frequency of each rotated pair, already divided by any scaling factors.
    inv_freq: Vec<f64>,
    cos: Tensor,
    sin: Tensor,
    dtype: DType,
    style: RopeStyle,
}

impl Rope {
    /// A plain interleaved table in f32 on the CPU (θ 10,000, no scaling), for tests.
    #[cfg(test)]
    pub(crate) fn plain_f32(head_dim: usize, max_positions: usize) -> Self {
        Self::new(
            RopeStyle::Interleaved,
            head_dim,
            10_000.0,
            None,
            1.0,
            max_positions,
            DType::F32,
            &Device::Cpu,
        )
        .expect("a valid table")
    }

    /// Builds tables for `head_dim`-wide heads with base `theta`, optional per-pair frequency
    /// factors (llama 3 style `rope_freqs`) and a linear position scale (positions are divided
    /// by `linear_scale`), pairing elements by `style`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        theta: f64,
        freq_factors: Option<&[f32]>,
        linear_scale: f64,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let base = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let factor = freq_factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0) as f64;
                base / factor / linear_scale
            })
            .collect();
        let (cos, sin) = Self::angles(&inv_freq, (0..max_positions).map(|p| p as f64));
        let shape = (max_positions, half);
        Ok(Self {
            cos: Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?,
            inv_freq,
            dtype,
            style,
        })
    }

    /// How this rope pairs a head's elements.
    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// cos and sin of `position × inv_freq` for each position, row-major, computed in f64.
    fn angles(inv_freq: &[f64], positions: impl Iterator<Item = f64>) -> (Vec<f32>, Vec<f32>) {
        let mut cos = Vec::new();
        let mut sin = Vec::new();
        for p in positions {
            for f in inv_freq {
                let (s, c) = (p * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        (cos, sin)
    }

    /// cos and sin of one position's angles, one per rotated pair: the values of the
    /// tables' row for `position` (f32), for code that rotates plain rows.
    pub fn angles_at(&self, position: usize) -> (Vec<f32>, Vec<f32>) {
        Self::angles(&self.inv_freq, std::iter::once(position as f64))
    }

    /// Number of positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dim(0).unwrap_or(0)
    }

    /// Rotates `xs` of shape `[tokens, heads, head_dim]`; token `i` is at position `start + i`.
    pub fn apply(&self, xs: &Tensor, start: usize) -> Result<Tensor> {
        let tokens = xs.dim(0)?;
        let cos = self.cos.narrow(0, start, tokens)?;
        let sin = self.sin.narrow(0, start, tokens)?;
        self.rotate(xs, &cos, &sin)
    }

    /// Rotates `xs` of shape `[tokens, heads, head_dim]`; token `i` is at `positions[i]`
    /// (the scattered tokens a selective recomputation runs).
    pub fn apply_at(&self, xs: &Tensor, positions: &[u32]) -> Result<Tensor> {
        let index = Tensor::new(positions, self.cos.device())?;
        let cos = self.cos.index_select(&index, 0)?;
        let sin = self.sin.index_select(&index, 0)?;
        self.rotate(xs, &cos, &sin)
    }

    /// Rotates each token of `xs` (`[tokens, heads, head_dim]`) by its row of `cos`/`sin`.
    fn rotate(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (tokens, heads, head_dim) = xs.dims3()?;
        let cos = cos.unsqueeze(1)?;
        let sin = sin.unsqueeze(1)?;
        // Viewed as (batch = tokens, heads, 1, head_dim) so every token gets its own row.
        let xs = xs.contiguous()?.reshape((tokens, heads, 1, head_dim))?;
        let out = self.rotate_bhtd(&xs, &cos, &sin)?;
        Ok(out.reshape((tokens, heads, head_dim))?)
    }

    /// Rotates `xs` (`[batch, heads, tokens, head_dim]`, contiguous) by the rows of
    /// `cos`/`sin` (`[tokens, head_dim / 2]`), pairing elements by the rope's style.
    fn rotate_bhtd(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(xs, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(xs, cos, sin)?,
        })
    }

    /// Moves keys of shape `[heads, tokens, head_dim]` by `delta` positions: a key rotated for
    /// position `p` becomes the key for position `p + delta` (R(p + d) = R(d)·R(p)).
    pub fn shift(&self, keys: &Tensor, delta: i64) -> Result<Tensor> {
        if delta == 0 {
            return Ok(keys.clone());
        }
        let (heads, tokens, head_dim) = keys.dims3()?;
        let (cos, sin) = Self::angles(&self.inv_freq, std::iter::once(delta as f64));
        let device = keys.device();
        let half = head_dim / 2;
        let cos = Tensor::from_vec(cos, (1, half), device)?
            .to_dtype(self.dtype)?
            .broadcast_as((tokens, half))?
            .contiguous()?;
        let sin = Tensor::from_vec(sin, (1, half), device)?
            .to_dtype(self.dtype)?
            .broadcast_as((tokens, half))?
            .contiguous()?;
        let keys = keys
            .to_dtype(self.dtype)?
            .contiguous()?
            .reshape((1, heads, tokens, head_dim))?;
        let out = self.rotate_bhtd(&keys, &cos, &sin)?;
        Ok(out.reshape((heads, tokens, head_dim))?)
    }
}

/// The rotary tables of every layer of a model: one table per distinct base and scale, and
/// which one each layer rotates with.
#[derive(Debug, Clone)]
pub struct LayerRopes {
    tables: Vec<Rope>,
    /// Index into `tables` of each layer's table.
    of_layer: Vec<usize>,
}

impl LayerRopes {
    /// `tables`, layer `i` rotating with `tables[of_layer[i]]`.
    pub fn new(tables: Vec<Rope>, of_layer: Vec<usize>) -> Result<Self> {
        if let Some(&bad) = of_layer.iter().find(|&&t| t >= tables.len()) {
            return Err(EngineError::KvMismatch(format!(
                "a layer names rotary table {bad} of {}",
                tables.len()
            )));
        }
        Ok(Self { tables, of_layer })
    }

    /// Every layer rotating with the same table.
    pub fn uniform(rope: Rope, layers: usize) -> Self {
        Self {
            tables: vec![rope],
            of_layer: vec![0; layers],
        }
    }

    /// Layer `layer`'s table.
    pub fn layer(&self, layer: usize) -> Result<&Rope> {
        Ok(&self.tables[self.table_of(layer)?])
    }

    /// The index in [`LayerRopes::tables`] of layer `layer`'s table.
    pub fn table_of(&self, layer: usize) -> Result<usize> {
        self.of_layer.get(layer).copied().ok_or_else(|| {
            EngineError::KvMismatch(format!(
                "no rotary table for layer {layer} of {}",
                self.of_layer.len()
            ))
        })
    }

    /// The distinct tables.
    pub fn tables(&self) -> &[Rope] {
        &self.tables
    }

    /// Layers covered.
    pub fn len(&self) -> usize {
        self.of_layer.len()
    }

    /// Whether no layer is covered.
    pub fn is_empty(&self) -> bool {
        self.of_layer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::max_abs_diff as max_diff;

    #[test]
    fn shifting_composes_with_rotation() {
        let rope = Rope::plain_f32(8, 512);
        let x = Tensor::randn(0f32, 1.0, (5, 2, 8), &Device::Cpu).unwrap();
        // Rotate for positions 10.. then shift by +300: same as rotating for 310...
        let at_10 = rope.apply(&x, 10).unwrap().transpose(0, 1).unwrap();
        let shifted = rope.shift(&at_10, 300).unwrap();
        let at_310 = rope.apply(&x, 310).unwrap().transpose(0, 1).unwrap();
        assert!(max_diff(&shifted, &at_310) < 1e-4);
        // ...and a negative shift goes back.
        let back = rope.shift(&shifted, -300).unwrap();
        assert!(max_diff(&back, &at_10) < 1e-4);
        assert!(max_diff(&at_10, &at_310) > 0.1);
    }

    #[test]
    fn scattered_positions_rotate_like_contiguous_ones() {
        let rope = Rope::plain_f32(8, 64);
        let x = Tensor::randn(0f32, 1.0, (4, 2, 8), &Device::Cpu).unwrap();
        let contiguous = rope.apply(&x, 20).unwrap();
        let listed = rope.apply_at(&x, &[20, 21, 22, 23]).unwrap();
        assert_eq!(max_diff(&contiguous, &listed), 0.0);
        let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
        let scattered = rope.apply_at(&x, &[3, 40, 7, 63]).unwrap();
        let one = rope.apply(&row(&x, 1), 40).unwrap();
        assert_eq!(max_diff(&row(&scattered, 1), &one), 0.0);
    }

    #[test]
    fn position_zero_is_the_identity() {
        let rope = Rope::plain_f32(8, 16);
        let x = Tensor::randn(0f32, 1.0, (1, 3, 8), &Device::Cpu).unwrap();
        assert!(max_diff(&rope.apply(&x, 0).unwrap(), &x) < 1e-6);
    }
}
