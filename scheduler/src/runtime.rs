//! [`Scheduler`]: the decisions of [`Dispatcher`] carried out by one compute thread and a
//! pool of tokio load tasks.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::decode::{Advance, Decoding, RequestEvent, RequestStream, decode_step};
use super::dispatch::{
    ChunkShape, ComputeStep, Dispatcher, LoadStep, LoadVerdict, NextCompute, RequestId,
    RequestShape,
};
use super::write_back::{self, WriteBackQueue};
use super::{
    BlendChunk, ChunkSpec, ComputeBackend, Filled, LoadBackend, LoadOutcome, MIN_PREFILL_PIECE,
    MissReason, PrefillRequest, Recompute, SchedulerConfig, check_request, in_context_chunks,
    load_within,
};
use crate::error::{Result, SchedulerError};
use crate::sampling::GenerateParams;

/// Counters of a scheduler's life.
#[derive(Debug, Default)]
struct Counters {
    admitted: AtomicU64,
    completed: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
    decode_steps: AtomicU64,
    tokens_decoded: AtomicU64,
    decodes_finished: AtomicU64,
    decodes_cancelled: AtomicU64,
    worker_restarts: AtomicU64,
    peak_decode_batch: AtomicU64,
}

/// A snapshot of a scheduler's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SchedulerStats {
    /// Requests admitted.
    pub admitted: u64,
    /// Requests that got their first token.
    pub completed: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Requests dropped by their caller before finishing.
    pub cancelled: u64,
    /// Chunks written back to the store.
    pub write_backs: u64,
    /// Write-backs left out because the store already held the chunk's prefix cache.
    pub write_backs_skipped: u64,
    /// Write-backs that failed or timed out (logged; the request was not affected).
    pub write_back_failures: u64,
    /// Write-backs dropped because the queue's bytes were full (the store is slower than
    /// the chunks computed).
    pub write_backs_dropped: u64,
    /// Bytes of KV waiting in the write-back queue or being written.
    pub write_back_pending_bytes: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Batched decode steps run.
    pub decode_steps: u64,
    /// Tokens those steps appended, over all sequences.
    pub tokens_decoded: u64,
    /// Sequences that finished decoding (stop token, length, full context).
    pub decodes_finished: u64,
    /// Sequences whose reader went away before they finished.
    pub decodes_cancelled: u64,
    /// Sequences decoding now (or waiting for a place in a step).
    pub decoding: u64,
    /// Times the compute worker panicked in a step and was restarted (the step's requests
    /// failed with an error; the others carried on).
    pub worker_restarts: u64,
    /// The compute worker is running (it stops only when the scheduler shuts down).
    pub worker_alive: bool,
    /// The most sequences one decode step has advanced (at most
    /// [`SchedulerConfig::max_decoding`]).
    pub peak_decode_batch: u64,
}

struct Shared<C: ComputeBackend, L: LoadBackend> {
    state: Mutex<State<C, L>>,
    wake: Condvar,
    compute: Arc<C>,
    loader: Arc<L>,
    epoch: Instant,
    runtime: tokio::runtime::Handle,
    counters: Counters,
    write_back: WriteBackQueue<L::Key, C::Kv>,
}

struct State<C: ComputeBackend, L: LoadBackend> {
    dispatcher: Dispatcher,
    requests: HashMap<RequestId, Active<C, L>>,
    /// Loads in flight, to stop those the dispatcher gives up.
    loads: HashMap<LoadStep, tokio::task::AbortHandle>,
    /// Sequences decoding, in arrival order (those in a running step are out of it).
    decoding: VecDeque<Decoding<C>>,
    /// Sequences in the decode step running now.
    stepping: usize,
    /// The request whose prefill step is running now (its cache is out of its entry).
    running: Option<RequestId>,
    /// Seconds the last decode step took (sizes the prefill pieces between steps).
    last_decode_step_secs: f64,
    shutdown: bool,
}

