//! Weight matrices in quantized blocks, laid out for the matrix products of decode steps.
//!
//! A decode step multiplies one row per sequence by every weight matrix of the model: it is
//! bound by how fast the weights stream from memory, not by arithmetic on large tiles.
//! [`QMatrix`] keeps the weights in blocks of 32 with their scales, in one of two formats:
//!
//! - **Q4_1 as stored in the GGUF** (4-bit unsigned quants, an f16 scale and minimum per
//!   block: `w = d·q + m`), taken over without any change, so decode multiplies by exactly
//!   the weights prefill dequantizes, reading 5 bits per weight;
//! - **8-bit** (one f32 scale per block, the Q8_0 rounding) for weights stored in any other
//!   type, at 10 bits per weight with the scale and offset.
//!
//! 16 output rows are interleaved four quants at a time, so one AVX-512 VNNI instruction
//! multiplies four activation bytes by sixteen rows' quants and accumulates into sixteen
//! lanes, one per output row: no horizontal sum is ever needed, and every weight byte is
//! read once for all the rows of a batch. Activations are quantized to 8 bits per block of
//! 32 (as llama.cpp quantizes them for its quantized products). VNNI multiplies unsigned by
//! signed bytes: 4-bit quants are unsigned already, and for 8-bit weights the activations
//! are offset by 128, whose contribution (128 times the block's quant sum, per row) is
//! stored and subtracted in the same fused step.
//!
//! Without AVX-512 VNNI the same arithmetic runs in portable code: the integer dot products
//! are exact and the float steps are the same fused multiply-adds in the same order, so both
//! paths give the same bits.

use half::f16;
use rayon::prelude::*;

/// Weights per block (one scale each).
const BLOCK: usize = 32;
/// Output rows per tile: one 32-bit lane of a 512-bit register each.
const TILE: usize = 16;
/// Consecutive weights of one row that one lane multiplies per instruction.
const GROUP: usize = 4;
/// Instructions per block.
const STEPS: usize = BLOCK / GROUP;
/// Activation rows processed together against one tile (keeps the accumulators in registers).
const ROWS_PER_PASS: usize = 8;
/// Products of at least this many multiply-adds are split between threads.
const PARALLEL_MACS: usize = 2 << 20;
/// Bytes of one Q4_1 block in a GGUF: f16 scale, f16 minimum, 16 bytes of nibbles.
const Q4_1_BYTES: usize = 20;

/// How a [`QMatrix`] stores its weights, tile-major: `[tile][block]…[row of tile]`.
enum Weights {
    /// 8-bit signed quants `[tile][block][step][row][GROUP]`, f32 scales, and the offset
    /// term `−128 · scale · Σ quants` per block and row.
    Q8 {
        quants: Vec<i8>,
        scales: Vec<f32>,
        offsets: Vec<f32>,
    },
    /// 4-bit unsigned quants `[tile][block][pair][row][GROUP]`: the low nibble of a byte is
    /// step `2·pair`'s, the high nibble step `2·pair + 1`'s; f16 scales and minimums.
    Q4 {
        nibbles: Vec<u8>,
        scales: Vec<f16>,
        mins: Vec<f16>,
    },
}

/// A `rows × cols` weight matrix in quantized blocks of 32, laid out for
/// [`QMatrix::matmul`]. Columns are padded to a multiple of 32 and rows to a multiple of 16
/// with zeros.
pub struct QMatrix {
    rows: usize,
    cols: usize,
    blocks: usize,
    tiles: usize,
    weights: Weights,
}

impl std::fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QMatrix({}×{}, {})", self.rows, self.cols, self.format())
    }
}

