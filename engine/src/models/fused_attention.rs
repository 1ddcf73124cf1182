//! Fused attention on the CPU (flash-attention style): tiles of queries against tiles of
//! keys with an online softmax, so the score matrix never exists beyond one tile and every
//! mask is applied inside the tile loop.
//!
//! One task is one KV head and one tile of query tokens: the query heads sharing that KV
//! head are rows of the same tile, so each key and value is read once for all of them. A
//! tile of keys is transposed once per task and key tile, so a query row's scores over the
//! tile are fused multiply-adds across the keys (16 keys a register with AVX-512), with no
//! horizontal sums. Scores, running maxima, sums and outputs are f32.
//!
//! The result is the function of [`super::transformer`]'s blocked tensor path, softmax of the
//! scaled, masked, corrected scores times the values, up to f32 rounding: sums run in
//! another order, and the exponential is a polynomial accurate to about one ulp
//! ([`exp_nonpositive`]).

use rayon::prelude::*;

use crate::correction::LayerCorrection;

/// Query tokens a task takes: with the query heads of one KV head, the rows of a tile.
const QUERY_TILE: usize = 32;
/// Keys a tile holds: transposed once per task and tile, reused by every row.
const KEY_TILE: usize = 64;

/// One layer's keys or values as `[n_kv_heads, …, head_dim]` rows: KV head `h`'s row `j` at
/// `data[h · head_stride + j · head_dim ..]`, `j` counted from the first cache index given.
#[derive(Clone, Copy)]
pub(crate) struct KvHeads<'a> {
    /// The rows.
    pub data: &'a [f32],
    /// Floats from one KV head's first row to the next head's.
    pub head_stride: usize,
}

/// What a fused attention pass computes.
#[derive(Clone, Copy)]
pub(crate) struct FusedAttention<'a> {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads; query head `h` reads KV head `h / (n_heads / n_kv_heads)`.
    pub n_kv_heads: usize,
    /// Floats per head.
    pub head_dim: usize,
    /// Multiplies `q·k`.
    pub scale: f32,
    /// The cache index of each query token: it sees the keys up to and including its own.
    pub rows: &'a [usize],
    /// With a window, only the last `window` keys it sees.
    pub window: Option<usize>,
    /// The score correction over loaded chunk keys (see `crate::correction`).
    pub correction: Option<LayerCorrection<'a>>,
}