impl<C: ComputeBackend, L: LoadBackend> State<C, L> {
    /// Stops the loads the dispatcher gave up (their slots are already free there).
    fn abort_given_up_loads(&mut self) {
        for step in self.dispatcher.take_aborted_loads() {
            if let Some(load) = self.loads.remove(&step) {
                load.abort();
            }
        }
    }
}

/// The data of a request in flight (the dispatcher holds only its bookkeeping).
struct Active<C: ComputeBackend, L: LoadBackend> {
    chunks: Vec<ChunkSpec<L::Key>>,
    tail: Arc<[u32]>,
    /// Cache index of each chunk's first token, and the tail's.
    starts: Vec<usize>,
    /// Taken by the compute thread while it runs a step.
    cache: Option<C::Cache>,
    /// Loaded caches waiting for the compute front.
    staged: HashMap<usize, C::Kv>,
    /// Chunks imported from loaded caches, in order (those from chunk caches are blended
    /// with the tail).
    imported: Vec<usize>,
    reply: Option<Reply<C>>,
}

/// Where a request's prefill goes when it is done.
enum Reply<C: ComputeBackend> {
    /// Back to a [`Scheduler::prefill`] caller, cache and logits.
    Filled(oneshot::Sender<Result<Filled<C>>>),
    /// Straight on to decoding in the compute loop ([`Scheduler::submit`]).
    Generate {
        params: GenerateParams,
        events: mpsc::UnboundedSender<RequestEvent>,
    },
}

impl<C: ComputeBackend> Reply<C> {
    /// Tells the caller the request failed.
    fn fail(self, error: SchedulerError) {
        match self {
            Reply::Filled(reply) => {
                let _ = reply.send(Err(error));
            }
            Reply::Generate { events, .. } => {
                let _ = events.send(RequestEvent::Failed(error));
            }
        }
    }
}

/// Bidirectional prefill for many requests at once: one compute thread runs the engine, an
/// I/O pool of tokio tasks loads stored chunks, and a [`Dispatcher`] decides who gets which.
pub struct Scheduler<C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> {
    shared: Arc<Shared<C, L>>,
    worker: Option<JoinHandle<()>>,
}