/// Rounds block `block` of `row` (zero-padded past the row's end) to signed bytes: returns
/// the scale (`max |v| / 127`).
fn quantize_row_block(row: &[f32], block: usize, out: &mut [i8; BLOCK]) -> f32 {
    let start = block * BLOCK;
    let end = (start + BLOCK).min(row.len());
    let mut values = [0f32; BLOCK];
    values[..end - start].copy_from_slice(&row[start..end]);
    let max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    let scale = max / 127.0;
    let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (q, v) in out.iter_mut().zip(&values) {
        *q = (v * inverse).round().clamp(-127.0, 127.0) as i8;
    }
    scale
}

impl QMatrix {
    /// Quantizes the row-major `rows × cols` matrix `w` to 8 bits per weight.
    ///
    /// # Panics
    /// When `w.len() != rows * cols`.
    pub fn quantize_q8(w: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(w.len(), rows * cols, "a {rows}×{cols} matrix");
        let blocks = cols.div_ceil(BLOCK);
        let tiles = rows.div_ceil(TILE);
        let mut quants = vec![0i8; tiles * blocks * BLOCK * TILE];
        let mut scales = vec![0f32; tiles * blocks * TILE];
        let mut offsets = vec![0f32; tiles * blocks * TILE];
        let mut q = [0i8; BLOCK];
        for row in 0..rows {
            let (tile, lane) = (row / TILE, row % TILE);
            for block in 0..blocks {
                let scale = quantize_row_block(&w[row * cols..(row + 1) * cols], block, &mut q);
                let at = (tile * blocks + block) * TILE + lane;
                scales[at] = scale;
                let sum: i32 = q.iter().map(|&v| i32::from(v)).sum();
                offsets[at] = -128.0 * scale * sum as f32;
                for step in 0..STEPS {
                    let dst = (((tile * blocks + block) * STEPS + step) * TILE + lane) * GROUP;
                    quants[dst..dst + GROUP].copy_from_slice(&q[step * GROUP..(step + 1) * GROUP]);
                }
            }
        }
        Self {
            rows,
            cols,
            blocks,
            tiles,
            weights: Weights::Q8 {
                quants,
                scales,
                offsets,
            },
        }
    }

