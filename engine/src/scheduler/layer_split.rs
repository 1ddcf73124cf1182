//! The layer dimension of bidirectional prefill (CacheFlow): split every stored chunk at a
//! layer boundary instead of splitting the context at a chunk boundary. The compute worker
//! computes the bottom layers of each stored chunk front to back while ranged reads fetch
//! the top layers of the same chunks; each chunk is whole once its top arrives. A chunk's
//! bottom layers depend only on the bottom layers of the chunks before it, so the compute
//! never waits for a load until it reaches a chunk it must compute in full (one with no
//! stored cache, or whose top failed to load) or the question tail.
//!
//! Where chunks are few and large, a chunk boundary is a coarse split point (four chunks
//! with four reads in flight leave bidirectional prefill little to balance); a layer
//! boundary divides the work finely. Loaded top layers of an exact prefix cache are the
//! values computing them would give, so the result is exact.
//!
//! This runs one request at a time, beside the shared [`super::Scheduler`] rather than in
//! it: `ragcake bench ttft` measures it against chunk-level scheduling.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::{
    ComputeBackend, LoadBackend, LoadOutcome, Miss, MissReason, Mode, PrefillReport,
    PrefillRequest, Prefilled, check_request,
};
use crate::error::{EngineError, Result};

/// How a layer-split prefill runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSplitConfig {
    /// The first layer loaded: layers below it are computed, layers from it on are loaded.
    pub split_layer: usize,
    /// Ranged reads in flight at once.
    pub io_concurrency: usize,
    /// A read running longer than this fails (its chunk is computed in full).
    pub load_timeout_secs: f64,
}

/// The split layer that finishes computing the bottom layers and loading the top layers
/// together, for a model of `layers` layers whose stored chunks take `compute_secs` to
/// compute in full and `load_secs` to load in full (with the reads' concurrency): the
/// compute share is `load / (compute + load)`. At least one layer is computed and one loaded
/// (the two ends are compute-only and load-only).
pub fn balanced_split(layers: usize, compute_secs: f64, load_secs: f64) -> usize {
    if layers < 2 {
        return layers;
    }
    let total = compute_secs + load_secs;
    let share = if !load_secs.is_finite() {
        1.0
    } else if !compute_secs.is_finite() {
        0.0
    } else if total > 0.0 {
        load_secs / total
    } else {
        0.5
    };
    ((share * layers as f64).round() as usize).clamp(1, layers - 1)
}

/// One loaded top, handed from the I/O side to the compute thread (in chunk order).
struct Top<Kv> {
    chunk: usize,
    outcome: LoadOutcome<Kv>,
    secs: f64,
}