impl<C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> Scheduler<C, L> {
    /// Starts the compute thread. Loads run on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn start(compute: Arc<C>, loader: Arc<L>, config: SchedulerConfig) -> Self {
        let runtime = tokio::runtime::Handle::current();
        let write_back = WriteBackQueue::start(
            loader.clone(),
            &runtime,
            config.write_back_queue_bytes,
            Duration::from_secs_f64(config.write_back_timeout_secs.max(1e-3)),
        );
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                dispatcher: Dispatcher::new(config),
                requests: HashMap::new(),
                loads: HashMap::new(),
                decoding: VecDeque::new(),
                stepping: 0,
                running: None,
                last_decode_step_secs: 0.0,
                shutdown: false,
            }),
            wake: Condvar::new(),
            compute,
            loader,
            epoch: Instant::now(),
            runtime,
            counters: Counters::default(),
            write_back,
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ragcake-compute".into())
                .spawn(move || supervise(shared))
                .expect("spawn the compute thread")
        };
        Self {
            shared,
            worker: Some(worker),
        }
    }

    /// The configuration.
    pub fn config(&self) -> SchedulerConfig {
        self.shared.lock().dispatcher.config().clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SchedulerStats {
        let (in_flight, decoding) = {
            let state = self.shared.lock();
            (
                state.dispatcher.in_flight(),
                state.decoding.len() + state.stepping,
            )
        };
        let c = &self.shared.counters;
        let w = &self.shared.write_back.counts;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SchedulerStats {
            admitted: l(&c.admitted),
            completed: l(&c.completed),
            failed: l(&c.failed),
            cancelled: l(&c.cancelled),
            write_backs: l(&w.written),
            write_backs_skipped: l(&w.skipped),
            write_back_failures: l(&w.failed),
            write_backs_dropped: l(&w.dropped),
            write_back_pending_bytes: w.pending_bytes.load(Ordering::Relaxed) as u64,
            decode_steps: l(&c.decode_steps),
            tokens_decoded: l(&c.tokens_decoded),
            decodes_finished: l(&c.decodes_finished),
            decodes_cancelled: l(&c.decodes_cancelled),
            worker_restarts: l(&c.worker_restarts),
            peak_decode_batch: l(&c.peak_decode_batch),
            worker_alive: self.worker.as_ref().is_some_and(|w| !w.is_finished()),
            in_flight: in_flight as u64,
            decoding: decoding as u64,
        }
    }

    /// Submits one question's prompt: fills its cache (bidirectional prefill, beside every
    /// other request in flight) and generates from it with `params` in the shared decode
    /// loop. The stream reports the prefill ([`RequestEvent::Prefilled`]), then the tokens,
    /// then the end; the cache and logits never leave the scheduler. Dropping the stream
    /// cancels the request wherever it is.
    pub fn submit(
        &self,
        request: PrefillRequest<L::Key>,
        params: GenerateParams,
    ) -> Result<RequestStream> {
        // Bad sampling settings fail here, before any prefill work.
        params.sampling.validate()?;
        let (events, receiver) = mpsc::unbounded_channel();
        let id = self.admit(request, Reply::Generate { params, events })?;
        let shared = self.shared.clone();
        Ok(RequestStream {
            events: receiver,
            cancel: Some(Box::new(move || cancel_request(&shared, id))),
        })
    }

    /// Fills a cache with the request's chunks and tail and returns it with the logits of
    /// the last token, for a caller that works on the cache itself (a benchmark comparing
    /// caches; [`Scheduler::submit`] is the one call of a question). Dropping the future
    /// cancels the request and frees what it held.
    pub async fn prefill(&self, request: PrefillRequest<L::Key>) -> Result<Filled<C>> {
        let (reply, answer) = oneshot::channel();
        let id = self.admit(request, Reply::Filled(reply))?;
        let mut guard = CancelOnDrop {
            shared: &self.shared,
            id,
            armed: true,
        };
        let result = answer
            .await
            .unwrap_or_else(|_| Err(SchedulerError::ShutDown));
        guard.armed = false;
        result
    }

    /// Checks and admits a request; its prefill ends in `reply`.
    fn admit(&self, mut request: PrefillRequest<L::Key>, reply: Reply<C>) -> Result<RequestId> {
        let starts = check_request(&request, self.shared.compute.max_tokens())?;
        if request.chunks.iter().any(|c| c.recompute.load_paid) {
            let (costs, io_concurrency) = {
                let state = self.shared.lock();
                let dispatcher = &state.dispatcher;
                (
                    dispatcher.costs().clone(),
                    dispatcher.config().io_concurrency,
                )
            };
            let tail_start = starts.last().copied().unwrap_or(0);
            let share = super::load_paid_share(
                &request.chunks,
                &starts,
                (tail_start, request.tail.len()),
                &costs,
                io_concurrency,
                self.shared.compute.layers(),
            );
            super::plan::raise_load_paid(&mut request.chunks, share);
        }
        let shape = RequestShape {
            chunks: request
                .chunks
                .iter()
                .map(|c| ChunkShape {
                    tokens: c.tokens.len(),
                    stored: c.stored.is_some(),
                    recompute_share: blended(c)
                        .map_or(0.0, |r| r.compute_share(self.shared.compute.layers())),
                })
                .collect(),
            tail_tokens: request.tail.len(),
            mode: request.mode,
            probe_share: request
                .chunks
                .iter()
                .filter_map(blended)
                .map(|r| r.rule.probe_share(self.shared.compute.layers()))
                .fold(0.0, f64::max),
            layers: self.shared.compute.layers(),
        };
        let id = {
            let mut state = self.shared.lock();
            if state.shutdown {
                return Err(SchedulerError::ShutDown);
            }
            let now = self.shared.now();
            let id = state.dispatcher.admit(now, shape);
            state.requests.insert(
                id,
                Active {
                    chunks: request.chunks,
                    tail: request.tail.into(),
                    starts,
                    cache: Some(self.shared.compute.new_cache()),
                    staged: HashMap::new(),
                    imported: Vec::new(),
                    reply: Some(reply),
                },
            );
            self.shared
                .counters
                .admitted
                .fetch_add(1, Ordering::Relaxed);
            pump_loads(&self.shared, &mut state);
            id
        };
        self.shared.wake.notify_all();
        Ok(id)
    }
}