    /// Takes over a GGUF tensor's Q4_1 blocks (`rows × cols`, row-major, `cols` a multiple
    /// of 32), so products use exactly the stored weights. `None` when `blocks` is not
    /// that many Q4_1 blocks.
    pub fn from_q4_1(blocks: &[u8], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || blocks.len() != rows * cols / BLOCK * Q4_1_BYTES {
            return None;
        }
        let per_row = cols / BLOCK;
        let tiles = rows.div_ceil(TILE);
        let mut nibbles = vec![0u8; tiles * per_row * BLOCK / 2 * TILE];
        let mut scales = vec![f16::ZERO; tiles * per_row * TILE];
        let mut mins = vec![f16::ZERO; tiles * per_row * TILE];
        let mut q = [0u8; BLOCK];
        for row in 0..rows {
            let (tile, lane) = (row / TILE, row % TILE);
            for block in 0..per_row {
                let src = &blocks[(row * per_row + block) * Q4_1_BYTES..][..Q4_1_BYTES];
                let at = (tile * per_row + block) * TILE + lane;
                scales[at] = f16::from_le_bytes([src[0], src[1]]);
                mins[at] = f16::from_le_bytes([src[2], src[3]]);
                // GGUF order: byte j holds weight j (low nibble) and weight j + 16 (high).
                for (j, &byte) in src[4..].iter().enumerate() {
                    q[j] = byte & 0x0F;
                    q[j + 16] = byte >> 4;
                }
                for pair in 0..STEPS / 2 {
                    let dst =
                        (((tile * per_row + block) * (STEPS / 2) + pair) * TILE + lane) * GROUP;
                    for g in 0..GROUP {
                        let low = q[2 * pair * GROUP + g];
                        let high = q[(2 * pair + 1) * GROUP + g];
                        nibbles[dst + g] = low | (high << 4);
                    }
                }
            }
        }
        Some(Self {
            rows,
            cols,
            blocks: per_row,
            tiles,
            weights: Weights::Q4 {
                nibbles,
                scales,
                mins,
            },
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `"q4_1"` or `"q8"`.
    pub fn format(&self) -> &'static str {
        match self.weights {
            Weights::Q8 { .. } => "q8",
            Weights::Q4 { .. } => "q4_1",
        }
    }

    /// `x · wᵀ` for the row-major `n × cols` activations `x`: returns `n × rows`. Each
    /// output row is computed by the same operations whatever `n` is, so a row's result does
    /// not depend on which other rows share the call.
    ///
    /// # Panics
    /// When `x.len()` is not a multiple of `cols`.
    pub fn matmul(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(
            x.len() % self.cols.max(1),
            0,
            "rows of {} values",
            self.cols
        );
        let n = x.len() / self.cols.max(1);
        let offset = matches!(self.weights, Weights::Q8 { .. });
        let activations = Activations::quantize(x, n, self.cols, self.blocks, offset);
        let per_tile = n * TILE;
        let mut tiled = vec![0f32; self.tiles * per_tile];
        let vnni = vnni_available();
        // Waking another thread costs tens of microseconds, more than a layer's whole
        // product for a few rows: only products of [`PARALLEL_MACS`] or more are split, in
        // one contiguous run of tiles per thread.
        let threads = if self.rows * self.cols * n >= PARALLEL_MACS {
            rayon::current_num_threads()
        } else {
            1
        };
        let tiles_per_piece = self.tiles.div_ceil(threads).max(1);
        let run = |(piece, out): (usize, &mut [f32])| {
            for (i, tile_out) in out.chunks_mut(per_tile).enumerate() {
                self.tile(piece * tiles_per_piece + i, &activations, tile_out, vnni);
            }
        };
        if threads > 1 {
            tiled
                .par_chunks_mut(per_tile * tiles_per_piece)
                .enumerate()
                .for_each(run);
        } else {
            run((0, &mut tiled));
        }
        let mut out = vec![0f32; n * self.rows];
        for (tile, chunk) in tiled.chunks(per_tile).enumerate() {
            let first = tile * TILE;
            let width = TILE.min(self.rows - first);
            for r in 0..n {
                out[r * self.rows + first..r * self.rows + first + width]
                    .copy_from_slice(&chunk[r * TILE..r * TILE + width]);
            }
        }
        out
    }

    /// One tile's outputs for every activation row: `out` is `[row][TILE]`.
    fn tile(&self, tile: usize, x: &Activations, out: &mut [f32], vnni: bool) {
        let mut first = 0;
        while first < x.rows {
            let count = ROWS_PER_PASS.min(x.rows - first);
            let dst = &mut out[first * TILE..(first + count) * TILE];
            if vnni {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `vnni_available` checked the CPU features the kernels are built for.
                unsafe {
                    match count {
                        1 => avx512::tile::<1>(self, tile, x, first, dst),
                        2 => avx512::tile::<2>(self, tile, x, first, dst),
                        3 => avx512::tile::<3>(self, tile, x, first, dst),
                        4 => avx512::tile::<4>(self, tile, x, first, dst),
                        5 => avx512::tile::<5>(self, tile, x, first, dst),
                        6 => avx512::tile::<6>(self, tile, x, first, dst),
                        7 => avx512::tile::<7>(self, tile, x, first, dst),
                        _ => avx512::tile::<8>(self, tile, x, first, dst),
                    }
                }
            } else {
                self.tile_portable(tile, x, first, count, dst);
            }
            first += count;
        }
    }

    /// The kernels' arithmetic in portable code (same integer dots, same fused float steps).
    fn tile_portable(
        &self,
        tile: usize,
        x: &Activations,
        first: usize,
        count: usize,
        out: &mut [f32],
    ) {
        for r in 0..count {
            let xq = x.row(first + r);
            for lane in 0..TILE {
                let mut acc = 0f32;
                for block in 0..self.blocks {
                    let at = (tile * self.blocks + block) * TILE + lane;
                    let x_scale = x.scales[(first + r) * self.blocks + block];
                    let mut dot = 0i32;
                    for step in 0..STEPS {
                        let a = block * BLOCK + step * GROUP;
                        for g in 0..GROUP {
                            let w = self.quant(tile, block, step, lane, g);
                            dot += self.activation(xq[a + g]) * w;
                        }
                    }
                    acc = match &self.weights {
                        Weights::Q8 {
                            scales, offsets, ..
                        } => (dot as f32)
                            .mul_add(scales[at], offsets[at])
                            .mul_add(x_scale, acc),
                        Weights::Q4 { scales, mins, .. } => {
                            let x_sum = x.sums[(first + r) * self.blocks + block];
                            let partial = dot as f32 * scales[at].to_f32();
                            mins[at]
                                .to_f32()
                                .mul_add(x_sum, partial.mul_add(x_scale, acc))
                        }
                    };
                }
                out[r * TILE + lane] = acc;
            }
        }
    }

    /// An activation byte's value as the kernels read it: unsigned (offset by 128) beside
    /// 8-bit weights, signed beside 4-bit ones.
    fn activation(&self, byte: u8) -> i32 {
        match self.weights {
            Weights::Q8 { .. } => i32::from(byte),
            Weights::Q4 { .. } => i32::from(byte as i8),
        }
    }

    /// The quant of lane `lane`, weight `g` of step `step` of `block` in `tile`.
    fn quant(&self, tile: usize, block: usize, step: usize, lane: usize, g: usize) -> i32 {
        match &self.weights {
            Weights::Q8 { quants, .. } => {
                let at = (((tile * self.blocks + block) * STEPS + step) * TILE + lane) * GROUP;
                i32::from(quants[at + g])
            }
            Weights::Q4 { nibbles, .. } => {
                let pair = step / 2;
                let at =
                    (((tile * self.blocks + block) * (STEPS / 2) + pair) * TILE + lane) * GROUP;
                let byte = nibbles[at + g];
                i32::from(if step.is_multiple_of(2) {
                    byte & 0x0F
                } else {
                    byte >> 4
                })
            }
        }
    }
}

/// Activation rows quantized to 8 bits per block of 32.
struct Activations {
    rows: usize,
    /// Padded columns per row.
    width: usize,
    /// `[row][width]` quants, as signed bytes or (for 8-bit weights) offset by 128.
    quants: Vec<u8>,
    /// `[row][block]` scales.
    scales: Vec<f32>,
    /// `[row][block]`: scale · Σ quants (signed), which meets the 4-bit weights' minimums.
    sums: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, cols: usize, blocks: usize, offset: bool) -> Self {
        let width = blocks * BLOCK;
        let shift: i16 = if offset { 128 } else { 0 };
        let mut quants = vec![shift as u8; rows * width];
        let mut scales = vec![0f32; rows * blocks];
        let mut sums = vec![0f32; rows * blocks];
        let mut q = [0i8; BLOCK];
        for r in 0..rows {
            for block in 0..blocks {
                let start = block * BLOCK;
                let scale = quantize_row_block(&x[r * cols..(r + 1) * cols], block, &mut q);
                scales[r * blocks + block] = scale;
                sums[r * blocks + block] =
                    scale * q.iter().map(|&v| i32::from(v)).sum::<i32>() as f32;
                for (dst, &v) in quants[r * width + start..r * width + start + BLOCK]
                    .iter_mut()
                    .zip(&q)
                {
                    *dst = (i16::from(v) + shift) as u8;
                }
            }
        }
        Self {
            rows,
            width,
            quants,
            scales,
            sums,
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.quants[r * self.width..(r + 1) * self.width]
    }
}

/// Whether this CPU runs the AVX-512 VNNI kernels (elsewhere the products run on a
/// portable scalar loop, fast enough for a decode step's one row but not for many).
pub(crate) fn vnni_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Activations, BLOCK, GROUP, QMatrix, STEPS, TILE, Weights};
    use std::arch::x86_64::*;

