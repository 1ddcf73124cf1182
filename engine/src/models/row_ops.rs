//! A transformer block's small operations on plain f32 rows, for decode steps.
//!
//! A decode step pushes one row per sequence through every layer: each operation touches a
//! few thousand floats, so the fixed cost of a tensor operation (shape checks, allocation,
//! dispatch to threads) outweighs its arithmetic many times over. These functions do the
//! same arithmetic as the tensor path on slices; only float summation order differs.

use std::ops::Range;

use super::Activation;
use crate::correction::LayerCorrection;
use crate::rope::RopeStyle;

/// `out[r] = x[r] / sqrt(mean(x[r]²) + eps) · weight` for every row of `x`.
pub(crate) fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let width = weight.len();
    for (row, dst) in x.chunks_exact(width).zip(out.chunks_exact_mut(width)) {
        let inverse = inverse_rms(row, eps);
        for ((d, v), w) in dst.iter_mut().zip(row).zip(weight) {
            *d = v * inverse * w;
        }
    }
}

/// [`rms_norm_rows`] of `x` onto itself: every `weight.len()`-wide row (a head, for the
/// per-head query and key norms) normalised in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let inverse = inverse_rms(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inverse * w;
        }
    }
}

/// `1 / sqrt(mean(row²) + eps)`.
fn inverse_rms(row: &[f32], eps: f32) -> f32 {
    let mean = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean + eps).sqrt()
}

/// Rotates every `head_dim`-wide head in `heads` by the angles of one position: pair `i`
/// turns by the angle whose cosine is `cos[i]`; the pairs are `(x[2i], x[2i+1])`
/// (interleaved) or `(x[i], x[i + head_dim/2])` (halves).
pub(crate) fn rope_heads(
    heads: &mut [f32],
    head_dim: usize,
    style: RopeStyle,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for head in heads.chunks_exact_mut(head_dim) {
        for (i, (c, s)) in cos.iter().zip(sin).enumerate() {
            let (ia, ib) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (a, b) = (head[ia], head[ib]);
            head[ia] = a * c - b * s;
            head[ib] = a * s + b * c;
        }
    }
}

/// The layout of one layer of a KV cache buffer: `[n_kv_heads, capacity, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KvLayout {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
}

/// How a query's attention scores are formed: `q·k` times `scale`, then, where a
/// correction is given, corrected over the loaded chunk keys (see `crate::correction`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ScoreRule<'a> {
    pub scale: f32,
    pub correction: Option<LayerCorrection<'a>>,
}

#[cfg(test)]
impl ScoreRule<'_> {
    /// Plain scaled scores.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            correction: None,
        }
    }
}

/// Attention of one token's queries `q` (`[n_heads·head_dim]`) over the keys and values at
/// the cache indices `seen` of one layer's buffers (all before it, or its sliding window);
/// writes `[n_heads·head_dim]` into `out`. Query head `h` reads KV head
/// `h / (n_heads / n_kv_heads)`.
///
/// On a CPU with AVX-512 the same code is compiled for its 16-lane registers (the default
/// target has 4-lane SSE2); the sums run in the same order, so the result is the same.
pub(crate) fn attend_one(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: KvLayout,
    seen: Range<usize>,
    scores: ScoreRule<'_>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512() {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { attend_one_avx512(q, keys, values, layout, seen, scores, out) };
    }
    attend_one_portable(q, keys, values, layout, seen, scores, out);
}

/// Whether the CPU runs AVX-512 code (checked once; the fused prefill attention asks too).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::is_x86_feature_detected!("avx512f"))
}

/// [`attend_one`] compiled for AVX-512.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn attend_one_avx512(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: KvLayout,
    seen: Range<usize>,
    scores: ScoreRule<'_>,
    out: &mut [f32],
) {
    attend_one_portable(q, keys, values, layout, seen, scores, out);
}