impl<C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> Scheduler<C, L> {
    /// Generates from a filled cache (what [`Scheduler::prefill`] returned): the first token
    /// is sampled from `logits` at once, the next ones by batched decode steps that the
    /// compute thread runs for every decoding sequence between prefill steps. Tokens stream
    /// through the returned [`RequestStream`]; dropping it stops the generation.
    pub fn decode(
        &self,
        cache: C::Cache,
        logits: &C::Logits,
        params: GenerateParams,
    ) -> Result<RequestStream> {
        let (events, receiver) = mpsc::unbounded_channel();
        start_decoding(&self.shared, cache, logits, params, events)?;
        Ok(RequestStream {
            events: receiver,
            cancel: None,
        })
    }
}

impl<C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> Drop for Scheduler<C, L> {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

/// Cancels the request when its caller stops waiting.
struct CancelOnDrop<'a, C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> {
    shared: &'a Arc<Shared<C, L>>,
    id: RequestId,
    armed: bool,
}

impl<C: ComputeBackend, L: LoadBackend<Kv = C::Kv>> Drop for CancelOnDrop<'_, C, L> {
    fn drop(&mut self) {
        if self.armed {
            cancel_request(self.shared, self.id);
        }
    }
}

/// Withdraws request `id` if its prefill is still in flight (nothing, once it is done).
fn cancel_request<C, L>(shared: &Arc<Shared<C, L>>, id: RequestId)
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let mut state = shared.lock();
    let withdrawn = state.dispatcher.cancel(id).is_some();
    if withdrawn {
        shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
    }
    if state.requests.remove(&id).is_none() && !withdrawn {
        return;
    }
    state.abort_given_up_loads();
    // Freed I/O slots and compute go to the others.
    pump_loads(shared, &mut state);
    drop(state);
    shared.wake.notify_all();
}

/// Samples a filled cache's first token and queues the sequence for the decode loop (or
/// counts its end), under the state's lock: a reader who got the first token finds the
/// sequence counted as decoding, never in between.
fn start_decoding<C, L>(
    shared: &Shared<C, L>,
    cache: C::Cache,
    logits: &C::Logits,
    params: GenerateParams,
    events: mpsc::UnboundedSender<RequestEvent>,
) -> Result<()>
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let mut state = shared.lock();
    match Decoding::start(&*shared.compute, cache, logits, params, events)? {
        Advance::Done | Advance::Cancelled => {
            shared
                .counters
                .decodes_finished
                .fetch_add(1, Ordering::Relaxed);
        }
        Advance::Continue(sequence) => {
            if state.shutdown {
                sequence.fail(SchedulerError::ShutDown);
            } else {
                state.decoding.push_back(*sequence);
                drop(state);
                shared.wake.notify_all();
            }
        }
    }
    Ok(())
}

