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
//! This runs one request at a time, beside the shared [`ragcake::scheduler::Scheduler`] rather than in
//! it: `ragcake bench ttft` measures it against chunk-level scheduling.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use ragcake::scheduler::{
    ComputeBackend, Filled, LoadBackend, LoadOutcome, Miss, MissReason, Mode, PrefillReport,
    PrefillRequest, Result, SchedulerError, check_request, in_context_chunks, load_within,
};

/// Where a layer-split prefill divides the work: chunks before `chunk` are computed in
/// full (the cheap front: attention grows with position); from `chunk` on, each stored
/// chunk's layers below `layer` are computed and the rest loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SplitPoint {
    /// The first chunk split at a layer.
    pub chunk: usize,
    /// The first loaded layer of a split chunk.
    pub layer: usize,
}

/// How a layer-split prefill runs.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSplitConfig {
    /// Where the work divides.
    pub split: SplitPoint,
    /// Ranged reads in flight at once.
    pub io_concurrency: usize,
    /// A read running longer than this fails (its chunk is computed in full).
    pub load_timeout_secs: f64,
}

/// The split point with the least predicted TTFT for a context whose chunks are all
/// stored, and that prediction (without the tail): `compute_each` is each chunk's compute
/// time at its position, `load_secs(m)` the time to load the last `m` chunks in full with
/// the reads' concurrency (loading a share of the layers takes that share of the time). The
/// front chunks are computed while the tops of the rest load, then their bottom layers.
pub fn choose_split(
    compute_each: &[f64],
    load_secs: impl Fn(usize) -> f64,
    layers: usize,
) -> (SplitPoint, f64) {
    let n = compute_each.len();
    let mut best = (
        SplitPoint {
            chunk: n,
            layer: layers / 2,
        },
        compute_each.iter().sum::<f64>(),
    );
    for chunk in 0..n {
        let front: f64 = compute_each[..chunk].iter().sum();
        let rest: f64 = compute_each[chunk..].iter().sum();
        let load = load_secs(n - chunk);
        for layer in 1..layers {
            let share = layer as f64 / layers as f64;
            let predicted = (front + share * rest).max((1.0 - share) * load);
            if predicted < best.1 {
                best = (SplitPoint { chunk, layer }, predicted);
            }
        }
    }
    best
}

/// One loaded top, handed from the I/O side to the compute thread (in chunk order).
struct Top<Kv> {
    chunk: usize,
    outcome: LoadOutcome<Kv>,
    secs: f64,
}