/// [`attend_one`]'s arithmetic, for whatever target it is inlined into.
#[inline(always)]
fn attend_one_portable(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    layout: KvLayout,
    seen: Range<usize>,
    scores: ScoreRule<'_>,
    out: &mut [f32],
) {
    let KvLayout {
        n_heads,
        n_kv_heads,
        head_dim,
        capacity,
    } = layout;
    let ScoreRule { scale, correction } = scores;
    let group = n_heads / n_kv_heads;
    let (first, len) = (seen.start, seen.end - seen.start);
    // The query heads of one KV head are handled together, so each key and value is read
    // once for all of them.
    let mut scores = vec![0f32; group * len];
    for kv in 0..n_kv_heads {
        let base = (kv * capacity + first) * head_dim;
        let queries = &q[kv * group * head_dim..(kv + 1) * group * head_dim];
        for t in 0..len {
            let key = &keys[base + t * head_dim..base + (t + 1) * head_dim];
            for (g, query) in queries.chunks_exact(head_dim).enumerate() {
                scores[g * len + t] = dot(query, key) * scale;
            }
        }
        // A decoded token comes after every chunk: its scores over loaded chunk keys are
        // corrected (see `crate::correction`).
        if let Some(c) = &correction {
            for t in (0..len).filter(|&t| c.corrects(first + t)) {
                for g in 0..group {
                    let score = &mut scores[g * len + t];
                    *score = *score * c.factor + c.offset;
                }
            }
        }
        let mut totals = vec![0f32; group];
        for (row, total) in scores.chunks_exact_mut(len).zip(totals.iter_mut()) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for score in row.iter_mut() {
                *score = (*score - max).exp();
                *total += *score;
            }
        }
        let heads = &mut out[kv * group * head_dim..(kv + 1) * group * head_dim];
        let values = &values[base..base + len * head_dim];
        for (weights, dst) in scores
            .chunks_exact(len)
            .zip(heads.chunks_exact_mut(head_dim))
        {
            match head_dim {
                64 => weighted_sum::<64>(weights, values, dst),
                128 => weighted_sum::<128>(weights, values, dst),
                256 => weighted_sum::<256>(weights, values, dst),
                _ => {
                    dst.fill(0.0);
                    for (p, value) in weights.iter().zip(values.chunks_exact(head_dim)) {
                        for (d, v) in dst.iter_mut().zip(value) {
                            *d += p * v;
                        }
                    }
                }
            }
        }
        for (dst, total) in heads.chunks_exact_mut(head_dim).zip(&totals) {
            let inverse = 1.0 / total;
            for d in dst.iter_mut() {
                *d *= inverse;
            }
        }
    }
}

/// `out = Σ_t weights[t] · values[t]` over rows of `D` values, summed in `t` order. The
/// width is a constant so the sums stay in registers for the whole pass.
#[inline(always)]
fn weighted_sum<const D: usize>(weights: &[f32], values: &[f32], out: &mut [f32]) {
    let mut sums = [0f32; D];
    for (p, value) in weights.iter().zip(values.chunks_exact(D)) {
        for (sum, v) in sums.iter_mut().zip(value) {
            *sum += p * v;
        }
    }
    out.copy_from_slice(&sums);
}

/// `Σ a[i]·b[i]` in eight partial sums, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 8];
    let (a_chunks, b_chunks) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..8 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// The gated feed-forward activation `act(gate) · up` of rows laid out `[gate | up]`, each
/// half `width` wide; returns `[rows, width]`.
pub(crate) fn gated_rows(gate_up: &[f32], width: usize, activation: Activation) -> Vec<f32> {
    let mut out = vec![0f32; gate_up.len() / 2];
    gated_rows_into(gate_up, width, activation, &mut out);
    out
}

/// [`gated_rows`] written into `out` (`[rows, width]`).
fn gated_rows_into(gate_up: &[f32], width: usize, activation: Activation, out: &mut [f32]) {
    for (row, dst) in gate_up
        .chunks_exact(2 * width)
        .zip(out.chunks_exact_mut(width))
    {
        let (gate, up) = row.split_at(width);
        let pairs = dst.iter_mut().zip(gate.iter().zip(up));
        match activation {
            Activation::Silu => pairs.for_each(|(d, (g, u))| *d = g / (1.0 + (-g).exp()) * u),
            Activation::GeluTanh => pairs.for_each(|(d, (g, u))| *d = gelu_tanh(*g) * u),
        }
    }
}