impl<C: ComputeBackend, L: LoadBackend> Shared<C, L> {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn lock(&self) -> MutexGuard<'_, State<C, L>> {
        // A panic while holding the lock leaves consistent-enough bookkeeping; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Issues every load the dispatcher allows now.
fn pump_loads<C, L>(shared: &Arc<Shared<C, L>>, state: &mut State<C, L>)
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    while let Some(step) = state.dispatcher.next_load(shared.now()) {
        let Some(active) = state.requests.get(&step.request) else {
            continue;
        };
        let chunk = &active.chunks[step.chunk];
        let (Some(key), tokens) = (
            chunk.stored.as_ref().map(|s| s.key.clone()),
            chunk.tokens.clone(),
        ) else {
            state.dispatcher.load_done(
                shared.now(),
                step,
                LoadOutcome::Missing(MissReason::Absent),
            );
            continue;
        };
        let shared = shared.clone();
        let timeout = Duration::from_secs_f64(state.dispatcher.config().load_timeout_secs.max(0.0));
        let layers = shared.compute.layers();
        let load = shared.runtime.clone().spawn(async move {
            let outcome = if step.first_layer == 0 {
                load_within(timeout, shared.loader.load(&key, &tokens)).await
            } else {
                let read = shared
                    .loader
                    .load_layers(&key, &tokens, step.first_layer..layers);
                load_within(timeout, read).await
            };
            finish_load(&shared, step, outcome);
        });
        state.loads.insert(step, load.abort_handle());
    }
}

fn finish_load<C, L>(shared: &Arc<Shared<C, L>>, step: LoadStep, outcome: LoadOutcome<C::Kv>)
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let mut state = shared.lock();
    if state.loads.remove(&step).is_none() {
        return; // given up while it finished
    }
    let now = shared.now();
    if let LoadOutcome::Failed(error) = &outcome {
        tracing::warn!(%error, "KV store load failed; computing instead");
    }
    let (result, kv) = outcome.take_kv();
    if state.dispatcher.load_done(now, step, result) == LoadVerdict::Keep
        && let (Some(active), Some(kv)) = (state.requests.get_mut(&step.request), kv)
    {
        active.staged.insert(step.chunk, kv);
    }
    pump_loads(shared, &mut state);
    drop(state);
    shared.wake.notify_all();
}

/// How a chunk's loaded cache is blended in: only a position-independent chunk cache, and
/// only when some of its tokens are recomputed or the tail corrects its attention to it.
fn blended<K>(chunk: &ChunkSpec<K>) -> Option<Recompute> {
    let recompute = chunk.recompute;
    (chunk.loads_chunk_cache()
        && (recompute.tokens(chunk.tokens.len()) > 0 || recompute.correct_attention))
        .then_some(recompute)
}

/// What the compute thread runs for a step, taken out of the state so the lock is free
/// while it runs.
enum Work<Kv> {
    Import(Option<Kv>),
    /// The top layers from the given one on, loaded.
    FillTop(Option<Kv>, usize),
    Compute(Arc<[u32]>),
    /// The bottom layers (this many) of a chunk's tokens.
    Bottom(Arc<[u32]>, usize),
    /// The tail, and the imported chunk caches blended in the same pass.
    Tail(Arc<[u32]>, Vec<BlendChunk>),
}