    /// `R` activation rows (from `first`) against one tile of 16 output rows; `out` is
    /// `[R][16]`.
    ///
    /// # Safety
    /// The CPU must support AVX-512 F, BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    // The block index addresses weights, scales and activations at once.
    #[allow(clippy::needless_range_loop)]
    pub(super) unsafe fn tile<const R: usize>(
        m: &QMatrix,
        tile: usize,
        x: &Activations,
        first: usize,
        out: &mut [f32],
    ) {
        assert!(out.len() >= R * TILE && first + R <= x.rows);
        let blocks = m.blocks;
        let rows: [&[u8]; R] = std::array::from_fn(|r| x.row(first + r));
        let x_scales: [&[f32]; R] =
            std::array::from_fn(|r| &x.scales[(first + r) * blocks..(first + r + 1) * blocks]);
        let x_sums: [&[f32]; R] =
            std::array::from_fn(|r| &x.sums[(first + r) * blocks..(first + r + 1) * blocks]);
        // Four activation bytes of row `r` at column `a`, in every lane.
        let broadcast = |r: usize, a: usize| {
            debug_assert!(a + GROUP <= rows[r].len());
            // SAFETY: `a + 4 <= blocks · 32`, the row's length.
            _mm512_set1_epi32(unsafe { rows[r].as_ptr().add(a).cast::<i32>().read_unaligned() })
        };
        let mut acc = [_mm512_setzero_ps(); R];
        let per_tile = blocks * TILE;
        match &m.weights {
            Weights::Q8 {
                quants,
                scales,
                offsets,
            } => {
                let tile_quants = &quants[tile * per_tile * BLOCK..(tile + 1) * per_tile * BLOCK];
                let tile_scales = &scales[tile * per_tile..(tile + 1) * per_tile];
                let tile_offsets = &offsets[tile * per_tile..(tile + 1) * per_tile];
                for block in 0..blocks {
                    let mut dots = [_mm512_setzero_si512(); R];
                    for step in 0..STEPS {
                        let at = (block * STEPS + step) * TILE * GROUP;
                        // SAFETY: 64 bytes from `at` lie inside the tile's quants.
                        let w = unsafe { _mm512_loadu_si512(tile_quants.as_ptr().add(at).cast()) };
                        for (r, dot) in dots.iter_mut().enumerate() {
                            *dot = _mm512_dpbusd_epi32(
                                *dot,
                                broadcast(r, block * BLOCK + step * GROUP),
                                w,
                            );
                        }
                    }
                    let at = block * TILE;
                    // SAFETY: 16 values from `at` lie inside the tile's scales and offsets.
                    let (scale, offset) = unsafe {
                        (
                            _mm512_loadu_ps(tile_scales.as_ptr().add(at)),
                            _mm512_loadu_ps(tile_offsets.as_ptr().add(at)),
                        )
                    };
                    for r in 0..R {
                        let partial = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, offset);
                        acc[r] =
                            _mm512_fmadd_ps(partial, _mm512_set1_ps(x_scales[r][block]), acc[r]);
                    }
                }
            }
            Weights::Q4 {
                nibbles,
                scales,
                mins,
            } => {
                let tile_nibbles =
                    &nibbles[tile * per_tile * BLOCK / 2..(tile + 1) * per_tile * BLOCK / 2];
                let tile_scales = &scales[tile * per_tile..(tile + 1) * per_tile];
                let tile_mins = &mins[tile * per_tile..(tile + 1) * per_tile];
                let low_nibbles = _mm512_set1_epi8(0x0F);
                for block in 0..blocks {
                    let mut dots = [_mm512_setzero_si512(); R];
                    for pair in 0..STEPS / 2 {
                        let at = (block * STEPS / 2 + pair) * TILE * GROUP;
                        // SAFETY: 64 bytes from `at` lie inside the tile's nibbles.
                        let packed =
                            unsafe { _mm512_loadu_si512(tile_nibbles.as_ptr().add(at).cast()) };
                        let low = _mm512_and_si512(packed, low_nibbles);
                        let high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low_nibbles);
                        let a = block * BLOCK + 2 * pair * GROUP;
                        for (r, dot) in dots.iter_mut().enumerate() {
                            *dot = _mm512_dpbusd_epi32(*dot, low, broadcast(r, a));
                            *dot = _mm512_dpbusd_epi32(*dot, high, broadcast(r, a + GROUP));
                        }
                    }
                    let at = block * TILE;
                    // SAFETY: 16 halves from `at` lie inside the tile's scales and minimums.
                    let (scale, min) = unsafe {
                        (
                            _mm512_cvtph_ps(_mm256_loadu_si256(
                                tile_scales.as_ptr().add(at).cast(),
                            )),
                            _mm512_cvtph_ps(_mm256_loadu_si256(tile_mins.as_ptr().add(at).cast())),
                        )
                    };
                    for r in 0..R {
                        let partial = _mm512_mul_ps(_mm512_cvtepi32_ps(dots[r]), scale);
                        let with_scale =
                            _mm512_fmadd_ps(partial, _mm512_set1_ps(x_scales[r][block]), acc[r]);
                        acc[r] = _mm512_fmadd_ps(min, _mm512_set1_ps(x_sums[r][block]), with_scale);
                    }
                }
            }
        }
        for (r, value) in acc.iter().enumerate() {
            // SAFETY: `out` holds `R` rows of 16.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(r * TILE), *value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::pseudo_random as values;

    fn dense(w: &[f32], x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let n = x.len() / cols;
        let mut out = vec![0f32; n * rows];
        for r in 0..n {
            for o in 0..rows {
                out[r * rows + o] = (0..cols).map(|c| x[r * cols + c] * w[o * cols + c]).sum();
            }
        }
        out
    }

    /// Q4_1 blocks of `w` as a GGUF stores them, and the weights they stand for.
    fn q4_1(w: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let mut bytes = Vec::new();
        let mut exact = Vec::new();
        for block in w.chunks(BLOCK) {
            let min = block.iter().copied().fold(f32::INFINITY, f32::min);
            let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = f16::from_f32((max - min) / 15.0);
            let m = f16::from_f32(min);
            bytes.extend(d.to_le_bytes());
            bytes.extend(m.to_le_bytes());
            let q: Vec<u8> = block
                .iter()
                .map(|v| (((v - m.to_f32()) / d.to_f32()).round().clamp(0.0, 15.0)) as u8)
                .collect();
            for j in 0..16 {
                bytes.push(q[j] | (q[j + 16] << 4));
            }
            exact.extend(q.iter().map(|&q| d.to_f32() * f32::from(q) + m.to_f32()));
        }
        (bytes, exact)
    }

    fn assert_close(got: &[f32], want: &[f32], cols: usize) {
        // 8-bit activations (and 8-bit weights): errors of ~1% of a product's spread.
        let bound = 0.02 * (cols as f32).sqrt();
        for (g, e) in got.iter().zip(want) {
            assert!((g - e).abs() < bound, "{g} vs {e}");
        }
    }

    #[test]
    fn q8_product_is_close_to_the_dense_product_for_ragged_shapes() {
        for (rows, cols, n) in [(16, 32, 1), (37, 70, 3), (960, 576, 5), (5, 1536, 9)] {
            let w = values(rows * cols, 1);
            let x = values(n * cols, 2);
            let got = QMatrix::quantize_q8(&w, rows, cols).matmul(&x);
            assert_close(&got, &dense(&w, &x, rows, cols), cols);
        }
    }

    #[test]
    fn q4_1_product_is_close_to_the_product_with_the_stored_weights() {
        for (rows, cols, n) in [(16, 32, 1), (37, 64, 3), (960, 576, 5)] {
            let (blocks, exact) = q4_1(&values(rows * cols, 7));
            let x = values(n * cols, 8);
            let m = QMatrix::from_q4_1(&blocks, rows, cols).expect("whole blocks");
            assert_eq!(m.format(), "q4_1");
            assert_close(&m.matmul(&x), &dense(&exact, &x, rows, cols), cols);
        }
        assert!(QMatrix::from_q4_1(&[0; 19], 1, 32).is_none());
    }

    #[test]
    fn product_rows_do_not_depend_on_the_rows_beside_them() {
        let (rows, cols) = (48, 96);
        let q8 = QMatrix::quantize_q8(&values(rows * cols, 3), rows, cols);
        let q4 = QMatrix::from_q4_1(&q4_1(&values(rows * cols, 3)).0, rows, cols).unwrap();
        let x = values(7 * cols, 4);
        for m in [q8, q4] {
            let together = m.matmul(&x);
            for r in 0..7 {
                let alone = m.matmul(&x[r * cols..(r + 1) * cols]);
                assert_eq!(alone, together[r * rows..(r + 1) * rows]);
            }
        }
    }

    /// Signed-byte rounding of 32 values, written apart from the code under test: scale
    /// `max |v| / 127`, `round(v / scale)` (half away from zero) through the scale's
    /// reciprocal, clamped to ±127. Returns the quants and the scale.
    fn reference_round(block: &[f32]) -> ([i32; BLOCK], f32) {
        let mut padded = [0f32; BLOCK];
        padded[..block.len()].copy_from_slice(block);
        let max = padded.iter().fold(0f32, |m, v| m.max(v.abs()));
        let scale = max / 127.0;
        let inverse = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        (
            padded.map(|v| (v * inverse).round().clamp(-127.0, 127.0) as i32),
            scale,
        )
    }

    /// The product as the module documents its arithmetic, computed row-major and scalar
    /// (no tiles, no interleaving, no lanes), apart from the code under test: activations
    /// rounded per block; per output, blocks in order, with fused multiply-adds —
    /// 8-bit weights: `acc = (Σ(xq+128)·wq · ws + (−128·ws·Σwq)) · xs + acc`;
    /// Q4_1 weights: `acc = m · (xs·Σxq) + ((Σxq·q) · d · xs + acc)`.
    fn reference_product(weights: &Reference, x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let n = x.len() / cols;
        let blocks = cols.div_ceil(BLOCK);
        let mut out = vec![0f32; n * rows];
        for r in 0..n {
            let row = &x[r * cols..(r + 1) * cols];
            for o in 0..rows {
                let mut acc = 0f32;
                for block in 0..blocks {
                    let span = block * BLOCK..((block + 1) * BLOCK).min(cols);
                    let (xq, xs) = reference_round(&row[span]);
                    acc = match weights {
                        Reference::Q8(w) => {
                            let wrow = &w[o * cols..(o + 1) * cols];
                            let span = block * BLOCK..((block + 1) * BLOCK).min(cols);
                            let (wq, ws) = reference_round(&wrow[span]);
                            let dot: i32 = xq.iter().zip(&wq).map(|(a, b)| (a + 128) * b).sum();
                            let offset = -128.0 * ws * wq.iter().sum::<i32>() as f32;
                            (dot as f32).mul_add(ws, offset).mul_add(xs, acc)
                        }
                        Reference::Q4_1(bytes) => {
                            let src = &bytes[(o * blocks + block) * Q4_1_BYTES..][..Q4_1_BYTES];
                            let d = f16::from_le_bytes([src[0], src[1]]).to_f32();
                            let m = f16::from_le_bytes([src[2], src[3]]).to_f32();
                            let q = |j: usize| {
                                i32::from(if j < 16 {
                                    src[4 + j] & 0x0F
                                } else {
                                    src[4 + j - 16] >> 4
                                })
                            };
                            let dot: i32 = (0..BLOCK).map(|j| xq[j] * q(j)).sum();
                            let x_sum = xs * xq.iter().sum::<i32>() as f32;
                            m.mul_add(x_sum, (dot as f32 * d).mul_add(xs, acc))
                        }
                    };
                }
                out[r * rows + o] = acc;
            }
        }
        out
    }

    /// What a reference product is computed from: the f32 weights (rounded to 8 bits as
    /// the module does) or the GGUF's Q4_1 blocks.
    enum Reference {
        Q8(Vec<f32>),
        Q4_1(Vec<u8>),
    }

    /// Ragged shapes (rows not a multiple of 16, more activation rows than one pass, a
    /// partial last block for 8-bit weights), each matrix and its reference.
    fn reference_cases() -> Vec<(QMatrix, Reference, Vec<f32>)> {
        let mut cases = Vec::new();
        for (rows, cols, n, seed) in [(37, 70, 11, 21), (64, 576, 6, 22), (5, 32, 1, 23)] {
            let w = values(rows * cols, seed);
            let x = values(n * cols, seed + 100);
            cases.push((QMatrix::quantize_q8(&w, rows, cols), Reference::Q8(w), x));
        }
        for (rows, cols, n, seed) in [(37, 96, 11, 31), (64, 576, 6, 32)] {
            let blocks = q4_1(&values(rows * cols, seed)).0;
            let x = values(n * cols, seed + 100);
            let m = QMatrix::from_q4_1(&blocks, rows, cols).unwrap();
            cases.push((m, Reference::Q4_1(blocks), x));
        }
        cases
    }

    /// `m`'s product of `x` through one path: the VNNI kernels or the portable code.
    fn product_through(m: &QMatrix, x: &[f32], vnni: bool) -> Vec<f32> {
        let n = x.len() / m.cols;
        let offset = m.format() == "q8";
        let acts = Activations::quantize(x, n, m.cols, m.blocks, offset);
        let mut out = vec![0f32; n * m.rows];
        for tile in 0..m.tiles {
            let mut tiled = vec![0f32; n * TILE];
            m.tile(tile, &acts, &mut tiled, vnni);
            let first = tile * TILE;
            let width = TILE.min(m.rows - first);
            for r in 0..n {
                out[r * m.rows + first..][..width].copy_from_slice(&tiled[r * TILE..][..width]);
            }
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Every reference case through one path, bit for bit (and `matmul` where it takes
    /// that path).
    fn assert_reference_bits(vnni: bool) {
        for (m, reference, x) in reference_cases() {
            let want = reference_product(&reference, &x, m.rows, m.cols);
            let got = product_through(&m, &x, vnni);
            let what = format!("{} {}×{}", m.format(), m.rows, m.cols);
            assert_eq!(bits(&got), bits(&want), "{what}");
            if vnni == vnni_available() {
                assert_eq!(bits(&m.matmul(&x)), bits(&want), "{what}: matmul");
            }
        }
    }

    #[test]
    fn the_portable_product_gives_the_bits_of_a_scalar_reference() {
        assert_reference_bits(false);
    }

    /// The name is printed as skipped on a CPU without AVX-512 VNNI (scripts/test.sh also
    /// says which SIMD tests this machine cannot run).
    #[test]
    fn the_vnni_kernels_give_the_bits_of_a_scalar_reference() {
        if !vnni_available() {
            eprintln!(
                "SKIPPED the_vnni_kernels_give_the_bits_of_a_scalar_reference: this CPU has no AVX-512 VNNI"
            );
            return;
        }
        assert_reference_bits(true);
    }
}