impl FusedAttention<'_> {
    /// Attention of `q` (`[t, n_heads, head_dim]`, tokens at `self.rows`) over `keys` and
    /// `values` (cache indices from 0); returns `[t, n_heads · head_dim]`.
    pub(crate) fn run(&self, q: &[f32], keys: KvHeads<'_>, values: KvHeads<'_>) -> Vec<f32> {
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let t = self.rows.len();
        debug_assert_eq!(q.len(), t * nh * hd);
        let tiles = t.div_ceil(QUERY_TILE);
        let tasks: Vec<(usize, usize)> = (0..nkv)
            .flat_map(|kv| (0..tiles).map(move |tile| (kv, tile)))
            .collect();
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(kv, tile)| {
                let tokens = tile * QUERY_TILE..((tile + 1) * QUERY_TILE).min(t);
                self.task(q, keys, values, kv, tokens)
            })
            .collect();
        // Scatter: a task's rows are its tokens' query heads of one KV head.
        let group = nh / nkv;
        let mut out = vec![0f32; t * nh * hd];
        for (&(kv, tile), result) in tasks.iter().zip(&results) {
            let first = tile * QUERY_TILE;
            for (i, heads) in result.chunks_exact(group * hd).enumerate() {
                let at = ((first + i) * nh + kv * group) * hd;
                out[at..at + group * hd].copy_from_slice(heads);
            }
        }
        out
    }

    /// One KV head's query heads for the query tokens `tokens`: `[tokens, group, head_dim]`.
    fn task(
        &self,
        q: &[f32],
        keys: KvHeads<'_>,
        values: KvHeads<'_>,
        kv: usize,
        tokens: std::ops::Range<usize>,
    ) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if super::row_ops::has_avx512() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { self.task_avx512(q, keys, values, kv, tokens) };
        }
        self.task_portable(q, keys, values, kv, tokens)
    }

    /// [`FusedAttention::task`] compiled for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn task_avx512(
        &self,
        q: &[f32],
        keys: KvHeads<'_>,
        values: KvHeads<'_>,
        kv: usize,
        tokens: std::ops::Range<usize>,
    ) -> Vec<f32> {
        self.task_portable(q, keys, values, kv, tokens)
    }

    /// [`FusedAttention::task`]'s arithmetic, for whatever target it is inlined into.
    #[inline(always)]
    fn task_portable(
        &self,
        q: &[f32],
        keys: KvHeads<'_>,
        values: KvHeads<'_>,
        kv: usize,
        tokens: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let (nh, hd) = (self.n_heads, self.head_dim);
        let group = nh / self.n_kv_heads;
        let n_rows = tokens.len() * group;
        // The tile's query rows, scaled: row `i·group + g` is token `i`'s head `g`.
        let mut queries = Vec::with_capacity(n_rows * hd);
        for token in tokens.clone() {
            let at = (token * nh + kv * group) * hd;
            queries.extend(q[at..at + group * hd].iter().map(|v| v * self.scale));
        }
        let rows = &self.rows[tokens.clone()];
        let first_seen = |row: usize| self.window.map_or(0, |w| (row + 1).saturating_sub(w));
        let span_start = rows.iter().map(|&r| first_seen(r)).min().unwrap_or(0);
        let span_end = rows.iter().map(|&r| r + 1).max().unwrap_or(0);
        let mut acc = vec![0f32; n_rows * hd];
        let mut max = vec![f32::NEG_INFINITY; n_rows];
        let mut sum = vec![0f32; n_rows];
        let mut transposed = vec![0f32; hd * KEY_TILE];
        let mut group_scores = vec![[0f32; KEY_TILE]; group];
        let key_base = kv * keys.head_stride;
        let value_base = kv * values.head_stride;
        let mut start = span_start;
        while start < span_end {
            let len = KEY_TILE.min(span_end - start);
            // Keys `start..start + len` as `[hd, KEY_TILE]` (columns past `len` stay
            // whatever they were: their scores are masked).
            for j in 0..len {
                let key = &keys.data[key_base + (start + j) * hd..][..hd];
                for (d, &k) in key.iter().enumerate() {
                    transposed[d * KEY_TILE + j] = k;
                }
            }
            for (i, &row) in rows.iter().enumerate() {
                // The keys this token sees within the tile.
                let lo = first_seen(row).max(start);
                let hi = (row + 1).min(start + len);
                if lo >= hi {
                    continue;
                }
                let corrected = self.correction.filter(|c| c.applies_to(row));
                // The token's query heads in pairs: each key vector loaded serves two rows.
                let query = |g: usize| &queries[(i * group + g) * hd..][..hd];
                let mut g = 0;
                while g + 1 < group {
                    let (first, second) = group_scores.split_at_mut(g + 1);
                    tile_scores_pair(
                        [query(g), query(g + 1)],
                        &transposed,
                        [&mut first[g], &mut second[0]],
                    );
                    g += 2;
                }
                if g < group {
                    tile_scores(query(g), &transposed, &mut group_scores[g]);
                }
                for (g, scores) in group_scores.iter_mut().enumerate() {
                    let r = i * group + g;
                    if let Some(c) = &corrected {
                        for (j, s) in scores.iter_mut().enumerate() {
                            if c.corrects(start + j) {
                                *s = *s * c.factor + c.offset;
                            }
                        }
                    }
                    let tile_max = masked_max(scores, lo - start, hi - start);
                    let new_max = if max[r] > tile_max { max[r] } else { tile_max };
                    let out = &mut acc[r * hd..(r + 1) * hd];
                    if max[r] != new_max {
                        let rescale = exp_nonpositive(max[r] - new_max);
                        sum[r] *= rescale;
                        out.iter_mut().for_each(|o| *o *= rescale);
                        max[r] = new_max;
                    }
                    sum[r] += exp_and_sum(scores, new_max);
                    let weights = &scores[lo - start..hi - start];
                    let rows = &values.data[value_base + lo * hd..][..weights.len() * hd];
                    match hd {
                        64 => add_weighted::<64>(weights, rows, out),
                        128 => add_weighted::<128>(weights, rows, out),
                        256 => add_weighted::<256>(weights, rows, out),
                        _ => {
                            for (&p, value) in weights.iter().zip(rows.chunks_exact(hd)) {
                                out.iter_mut().zip(value).for_each(|(o, v)| *o += p * v);
                            }
                        }
                    }
                }
            }
            start += len;
        }
        for (out, total) in acc.chunks_exact_mut(hd).zip(&sum) {
            let inverse = 1.0 / total;
            out.iter_mut().for_each(|o| *o *= inverse);
        }
        acc
    }
}