/// Runs the compute loop, and runs it again after a panic: the request whose step panicked
/// fails with an error (the sequences of a decode step that panicked see their stream end),
/// every other request carries on. A bug or a fault in one step must not wedge all prefill
/// while `/healthz` says all is well.
fn supervise<C, L>(shared: Arc<Shared<C, L>>)
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    loop {
        let run = std::panic::catch_unwind(AssertUnwindSafe(|| compute_loop(shared.clone())));
        let Err(panic) = run else {
            return; // shut down
        };
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        tracing::error!(%what, "the compute worker panicked; failing its step and restarting");
        shared
            .counters
            .worker_restarts
            .fetch_add(1, Ordering::Relaxed);
        let mut state = shared.lock();
        state.stepping = 0;
        if let Some(id) = state.running.take() {
            state.dispatcher.cancel(id);
            state.abort_given_up_loads();
            shared.counters.failed.fetch_add(1, Ordering::Relaxed);
            if let Some(mut active) = state.requests.remove(&id)
                && let Some(reply) = active.reply.take()
            {
                reply.fail(SchedulerError::WorkerPanicked { panic: what });
            }
        }
        drop(state);
        // A fault that repeats outside any step must not spin a core.
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn compute_loop<C, L>(shared: Arc<Shared<C, L>>)
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let mut state = shared.lock();
    loop {
        if state.shutdown {
            for (_, mut active) in state.requests.drain() {
                if let Some(reply) = active.reply.take() {
                    reply.fail(SchedulerError::ShutDown);
                }
            }
            for sequence in state.decoding.drain(..) {
                sequence.fail(SchedulerError::ShutDown);
            }
            return;
        }
        // Decode first: every decoding sequence advances one token per turn of this loop,
        // with at most one prefill step between two decode steps.
        if !state.decoding.is_empty() {
            state = run_decode_step(&shared, state);
        }
        let now = shared.now();
        let next = state.dispatcher.next_compute(now);
        if matches!(next, NextCompute::Run(ComputeStep::Compute { .. })) {
            // An overtaken load frees its I/O slot for the next one now.
            state.abort_given_up_loads();
            pump_loads(&shared, &mut state);
        }
        let step = match next {
            NextCompute::Run(step) => step,
            NextCompute::Wait(_) if !state.decoding.is_empty() => continue,
            NextCompute::Wait(recheck) => {
                // Woken by admissions, finished loads and cancellations; the timeout only
                // covers rechecks of waiting decisions (and bounds the wait).
                let wait = recheck.map_or(0.5, |at| (at - now).clamp(0.0, 0.5));
                state = shared
                    .wake
                    .wait_timeout(state, Duration::from_secs_f64(wait))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
                continue;
            }
        };
        let Some(active) = state.requests.get_mut(&step.request()) else {
            continue;
        };
        let Some(mut cache) = active.cache.take() else {
            continue;
        };
        let work = match step {
            ComputeStep::Import { chunk, .. } => Work::Import(active.staged.remove(&chunk)),
            ComputeStep::FillTop {
                chunk, first_layer, ..
            } => Work::FillTop(active.staged.remove(&chunk), first_layer),
            ComputeStep::Compute { chunk, .. } => {
                Work::Compute(active.chunks[chunk].tokens.clone())
            }
            ComputeStep::Bottom { chunk, layers, .. } => {
                Work::Bottom(active.chunks[chunk].tokens.clone(), layers)
            }
            ComputeStep::Tail { .. } => {
                let blends = active
                    .imported
                    .iter()
                    .filter_map(|&i| {
                        let spec = &active.chunks[i];
                        blended(spec).map(|recompute| BlendChunk {
                            tokens: spec.tokens.clone(),
                            start: active.starts[i],
                            recompute,
                        })
                    })
                    .collect();
                Work::Tail(active.tail.clone(), blends)
            }
        };
        state.running = Some(step.request());
        drop(state);

        let started = Instant::now();
        let compute = &shared.compute;
        let mut tokens_recomputed = 0;
        // Decode steps run between the pieces of a chunk: not this step's compute time.
        let mut decode_secs = 0.0;
        let outcome = match work {
            Work::Import(Some(kv)) => compute.import(&mut cache, &kv).map(|()| None),
            Work::FillTop(Some(kv), first_layer) => compute
                .fill_top(&mut cache, &kv, first_layer)
                .map(|()| None),
            Work::Import(None) | Work::FillTop(None, _) => Err(SchedulerError::LoadedChunkMissing),
            Work::Bottom(tokens, layers) => compute
                .compute_bottom(&mut cache, &tokens, layers)
                .map(|()| None),
            Work::Compute(tokens) => {
                compute_beside_decoding(&shared, step, &mut cache, &tokens, &mut decode_secs)
                    .map(|()| None)
            }
            Work::Tail(tokens, blends) => {
                compute
                    .compute_tail(&mut cache, &tokens, &blends)
                    .map(|(logits, recomputed)| {
                        tokens_recomputed = recomputed;
                        Some(logits)
                    })
            }
        };
        let secs = started.elapsed().as_secs_f64() - decode_secs;

        state = shared.lock();
        state.running = None;
        let now = shared.now();
        if tokens_recomputed > 0 {
            state
                .dispatcher
                .recomputed(step.request(), tokens_recomputed);
        }
        match outcome {
            Ok(logits) => {
                let Some(active) = state.requests.get_mut(&step.request()) else {
                    continue; // cancelled meanwhile
                };
                active.cache = Some(cache);
                if let ComputeStep::Import { chunk, .. } | ComputeStep::FillTop { chunk, .. } = step
                {
                    active.imported.push(chunk);
                }
                if let Some(report) = state.dispatcher.compute_done(now, step, secs) {
                    let active = state.requests.remove(&step.request()).expect("present");
                    let logits = logits.expect("the tail asks for logits");
                    let write_back = state.dispatcher.config().write_back;
                    // Exports run in finish_request: not under the lock the loads need.
                    drop(state);
                    finish_request(&shared, active, logits, report, write_back);
                    state = shared.lock();
                }
            }
            Err(error)
                if matches!(
                    step,
                    ComputeStep::Import { .. } | ComputeStep::FillTop { .. }
                ) =>
            {
                // A loaded cache that does not fit is a miss, not a failure: compute it.
                tracing::warn!(%error, "loaded KV could not be imported; computing instead");
                state.dispatcher.import_failed(step, error.to_string());
                if let Some(active) = state.requests.get_mut(&step.request()) {
                    active.cache = Some(cache);
                }
            }
            Err(error) => {
                state.dispatcher.compute_failed(step);
                shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                if let Some(mut active) = state.requests.remove(&step.request())
                    && let Some(reply) = active.reply.take()
                {
                    reply.fail(error);
                }
            }
        }
        pump_loads(&shared, &mut state);
    }
}