/// Prefills `request` with its stored chunks split at `config.split_layer`: bottom layers
/// computed, top layers loaded with ranged reads; chunks with no stored cache, or whose top
/// does not load, are computed in full; then the tail. Compute-only and load-only requests
/// are refused (they have no split). Dropping the future stops the reads and the compute
/// thread at its next step.
pub async fn prefill_layer_split<C, L>(
    compute: Arc<C>,
    loader: Arc<L>,
    request: PrefillRequest<L::Source>,
    config: &LayerSplitConfig,
) -> Result<Prefilled<C>>
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    check_request(&request, compute.max_tokens())?;
    if request.mode != Mode::Bidirectional {
        return Err(EngineError::InvalidSetting(format!(
            "a layer split is a bidirectional prefill, not {}",
            request.mode
        )));
    }
    let layers = compute.layers();
    if config.split_layer == 0 || config.split_layer >= layers {
        return Err(EngineError::InvalidSetting(format!(
            "split layer {} of {layers}: at least one layer is computed and one loaded",
            config.split_layer
        )));
    }
    let started = Instant::now();
    let split = config.split_layer;
    let stored: Vec<(usize, L::Source, Arc<[u32]>)> = request
        .chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| Some((i, c.stored.clone()?, c.tokens.clone())))
        .collect();
    let (tops, arrivals) = mpsc::channel::<Top<C::Kv>>();
    let cancelled = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(cancelled.clone());
    let timeout = Duration::from_secs_f64(config.load_timeout_secs.max(1e-3));
    let reads = async move {
        // Started in chunk order (the semaphore is fair), so the tops the compute thread
        // fills first arrive first; dropping the set stops every read.
        let permits = Arc::new(Semaphore::new(config.io_concurrency.max(1)));
        let mut set = JoinSet::new();
        for (chunk, source, tokens) in stored {
            let (loader, permits) = (loader.clone(), permits.clone());
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let began = Instant::now();
                let read = loader.load_layers(&source, &tokens, split..layers);
                let outcome = tokio::time::timeout(timeout, read)
                    .await
                    .unwrap_or_else(|_| {
                        LoadOutcome::Failed(format!("timed out after {}s", timeout.as_secs_f64()))
                    });
                Top {
                    chunk,
                    outcome,
                    secs: began.elapsed().as_secs_f64(),
                }
            });
        }
        while let Some(Ok(top)) = set.join_next().await {
            // A failing store fails the reads after it too: the rest is computed.
            let failed = matches!(top.outcome, LoadOutcome::Failed(_));
            if tops.send(top).is_err() || failed {
                break;
            }
        }
    };
    let worker = {
        let cancelled = cancelled.clone();
        tokio::task::spawn_blocking(move || {
            fill(&*compute, &request, split, &arrivals, &cancelled, started)
        })
    };
    let (_, filled) = tokio::join!(reads, worker);
    filled.map_err(|e| EngineError::Scheduler(format!("the compute thread failed: {e}")))?
}