/// `scores[j] = Σ_d query[d] · transposed[d][j]` for the `KEY_TILE` keys of a tile: a
/// broadcast of each query float against a row of keys.
#[inline(always)]
fn tile_scores(query: &[f32], transposed: &[f32], scores: &mut [f32; KEY_TILE]) {
    // Summed in a local array, so the tile's scores stay in registers across the loop.
    let mut sums = [0f32; KEY_TILE];
    for (&qd, keys) in query.iter().zip(transposed.chunks_exact(KEY_TILE)) {
        for (s, &k) in sums.iter_mut().zip(keys) {
            *s += qd * k;
        }
    }
    *scores = sums;
}

/// `out += Σ_j weights[j] · rows[j]` over rows of `D` values: the sums held in registers
/// for the whole tile (a width known at compile time), `out` read and written once.
#[inline(always)]
fn add_weighted<const D: usize>(weights: &[f32], rows: &[f32], out: &mut [f32]) {
    let mut sums: [f32; D] = out.try_into().expect("a row of D values");
    for (&p, row) in weights.iter().zip(rows.chunks_exact(D)) {
        for (s, &v) in sums.iter_mut().zip(row) {
            *s += p * v;
        }
    }
    out.copy_from_slice(&sums);
}

/// Lanes of the reductions over a tile: partial results side by side, so the loops
/// vectorise (a single running maximum or sum would chain every key on the one before).
const LANES: usize = 16;

/// Sets the scores outside `lo..hi` to `-∞` and returns the largest of the others.
#[inline(always)]
fn masked_max(scores: &mut [f32; KEY_TILE], lo: usize, hi: usize) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for (c, chunk) in scores.chunks_exact_mut(LANES).enumerate() {
        for (l, (s, m)) in chunk.iter_mut().zip(lanes.iter_mut()).enumerate() {
            let j = c * LANES + l;
            let v = if j >= lo && j < hi {
                *s
            } else {
                f32::NEG_INFINITY
            };
            *s = v;
            *m = if v > *m { v } else { *m };
        }
    }
    lanes
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// Replaces every score by `e^(score - max)` and returns their sum.
#[inline(always)]
fn exp_and_sum(scores: &mut [f32; KEY_TILE], max: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    for chunk in scores.chunks_exact_mut(LANES) {
        for (s, t) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *s = exp_nonpositive(*s - max);
            *t += *s;
        }
    }
    lanes.iter().sum()
}

/// [`tile_scores`] of two query rows at once: each key vector loaded once for both.
#[inline(always)]
fn tile_scores_pair(queries: [&[f32]; 2], transposed: &[f32], scores: [&mut [f32; KEY_TILE]; 2]) {
    let mut first = [0f32; KEY_TILE];
    let mut second = [0f32; KEY_TILE];
    for ((&a, &b), keys) in queries[0]
        .iter()
        .zip(queries[1])
        .zip(transposed.chunks_exact(KEY_TILE))
    {
        for ((s, t), &k) in first.iter_mut().zip(second.iter_mut()).zip(keys) {
            *s += a * k;
            *t += b * k;
        }
    }
    let [s0, s1] = scores;
    *s0 = first;
    *s1 = second;
}