/// Computes a chunk's `tokens` into `cache`: whole when no answer is decoding, else in
/// pieces ([`prefill_piece`]) with a decode step after each, so a long chunk does not stall
/// the answers being generated (chunked prefill beside decode).
/// Stops early when the request was cancelled meanwhile (its cache is dropped). Adds the
/// seconds spent decoding to `decode_secs`.
fn compute_beside_decoding<C, L>(
    shared: &Shared<C, L>,
    step: ComputeStep,
    cache: &mut C::Cache,
    tokens: &[u32],
    decode_secs: &mut f64,
) -> Result<()>
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let mut done = 0;
    while done < tokens.len() {
        let (decoding, piece) = {
            let state = shared.lock();
            if !state.requests.contains_key(&step.request()) {
                return Ok(());
            }
            (
                !state.decoding.is_empty(),
                prefill_piece(&state, step, done),
            )
        };
        let end = if decoding {
            (done + piece).min(tokens.len())
        } else {
            tokens.len()
        };
        shared.compute.compute(cache, &tokens[done..end], false)?;
        done = end;
        if decoding && done < tokens.len() {
            let started = Instant::now();
            drop(run_decode_step(shared, shared.lock()));
            *decode_secs += started.elapsed().as_secs_f64();
        }
    }
    Ok(())
}

/// Tokens of the next prefill piece beside decode, `done` tokens into `step`'s chunk: what
/// fits, by the cost model, in the time per output token aimed at besides the last decode
/// step, within [`MIN_PREFILL_PIECE`]..=[`SchedulerConfig::prefill_step_tokens`].
fn prefill_piece<C: ComputeBackend, L: LoadBackend>(
    state: &State<C, L>,
    step: ComputeStep,
    done: usize,
) -> usize {
    let config = state.dispatcher.config();
    let most = config.prefill_step_tokens.max(1);
    let ComputeStep::Compute { request, chunk } = step else {
        return most;
    };
    if config.tpot_target_secs <= 0.0 {
        return most;
    }
    let room = config.tpot_target_secs - state.last_decode_step_secs;
    let position = state.dispatcher.position(request, chunk).unwrap_or(0) + done;
    let per_token = state.dispatcher.costs().compute_secs(most, position) / most as f64;
    let fits = if per_token > 0.0 {
        (room.max(0.0) / per_token) as usize
    } else {
        most
    };
    fits.clamp(MIN_PREFILL_PIECE.min(most), most)
}

