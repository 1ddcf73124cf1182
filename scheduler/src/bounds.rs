//! Lower bounds on the TTFT of one request over stored exact caches, from its chunks' costs:
//! what no schedule of the same work on the same machine can beat.
//!
//! The compute worker computes whatever is not loaded and imports whatever is, one step at a
//! time; the loads share the store; the question tail runs after both. So for a set of
//! chunks loaded, TTFT is at least the larger of the compute worker's work and the time the
//! loads need (the store's time for all of them at its best aggregate rate, and the longest
//! single read), plus the tail.
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
    /// The shortest one read of its stored cache can take (latency, one read's bandwidth).
    pub read: f64,
    /// The store's time for it at its best aggregate rate: with reads that do not slow each
    /// other, `read` over the reads in flight; where the store is the limit, its bytes over
    /// the store's best throughput.
    pub store: f64,
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

/// Seconds the store needs at least to load `chunks`.
fn load_time(chunks: &[ChunkCosts]) -> f64 {
    let (store, longest) = chunks
        .iter()
        .fold((0.0, 0.0f64), |(s, m), c| (s + c.store, m.max(c.read)));
    store.max(longest)
}

/// The bounds for `chunks` in prompt order and a tail of `tail` seconds.
pub fn prefill_bounds(chunks: &[ChunkCosts], tail: f64) -> Bounds {
    let n = chunks.len();
    let (chunk_split, chunk_level) = (0..=n)
        .map(|k| {
            let compute: f64 = chunks[..k].iter().map(|c| c.compute).sum();
            let import: f64 = chunks[k..].iter().map(|c| c.import).sum();
            (k, (compute + import).max(load_time(&chunks[k..])))
        })
        .fold(
            (0, f64::INFINITY),
            |best, x| if x.1 < best.1 { x } else { best },
        );
    Bounds {
        chunk_level: chunk_level + tail,
        chunk_split,
        layer_level: fractional_bound(chunks) + tail,
    }
}

/// `min over x ∈ [0,1]ⁿ of max(Σ compute·x + import·(1−x), Σ store·(1−x))`: start with
/// everything loaded and move work to the compute worker where it buys the most store time
/// per second of compute, until the two sides meet. (The longest single read is left out:
/// with fractions of chunks it can be cut arbitrarily short.)
fn fractional_bound(chunks: &[ChunkCosts]) -> f64 {
    let mut worker: f64 = chunks.iter().map(|k| k.import).sum();
    let mut loads: f64 = chunks.iter().map(|k| k.store).sum();
    if worker >= loads {
        return worker;
    }
    // Each chunk moved whole adds `compute − import` to the worker and takes `store` from
    // the loads; cheapest first.
    let mut order: Vec<&ChunkCosts> = chunks.iter().filter(|k| k.store > 0.0).collect();
    let cost = |k: &ChunkCosts| (k.compute - k.import) / k.store;
    order.sort_by(|a, b| cost(a).total_cmp(&cost(b)));
    for k in order {
        let (gain, saved) = (k.compute - k.import, k.store);
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

    /// `n` chunks alike, read `reads` at a time without slowing each other.
    fn even(n: usize, compute: f64, read: f64, reads: f64) -> Vec<ChunkCosts> {
        vec![
            ChunkCosts {
                compute,
                read,
                store: read / reads,
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
        let b = prefill_bounds(&even(4, 1.0, 1.0, 1.0), 0.5);
        assert_eq!((b.chunk_level, b.chunk_split, b.layer_level), (2.5, 2, 2.5));
        let b = prefill_bounds(&even(3, 1.0, 1.0, 1.0), 0.0);
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
                    read: load,
                    store: load / io,
                    import,
                })
                .collect();
            let b = prefill_bounds(&chunks, 0.2);
            let compute_only: f64 = chunks.iter().map(|c| c.compute).sum::<f64>() + 0.2;
            let load_only =
                (chunks.iter().map(|c| c.import).sum::<f64>()).max(load_time(&chunks)) + 0.2;
            assert!(
                b.chunk_level <= compute_only.min(load_only) + 1e-12,
                "{b:?}"
            );
            assert!(b.layer_level <= b.chunk_level + 1e-12, "{b:?}");
        }
    }
}