/// `e^x` for `x ≤ 0` (and `-∞`, which gives 0) without a branch or a library call, so a loop
/// of them vectorises: `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, `e^r` by Cephes' degree-6
/// polynomial, `2^n` written into the exponent bits. Relative error about 1e-7; below
/// `e^-87` (under f32's smallest normal) it returns 0.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let tiny = x < -87.0;
    let x = x.max(-87.0);
    let n = (x * LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if tiny { 0.0 } else { er * scale }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain attention in f64, row by row: softmax of the scaled, masked, corrected scores.
    fn reference(
        attention: &FusedAttention<'_>,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        capacity: usize,
    ) -> Vec<f32> {
        let (nh, nkv, hd) = (attention.n_heads, attention.n_kv_heads, attention.head_dim);
        let group = nh / nkv;
        let mut out = vec![0f32; attention.rows.len() * nh * hd];
        for (i, &row) in attention.rows.iter().enumerate() {
            let first = attention.window.map_or(0, |w| (row + 1).saturating_sub(w));
            for h in 0..nh {
                let kv = h / group;
                let query = &q[(i * nh + h) * hd..][..hd];
                let scores: Vec<f64> = (first..=row)
                    .map(|key| {
                        let k = &keys[(kv * capacity + key) * hd..][..hd];
                        let mut s: f64 = query
                            .iter()
                            .zip(k)
                            .map(|(a, b)| f64::from(*a) * f64::from(*b))
                            .sum::<f64>()
                            * f64::from(attention.scale);
                        if let Some(c) = &attention.correction
                            && c.applies_to(row)
                            && c.corrects(key)
                        {
                            s = s * f64::from(c.factor) + f64::from(c.offset);
                        }
                        s
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..hd {
                    let v: f64 = (first..=row)
                        .zip(&weights)
                        .map(|(key, w)| w * f64::from(values[(kv * capacity + key) * hd + d]))
                        .sum();
                    out[(i * nh + h) * hd + d] = (v / total) as f32;
                }
            }
        }
        out
    }

    /// Pseudo-random floats in [-2, 2): scores spread enough that the softmax is not flat.
    fn fill(n: usize, seed: u32) -> Vec<f32> {
        crate::test_util::pseudo_random(n, seed)
            .into_iter()
            .map(|v| v * 2.0)
            .collect()
    }

    #[test]
    fn the_exponential_is_the_library_one_to_a_few_ulps() {
        let mut x = 0f32;
        while x > -90.0 {
            let (got, want) = (exp_nonpositive(x), x.exp());
            if want > 1e-37 {
                assert!(
                    ((got - want) / want).abs() < 4e-7,
                    "e^{x}: {got} against {want}"
                );
            }
            x -= 0.0137;
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn fused_attention_is_plain_softmax_attention_for_every_mask_and_grouping() {
        let keys_flags: Vec<bool> = (0..300).map(|k| (40..120).contains(&k)).collect();
        let consecutive: Vec<usize> = (0..150).collect();
        let scattered: Vec<usize> = vec![3, 7, 8, 60, 61, 62, 130, 199, 200, 233];
        // Query heads, KV heads, head width, the queries' cache indices, window, corrected.
        type Case = (usize, usize, usize, Vec<usize>, Option<usize>, bool);
        let cases: Vec<Case> = vec![
            (9, 3, 64, consecutive.clone(), None, false),
            (
                9,
                3,
                64,
                consecutive.iter().map(|r| r + 100).collect(),
                Some(70),
                false,
            ),
            (4, 1, 256, scattered.clone(), None, true),
            (8, 8, 128, scattered.clone(), Some(33), true),
            (4, 2, 64, vec![250], None, true),
            (6, 2, 48, (90..160).collect(), None, true),
        ];
        for (nh, nkv, hd, rows, window, corrected) in cases {
            let capacity = 300;
            let q = fill(rows.len() * nh * hd, 1);
            let keys = fill(nkv * capacity * hd, 2);
            let values = fill(nkv * capacity * hd, 3);
            let correction = corrected.then_some(LayerCorrection {
                factor: 1.3,
                offset: -0.7,
                queries_from: 130,
                keys: &keys_flags,
            });
            let attention = FusedAttention {
                n_heads: nh,
                n_kv_heads: nkv,
                head_dim: hd,
                scale: 1.0 / (hd as f32).sqrt(),
                rows: &rows,
                window,
                correction,
            };
            let heads = |data| KvHeads {
                data,
                head_stride: capacity * hd,
            };
            let got = attention.run(&q, heads(&keys), heads(&values));
            // The portable body (what a CPU without AVX-512 runs) gives the same numbers.
            let tokens = 0..rows.len().min(QUERY_TILE);
            let portable =
                attention.task_portable(&q, heads(&keys), heads(&values), 0, tokens.clone());
            let dispatched = attention.task(&q, heads(&keys), heads(&values), 0, tokens);
            assert_eq!(portable, dispatched, "{nh} heads over {nkv}, hd {hd}");
            let want = reference(&attention, &q, &keys, &values, capacity);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 2e-5,
                "{nh} heads over {nkv}, hd {hd}, window {window:?}: off by {worst}"
            );
        }
    }
}