/// Sets the flag when dropped: a cancelled prefill stops its compute thread.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The compute thread: bottoms of stored chunks ahead, tops filled in order as they arrive,
/// full computation where a chunk has no stored cache or its top did not load.
fn fill<C: ComputeBackend>(
    compute: &C,
    request: &PrefillRequest<impl Clone>,
    split: usize,
    arrivals: &mpsc::Receiver<Top<C::Kv>>,
    cancelled: &AtomicBool,
    started: Instant,
) -> Result<Prefilled<C>> {
    let mut report = PrefillReport {
        mode: request.mode,
        chunks: request.chunks.len(),
        split_layer: Some(split),
        loads_issued: request.chunks.iter().filter(|c| c.stored.is_some()).count(),
        ..PrefillReport::default()
    };
    let mut cache = compute.new_cache();
    let mut arrived: HashMap<usize, Top<C::Kv>> = HashMap::new();
    // Chunks whose bottom layers are in the cache and whose top is awaited, oldest first.
    let mut awaiting: VecDeque<usize> = VecDeque::new();
    let mut store_alive = true;
    let stop = || {
        if cancelled.load(Ordering::Relaxed) {
            Err(EngineError::Scheduler("the request was cancelled".into()))
        } else {
            Ok(())
        }
    };
    let timed = |report: &mut PrefillReport, f: &mut dyn FnMut() -> Result<()>| {
        let began = Instant::now();
        f()?;
        report.compute_secs += began.elapsed().as_secs_f64();
        Ok::<(), EngineError>(())
    };
    // Fills the oldest awaited top; `block` waits for it, else only if it has arrived.
    let fill_next = |cache: &mut C::Cache,
                     report: &mut PrefillReport,
                     arrived: &mut HashMap<usize, Top<C::Kv>>,
                     awaiting: &mut VecDeque<usize>,
                     store_alive: &mut bool,
                     block: bool|
     -> Result<bool> {
        let Some(&chunk) = awaiting.front() else {
            return Ok(false);
        };
        loop {
            match arrivals.try_recv() {
                Ok(top) => {
                    arrived.insert(top.chunk, top);
                }
                Err(mpsc::TryRecvError::Empty) if block && !arrived.contains_key(&chunk) => {
                    match arrivals.recv_timeout(Duration::from_millis(50)) {
                        Ok(top) => {
                            arrived.insert(top.chunk, top);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => stop()?,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                Err(_) => break,
            }
        }
        let top = match arrived.remove(&chunk) {
            Some(top) => Some(top),
            None if block || !*store_alive => None,
            None => return Ok(false),
        };
        awaiting.pop_front();
        let tokens = &request.chunks[chunk].tokens;
        let miss = match top.map(|t| (t.outcome, t.secs)) {
            Some((LoadOutcome::Loaded { kv, bytes }, secs)) => {
                let began = Instant::now();
                match compute.fill_top(cache, &kv, split) {
                    Ok(()) => {
                        report.import_secs += began.elapsed().as_secs_f64();
                        report.chunks_loaded += 1;
                        report.tokens_loaded += tokens.len();
                        report.bytes_loaded += bytes;
                        report.load_secs += secs;
                        return Ok(true);
                    }
                    Err(e) => MissReason::Rejected(e.to_string()),
                }
            }
            Some((LoadOutcome::Missing(reason), _)) => reason,
            Some((LoadOutcome::Failed(why), _)) => {
                *store_alive = false;
                MissReason::StoreFailed(why)
            }
            // The reads stopped after a failure: the store is down.
            None => {
                *store_alive = false;
                MissReason::StoreFailed("no read after an earlier failure".into())
            }
        };
        if miss.degrades() {
            report.degraded = true;
        }
        report.misses.push(Miss {
            chunk,
            reason: miss,
        });
        // Its bottom layers are in the cache, its top is not coming: compute it in full
        // (the bottom layers are recomputed to equal values on the way).
        timed(report, &mut || {
            compute.compute(cache, tokens, false).map(|_| ())
        })?;
        report.chunks_computed += 1;
        report.tokens_computed += tokens.len();
        report.computed_chunks.push(chunk);
        Ok(true)
    };

    for (i, chunk) in request.chunks.iter().enumerate() {
        stop()?;
        if chunk.stored.is_some() && store_alive {
            timed(&mut report, &mut || {
                compute.compute_bottom(&mut cache, &chunk.tokens, split)
            })?;
            awaiting.push_back(i);
            // Tops that are already here are filled now: cheap, and it frees their memory.
            while fill_next(
                &mut cache,
                &mut report,
                &mut arrived,
                &mut awaiting,
                &mut store_alive,
                false,
            )? {}
            continue;
        }
        // A chunk computed in full attends to every layer of the chunks before it.
        while fill_next(
            &mut cache,
            &mut report,
            &mut arrived,
            &mut awaiting,
            &mut store_alive,
            true,
        )? {
            stop()?;
        }
        timed(&mut report, &mut || {
            compute
                .compute(&mut cache, &chunk.tokens, false)
                .map(|_| ())
        })?;
        report.chunks_computed += 1;
        report.tokens_computed += chunk.tokens.len();
        report.computed_chunks.push(i);
    }
    while fill_next(
        &mut cache,
        &mut report,
        &mut arrived,
        &mut awaiting,
        &mut store_alive,
        true,
    )? {
        stop()?;
    }
    let mut logits = None;
    timed(&mut report, &mut || {
        logits = compute.compute(&mut cache, &request.tail, true)?;
        Ok(())
    })?;
    report.tokens_computed += request.tail.len();
    report.ttft_secs = started.elapsed().as_secs_f64();
    let logits = logits.ok_or(EngineError::EmptyInput)?;
    Ok(Prefilled {
        cache,
        logits,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::balanced_split;

    #[test]
    fn the_split_gives_each_side_its_share_and_never_all() {
        // Loading twice as slow as computing: two thirds of the layers are computed.
        assert_eq!(balanced_split(30, 4.0, 8.0), 20);
        assert_eq!(balanced_split(30, 8.0, 8.0), 15);
        // One side free or stuck: still at least one layer each way.
        assert_eq!(balanced_split(30, 4.0, 0.0), 1);
        assert_eq!(balanced_split(30, 4.0, f64::INFINITY), 29);
        assert_eq!(balanced_split(30, 0.0, 1e9), 29);
    }
}