/// Runs one decode step for the first [`SchedulerConfig::max_decoding`] sequences (those
/// whose reader went away leave without it), the lock released meanwhile.
fn run_decode_step<'a, C, L>(
    shared: &'a Shared<C, L>,
    mut state: MutexGuard<'a, State<C, L>>,
) -> MutexGuard<'a, State<C, L>>
where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    let counters = &shared.counters;
    let most = state.dispatcher.config().max_decoding.max(1);
    let mut batch = Vec::with_capacity(most.min(state.decoding.len()));
    while batch.len() < most
        && let Some(sequence) = state.decoding.pop_front()
    {
        if sequence.is_cancelled() {
            counters.decodes_cancelled.fetch_add(1, Ordering::Relaxed);
        } else {
            batch.push(sequence);
        }
    }
    if batch.is_empty() {
        return state;
    }
    state.stepping = batch.len();
    drop(state);
    let tokens = batch.len() as u64;
    counters
        .peak_decode_batch
        .fetch_max(tokens, Ordering::Relaxed);
    let started = Instant::now();
    let (going_on, outcome) = decode_step(&*shared.compute, batch);
    let step_secs = started.elapsed().as_secs_f64();
    counters.decode_steps.fetch_add(1, Ordering::Relaxed);
    counters.tokens_decoded.fetch_add(tokens, Ordering::Relaxed);
    counters
        .decodes_finished
        .fetch_add(outcome.ended as u64, Ordering::Relaxed);
    counters
        .decodes_cancelled
        .fetch_add(outcome.cancelled as u64, Ordering::Relaxed);
    let mut state = shared.lock();
    state.stepping = 0;
    state.last_decode_step_secs = step_secs;
    // Back ahead of the sequences that arrived meanwhile: running ones keep their place.
    for sequence in going_on.into_iter().rev() {
        state.decoding.push_front(sequence);
    }
    state
}

/// Replies, then queues the chunks computed in context for write-back, off the TTFT path.
/// Their KV is exported before the reply: the caller may reuse the cache's buffers at once.
fn finish_request<C, L>(
    shared: &Arc<Shared<C, L>>,
    mut active: Active<C, L>,
    logits: C::Logits,
    mut report: super::PrefillReport,
    write_back: bool,
) where
    C: ComputeBackend,
    L: LoadBackend<Kv = C::Kv>,
{
    shared.counters.completed.fetch_add(1, Ordering::Relaxed);
    let cache = active.cache.take().expect("the cache is back");
    report.in_context_chunks = in_context_chunks(&active.chunks, &report.computed_chunks);
    let mut jobs = Vec::new();
    if write_back {
        for &i in &report.computed_chunks {
            let Some(dest) = active.chunks[i].write_back.clone() else {
                continue;
            };
            if i >= report.in_context_chunks {
                continue;
            }
            let range = active.starts[i]..active.starts[i + 1];
            match shared.compute.export(&cache, range) {
                Ok(kv) => jobs.push(write_back::Job {
                    bytes: shared.compute.kv_bytes(&kv),
                    dest,
                    tokens: active.chunks[i].tokens.clone(),
                    kv,
                }),
                Err(error) => {
                    tracing::warn!(%error, "a computed chunk could not be exported for write-back");
                    shared
                        .write_back
                        .counts
                        .failed
                        .fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
    match active.reply.take() {
        Some(Reply::Filled(reply)) => {
            let _ = reply.send(Ok(Filled {
                cache,
                logits,
                report,
            }));
        }
        Some(Reply::Generate { params, events })
            if events
                .send(RequestEvent::Prefilled(Box::new(report)))
                .is_ok() =>
        {
            let failed = events.clone();
            if let Err(error) = start_decoding(shared, cache, &logits, params, events) {
                let _ = failed.send(RequestEvent::Failed(error));
            }
        }
        // The reader went away: nothing to decode for.
        Some(Reply::Generate { .. }) | None => {}
    }
    if !jobs.is_empty() {
        shared.write_back.offer(jobs);
    }
}
