//! Lower bounds on the TTFT of one request over stored exact caches, from its chunks' costs:
//! what no schedule of the same work on the same machine can beat.
//!
//! The compute worker computes whatever is not loaded and imports whatever is, one step at a
//! time; the loads run `io_concurrency` at once; the question tail runs after both. So for a
//! set of chunks loaded, TTFT is at least the larger of the compute worker's work and the
//! time the loads need (their sum over the concurrency, and the longest one), plus the tail.
//!
//! - [`Bounds::chunk_level`]: the best split point `k` with the front `k` chunks computed and
//!   the rest loaded, as the chunk-level scheduler divides a prompt (its T*).
//! - [`Bounds::layer_level`]: any share of each chunk computed (its bottom layers) and the
//!   rest loaded — a relaxation of every layer split, and so of every chunk-level split too:
//!   nothing the scheduler does with or without layer splits can beat it.

/// What one chunk costs, in seconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkCosts {
    /// Computing it at its position in the prompt.
    pub compute: f64,
    /// Loading its stored cache, one read alone.
    pub load: f64,
    /// Importing the loaded cache into the prompt's cache.
    pub import: f64,
}

/// Lower bounds on one request's TTFT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bounds {
    /// The best chunk-level split (front computed, back loaded), tail included.
    pub chunk_level: f64,
    /// How many front chunks that split computes.
    pub chunk_split: usize,
    /// The best split with any share of each chunk computed, tail included.
    pub layer_level: f64,
}

/// Seconds `parallel_reads` reads at once need at least to load `loads`.
fn load_time(loads: impl Iterator<Item = f64>, parallel_reads: f64) -> f64 {
    let (sum, longest) = loads.fold((0.0, 0.0f64), |(s, m), l| (s + l, m.max(l)));
    (sum / parallel_reads.max(1.0)).max(longest)
}

/// The bounds for `chunks` in prompt order and a tail of `tail` seconds, with at most
/// `parallel_reads` reads progressing at their single-read speed at once (the I/O
/// concurrency, or less where the store's aggregate rate is the limit).
pub fn prefill_bounds(chunks: &[ChunkCosts], tail: f64, parallel_reads: f64) -> Bounds {
    let n = chunks.len();
    let (chunk_split, chunk_level) = (0..=n)
        .map(|k| {
            let compute: f64 = chunks[..k].iter().map(|c| c.compute).sum();
            let import: f64 = chunks[k..].iter().map(|c| c.import).sum();
            let loads = load_time(chunks[k..].iter().map(|c| c.load), parallel_reads);
            (k, (compute + import).max(loads))
        })
        .fold(
            (0, f64::INFINITY),
            |best, x| if x.1 < best.1 { x } else { best },
        );
    Bounds {
        chunk_level: chunk_level + tail,
        chunk_split,
        layer_level: fractional_bound(chunks, parallel_reads) + tail,
    }
}

/// `min over x ∈ [0,1]ⁿ of max(Σ compute·x + import·(1−x), Σ load·(1−x) / concurrency)`:
/// start with everything loaded and move work to the compute worker where it buys the most
/// load time per second of compute, until the two sides meet. (The longest single read is
/// left out: with fractions of chunks it can be cut arbitrarily short.)
fn fractional_bound(chunks: &[ChunkCosts], parallel_reads: f64) -> f64 {
    let c = parallel_reads.max(1.0);
    let mut worker: f64 = chunks.iter().map(|k| k.import).sum();
    let mut loads: f64 = chunks.iter().map(|k| k.load).sum::<f64>() / c;
    if worker >= loads {
        return worker;
    }
    // Each chunk moved whole adds `compute − import` to the worker and takes `load / c`
    // from the loads; cheapest first.
    let mut order: Vec<&ChunkCosts> = chunks.iter().filter(|k| k.load > 0.0).collect();
    let cost = |k: &ChunkCosts| (k.compute - k.import) / (k.load / c);
    order.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
    for k in order {
        let (gain, saved) = (k.compute - k.import, k.load / c);
        if worker + gain <= loads - saved {
            worker += gain;
            loads -= saved;
            continue;
        }
        // Part of this chunk: the share x where both sides meet.
        let x = (loads - worker) / (gain + saved);
        return worker + gain * x;
    }
    worker.max(loads)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even(n: usize, compute: f64, load: f64) -> Vec<ChunkCosts> {
        vec![
            ChunkCosts {
                compute,
                load,
                import: 0.0
            };
            n
        ]
    }

    #[test]
    fn with_equal_compute_and_load_the_layer_bound_halves_the_work() {
        // Four chunks, one read at a time, computing one as long as loading one: at the
        // chunk level two each way (2 s); with fractions the same here (2 s); with an odd
        // count the chunk level loses half a chunk.
        let b = prefill_bounds(&even(4, 1.0, 1.0), 0.5, 1.0);
        assert_eq!((b.chunk_level, b.chunk_split, b.layer_level), (2.5, 2, 2.5));
        let b = prefill_bounds(&even(3, 1.0, 1.0), 0.0, 1.0);
        assert_eq!((b.chunk_level, b.layer_level), (2.0, 1.5));
    }

    #[test]
    fn bounds_never_exceed_either_single_mode_and_the_layer_bound_is_lower() {
        for (compute, load, import, io) in [
            (1.0, 0.1, 0.01, 4.0),
            (1.0, 10.0, 0.01, 4.0),
            (0.3, 1.2, 0.05, 2.0),
            (2.0, 2.0, 0.0, 1.0),
        ] {
            let chunks: Vec<ChunkCosts> = (0..7)
                .map(|i| ChunkCosts {
                    compute: compute * (1.0 + 0.1 * i as f64),
                    load,
                    import,
                })
                .collect();
            let b = prefill_bounds(&chunks, 0.2, io);
            let compute_only: f64 = chunks.iter().map(|c| c.compute).sum::<f64>() + 0.2;
            let load_only = (chunks.iter().map(|c| c.import).sum::<f64>())
                .max(load_time(chunks.iter().map(|c| c.load), io))
                + 0.2;
            assert!(
                b.chunk_level <= compute_only.min(load_only) + 1e-12,
                "{b:?}"
            );
            assert!(b.layer_level <= b.chunk_level + 1e-12, "{b:?}");
        }
    }
}