/// Prefills `request` divided at `config.split`: the chunks before `split.chunk` computed
/// in full, then each stored chunk's layers below `split.layer` computed while the rest are
/// loaded with ranged reads; chunks with no stored cache, or whose top does not load, are
/// computed in full; then the tail. Compute-only and load-only requests
/// are refused (they have no split). Dropping the future stops the reads and the compute
/// thread at its next step.
pub async fn prefill_layer_split<C, L>(
    compute: Arc<C>,
    loader: Arc<L>,
    request: PrefillRequest<L::Key>,
    config: &LayerSplitConfig,
) -> Result<Filled<C>>
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    check_request(&request, compute.max_tokens())?;
    if request.mode != Mode::Bidirectional {
        return Err(SchedulerError::InvalidSetting(format!(
            "a layer split is a bidirectional prefill, not {}",
            request.mode
        )));
    }
    let layers = compute.layers();
    if config.split.layer == 0 || config.split.layer >= layers {
        return Err(SchedulerError::InvalidSetting(format!(
            "split layer {} of {layers}: at least one layer is computed and one loaded",
            config.split.layer
        )));
    }
    let started = Instant::now();
    let split = config.split;
    let stored: Vec<(usize, L::Key, Arc<[u32]>)> = request
        .chunks
        .iter()
        .enumerate()
        .skip(split.chunk)
        .filter_map(|(i, c)| Some((i, c.stored.as_ref()?.key.clone(), c.tokens.clone())))
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
        for (chunk, key, tokens) in stored {
            let (loader, permits) = (loader.clone(), permits.clone());
            set.spawn(async move {
                let _permit = permits.acquire_owned().await;
                let began = Instant::now();
                let read = loader.load_layers(&key, &tokens, split.layer..layers);
                let outcome = load_within(timeout, read).await;
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
    filled.map_err(|e| SchedulerError::WorkerPanicked {
        panic: e.to_string(),
    })?
}

/// Sets the flag when dropped: a cancelled prefill stops its compute thread.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The compute thread's state: the cache, the report, the tops that have arrived and the
/// chunks whose tops are awaited.
struct Filler<'a, C: ComputeBackend, S> {
    compute: &'a C,
    request: &'a PrefillRequest<S>,
    split: usize,
    arrivals: &'a mpsc::Receiver<Top<C::Kv>>,
    cancelled: &'a AtomicBool,
    cache: C::Cache,
    report: PrefillReport,
    arrived: HashMap<usize, Top<C::Kv>>,
    /// Chunks whose bottom layers are in the cache and whose top is awaited, oldest first.
    awaiting: VecDeque<usize>,
    store_alive: bool,
}

impl<C: ComputeBackend, S> Filler<'_, C, S> {
    fn check_cancelled(&self) -> Result<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(SchedulerError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// Runs a compute step, adding its time to the report.
    fn timed<T>(&mut self, step: impl FnOnce(&C, &mut C::Cache) -> Result<T>) -> Result<T> {
        let began = Instant::now();
        let out = step(self.compute, &mut self.cache)?;
        self.report.compute_secs += began.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Computes chunk `chunk` in full (after the tops of the chunks before it).
    fn compute_chunk(&mut self, chunk: usize) -> Result<()> {
        let tokens = &self.request.chunks[chunk].tokens;
        self.timed(|c, cache| c.compute(cache, tokens, false))?;
        self.report.chunks_computed += 1;
        self.report.tokens_computed += tokens.len();
        self.report.computed_chunks.push(chunk);
        Ok(())
    }

    /// Moves every top that has arrived into `arrived`; with `wait_for`, blocks until that
    /// chunk's top is among them or no more can come.
    fn receive(&mut self, wait_for: Option<usize>) -> Result<()> {
        loop {
            match self.arrivals.try_recv() {
                Ok(top) => {
                    self.arrived.insert(top.chunk, top);
                }
                Err(mpsc::TryRecvError::Empty)
                    if wait_for.is_some_and(|c| !self.arrived.contains_key(&c)) =>
                {
                    match self.arrivals.recv_timeout(Duration::from_millis(50)) {
                        Ok(top) => {
                            self.arrived.insert(top.chunk, top);
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => self.check_cancelled()?,
                        Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
                    }
                }
                Err(_) => return Ok(()),
            }
        }
    }

    /// Fills the oldest awaited top: with `block`, waiting for it; otherwise only if it
    /// has arrived. A top that does not load has its chunk computed in full (its bottom
    /// layers recomputed to equal values on the way). Returns whether a chunk was finished.
    fn fill_next(&mut self, block: bool) -> Result<bool> {
        let Some(&chunk) = self.awaiting.front() else {
            return Ok(false);
        };
        self.receive(block.then_some(chunk))?;
        let top = match self.arrived.remove(&chunk) {
            Some(top) => Some(top),
            None if block || !self.store_alive => None,
            None => return Ok(false),
        };
        self.awaiting.pop_front();
        let reason = match top {
            Some(Top {
                outcome: LoadOutcome::Loaded { kv, bytes },
                secs,
                ..
            }) => {
                let began = Instant::now();
                match self.compute.fill_top(&mut self.cache, &kv, self.split) {
                    Ok(()) => {
                        let report = &mut self.report;
                        report.import_secs += began.elapsed().as_secs_f64();
                        report.chunks_loaded += 1;
                        report.tokens_loaded += self.request.chunks[chunk].tokens.len();
                        report.bytes_loaded += bytes;
                        report.load_secs += secs;
                        return Ok(true);
                    }
                    Err(e) => MissReason::Rejected(e.to_string()),
                }
            }
            Some(Top {
                outcome: LoadOutcome::Missing(reason),
                ..
            }) => reason,
            Some(Top {
                outcome: LoadOutcome::Failed(why),
                ..
            }) => {
                self.store_alive = false;
                MissReason::StoreFailed(why.to_string())
            }
            // The reads stopped after a failure: the store is down.
            None => {
                self.store_alive = false;
                MissReason::StoreFailed("no read after an earlier failure".into())
            }
        };
        self.report.degraded |= reason.degrades();
        self.report.misses.push(Miss { chunk, reason });
        self.compute_chunk(chunk)?;
        Ok(true)
    }

    /// Fills every awaited top, in order, waiting for each.
    fn fill_all(&mut self) -> Result<()> {
        while self.fill_next(true)? {
            self.check_cancelled()?;
        }
        Ok(())
    }
}

/// The compute thread: bottoms of stored chunks ahead, tops filled in order as they arrive,
/// full computation where a chunk has no stored cache or its top did not load.
fn fill<C: ComputeBackend, S>(
    compute: &C,
    request: &PrefillRequest<S>,
    split: SplitPoint,
    arrivals: &mpsc::Receiver<Top<C::Kv>>,
    cancelled: &AtomicBool,
    started: Instant,
) -> Result<Filled<C>> {
    let mut filler = Filler {
        compute,
        request,
        split: split.layer,
        arrivals,
        cancelled,
        cache: compute.new_cache(),
        report: PrefillReport {
            mode: request.mode,
            chunks: request.chunks.len(),
            split_layer: Some(split.layer),
            loads_issued: request.chunks[split.chunk.min(request.chunks.len())..]
                .iter()
                .filter(|c| c.stored.is_some())
                .count(),
            ..PrefillReport::default()
        },
        arrived: HashMap::new(),
        awaiting: VecDeque::new(),
        store_alive: true,
    };
    for (i, chunk) in request.chunks.iter().enumerate() {
        filler.check_cancelled()?;
        if i >= split.chunk && chunk.stored.is_some() && filler.store_alive {
            filler.timed(|c, cache| c.compute_bottom(cache, &chunk.tokens, split.layer))?;
            filler.awaiting.push_back(i);
            // Tops that are already here are filled now: cheap, and it frees their memory.
            while filler.fill_next(false)? {}
        } else {
            // A chunk computed in full attends to every layer of the chunks before it.
            filler.fill_all()?;
            filler.compute_chunk(i)?;
        }
    }
    filler.fill_all()?;
    let logits = filler.timed(|c, cache| c.compute(cache, &request.tail, true))?;
    let mut report = filler.report;
    report.tokens_computed += request.tail.len();
    report.ttft_secs = started.elapsed().as_secs_f64();
    report.in_context_chunks = in_context_chunks(&request.chunks, &report.computed_chunks);
    Ok(Filled {
        cache: filler.cache,
        logits: logits.ok_or(SchedulerError::EmptyInput)?,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::{SplitPoint, choose_split};

    #[test]
    fn the_plan_balances_compute_and_load_and_computes_the_cheap_front() {
        // Eight equal chunks, loading all as slow as computing all: half the layers each.
        let (split, secs) = choose_split(&[1.0; 8], |m| m as f64, 30);
        assert_eq!(
            split,
            SplitPoint {
                chunk: 0,
                layer: 15
            }
        );
        assert!((secs - 4.0).abs() < 1e-9);
        // Loads free: one layer computed (the least a split computes).
        assert_eq!(
            choose_split(&[1.0; 8], |_| 0.0, 30).0,
            SplitPoint { chunk: 0, layer: 1 }
        );
        // Loads never finish: everything computed, no split.
        assert_eq!(choose_split(&[1.0; 8], |_| f64::INFINITY, 30).0.chunk, 8);
        // Later chunks cost more (attention): the cheap front is computed in full and the
        // expensive back split, which beats splitting every chunk.
        let growing: Vec<f64> = (0..8).map(|i| 1.0 + i as f64).collect();
        let (split, secs) = choose_split(&growing, |m| 2.5 * m as f64, 30);
        assert!(split.chunk > 0, "{split:?}");
        let every_chunk_split = (1..30)
            .map(|k| {
                let share = k as f64 / 30.0;
                (share * growing.iter().sum::<f64>()).max((1.0 - share) * 20.0)
            })
            .fold(f64::INFINITY, f64::min);
        assert!(secs < every_chunk_split, "{secs} vs {every_chunk_split}");
    }
}