/// [`gated_rows`] with the rows shared among the threads: the prefill path's activation,
/// one pass over `gate_up` instead of one per tensor operation.
pub(crate) fn gated_rows_parallel(
    gate_up: &[f32],
    width: usize,
    activation: Activation,
) -> Vec<f32> {
    use rayon::prelude::*;
    let rows = gate_up.len() / (2 * width);
    // Rows per task: enough work to outweigh handing it to another thread.
    let per_task = (16_384 / width).max(1);
    let mut out = vec![0f32; rows * width];
    out.par_chunks_mut(per_task * width)
        .zip(gate_up.par_chunks(per_task * 2 * width))
        .for_each(|(dst, src)| gated_rows_into(src, width, activation, dst));
    out
}

/// GELU with the tanh approximation, `x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))`, written
/// as the identical `x · σ(2·√(2/π)·(x + 0.044715·x³))`: one exponential instead of a
/// tanh, which is several times slower in the C library.
fn gelu_tanh(x: f32) -> f32 {
    const TWO_SQRT_TWO_OVER_PI: f32 = 1.595_769;
    let z = TWO_SQRT_TWO_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + (-z).exp())
}

/// `x += y`, element by element.
pub(crate) fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_over_one_key_returns_its_value() {
        let layout = KvLayout {
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 2,
            capacity: 4,
        };
        let keys = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let values = [3.0, -1.0, 9.0, 9.0, 9.0, 9.0, 9.0, 9.0];
        let mut out = [0f32; 4];
        attend_one(
            &[0.5, 0.5, -2.0, 1.0],
            &keys,
            &values,
            layout,
            0..1,
            ScoreRule::scaled(1.0),
            &mut out,
        );
        assert_eq!(out, [3.0, -1.0, 3.0, -1.0]);
    }

    /// One token's attention written apart from the code under test, scalar, in the order
    /// the module sums: per query head, each score `q·k` in eight partial sums (lane `i`
    /// takes elements `i, i+8, …`; lanes added 0 to 7, then the remainder's products in
    /// order) times the scale; `exp(score − max)` totalled in key order; the values
    /// weighted in key order, then multiplied by the total's reciprocal.
    fn reference_attention(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        layout: KvLayout,
        seen: Range<usize>,
        scale: f32,
    ) -> Vec<f32> {
        let d = layout.head_dim;
        let group = layout.n_heads / layout.n_kv_heads;
        let mut out = vec![0f32; layout.n_heads * d];
        for h in 0..layout.n_heads {
            let kv = h / group;
            let query = &q[h * d..(h + 1) * d];
            let at = |t: usize| (kv * layout.capacity + t) * d;
            let scores: Vec<f32> = seen
                .clone()
                .map(|t| {
                    let key = &keys[at(t)..at(t) + d];
                    let mut lanes = [0f32; 8];
                    let whole = d / 8 * 8;
                    for i in 0..whole {
                        lanes[i % 8] += query[i] * key[i];
                    }
                    let mut total = lanes[0];
                    for lane in &lanes[1..] {
                        total += lane;
                    }
                    let mut tail = -0.0f32;
                    for i in whole..d {
                        tail += query[i] * key[i];
                    }
                    (total + tail) * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
            let mut total = 0f32;
            for w in &weights {
                total += w;
            }
            for j in 0..d {
                let mut sum = 0f32;
                for (w, t) in weights.iter().zip(seen.clone()) {
                    sum += w * values[at(t) + j];
                }
                out[h * d + j] = sum * (1.0 / total);
            }
        }
        out
    }

    /// Deterministic values of both signs and varied magnitude.
    fn fill(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// Head widths with a fixed-width sum (64, 128) and one without (40, with a remainder
    /// in the dot product); grouped heads; a window that starts past index 0.
    fn attention_cases() -> Vec<(KvLayout, Range<usize>)> {
        [(9, 3, 64), (4, 1, 128), (6, 2, 40)]
            .into_iter()
            .map(|(n_heads, n_kv_heads, head_dim)| {
                let layout = KvLayout {
                    n_heads,
                    n_kv_heads,
                    head_dim,
                    capacity: 200,
                };
                (layout, 9..173)
            })
            .collect()
    }

    fn check_against_reference(
        attend: impl Fn(&[f32], &[f32], &[f32], KvLayout, Range<usize>, &mut [f32]),
    ) {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (layout, seen) in attention_cases() {
            let width = layout.n_heads * layout.head_dim;
            let kv_len = layout.n_kv_heads * layout.capacity * layout.head_dim;
            let (q, keys, values) = (fill(width, 1), fill(kv_len, 2), fill(kv_len, 3));
            let want = reference_attention(&q, &keys, &values, layout, seen.clone(), 0.125);
            let mut got = vec![0f32; width];
            attend(&q, &keys, &values, layout, seen.clone(), &mut got);
            assert_eq!(bits(&got), bits(&want), "{layout:?}");
        }
    }

    #[test]
    fn portable_attention_gives_the_bits_of_a_scalar_reference() {
        check_against_reference(|q, k, v, layout, seen, out| {
            attend_one_portable(q, k, v, layout, seen, ScoreRule::scaled(0.125), out)
        });
    }

    /// The name is printed as skipped on a CPU without AVX-512 (scripts/test.sh also says
    /// which SIMD tests this machine cannot run).
    #[test]
    fn attention_compiled_for_avx512_gives_the_bits_of_a_scalar_reference() {
        #[cfg(target_arch = "x86_64")]
        if has_avx512() {
            check_against_reference(|q, k, v, layout, seen, out| {
                // SAFETY: the CPU has the features the function is compiled for.
                unsafe { attend_one_avx512(q, k, v, layout, seen, ScoreRule::scaled(0.125), out) }
            });
            return;
        }
        eprintln!(
            "SKIPPED attention_compiled_for_avx512_gives_the_bits_of_a_scalar_reference: this CPU has no AVX-512"
        );
    }

    #[test]
    fn gelu_through_the_sigmoid_is_the_tanh_formula() {
        for i in -400..=400 {
            let x = i as f32 / 40.0;
            let tanh_form = 0.5 * x * (1.0 + (0.797_884_6 * (x + 0.044_715 * x * x * x)).tanh());
            assert!(
                (gelu_tanh(x) - tanh_form).abs() <= 1e-6 * (1.0 + x.abs()),
                "{x}"
            );
        }
        assert_eq!(gelu_tanh(-100.0), -0.0);
        assert_eq!(gelu_tanh(100.0), 100.0);
    }

    #[test]
    fn the_parallel_activation_is_the_row_by_row_one() {
        let gate_up: Vec<f32> = (0..7 * 2 * 96)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        for activation in [Activation::Silu, Activation::GeluTanh] {
            assert_eq!(
                gated_rows_parallel(&gate_up, 96, activation),
                gated_rows(&gate_up, 96, activation)
            );
        }
    }

    #[test]
    fn rope_turns_each_pair_by_its_angle() {
        let mut heads = [1.0, 0.0, 0.0, 2.0];
        rope_heads(
            &mut heads,
            4,
            RopeStyle::Interleaved,
            &[0.0, 1.0],
            &[1.0, 0.0],
        );
        assert_eq!(heads, [0.0, 1.0, 0.0, 2.0]);
        // Halves pair x[0] with x[2]: the first pair turns a quarter, the second not at all.
        let mut heads = [1.0, 0.0, 0.0, 2.0];
        rope_heads(&mut heads, 4, RopeStyle::Halves, &[0.0, 1.0], &[1.0, 0.0]);
        assert_eq!(heads, [0.0, 0.0, 1.0, 2.0]);
    }
}
