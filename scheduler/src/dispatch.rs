//! The scheduler's decisions, free of threads, clocks and data: which chunk of which request
//! the compute worker takes next, which stored chunk the loader fetches next, and what a
//! finished step changes. Time is seconds since the scheduler started, passed in by the
//! driver, so the same logic runs under the real runtime and under the discrete-event
//! simulator (deterministic tests and what-if sweeps).

use std::collections::BTreeMap;

use super::{
    ChunkTiming, LoadOutcome, Miss, MissReason, Mode, Policy, PrefillReport, SchedulerConfig,
};

/// A request's handle inside the scheduler.
pub type RequestId = u64;

/// What the scheduler knows of one chunk before prefill starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkShape {
    /// Tokens in the chunk.
    pub tokens: usize,
    /// Whether a stored cache exists (an index or HEAD lookup said so; the load may still miss).
    pub stored: bool,
    /// Compute a loaded cache of it still costs, as a share of computing it whole: the
    /// recomputation that blends a position-independent cache in (0 for exact caches).
    pub recompute_share: f64,
}

/// A request as the dispatcher sees it: chunk sizes and cache status, the tail, the mode.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestShape {
    /// The context's chunks in prompt order (the preamble, if any, is the first).
    pub chunks: Vec<ChunkShape>,
    /// Tokens of the question tail, computed last (at least one: it yields the logits).
    pub tail_tokens: usize,
    /// How this request fills its cache.
    pub mode: Mode,
    /// The pass of the question over the loaded caches that blending runs first to choose
    /// the tokens recomputed ([`crate::RecomputeRule::Query`]), as a share of
    /// one pass of the tail (0: none); charged with the first blended chunk.
    pub probe_share: f64,
    /// Layers of the model's cache. With two or more, a stored exact chunk may be filled
    /// split at a layer boundary (bottom layers computed, top layers loaded); 0 never splits.
    pub layers: usize,
}

impl RequestShape {
    /// Compute seconds of blending chunk `chunk` of `compute_secs` in, with the question
    /// probe when this is the first chunk blended (`blended_so_far` is 0) and the request
    /// probes; `tail_secs` is the tail's own cost.
    pub(crate) fn blend_secs(
        &self,
        chunk: usize,
        compute_secs: f64,
        blended_so_far: f64,
        tail_secs: impl FnOnce() -> f64,
    ) -> f64 {
        let share = self.chunks[chunk].recompute_share;
        let probe = if share > 0.0 && blended_so_far == 0.0 && self.probe_share > 0.0 {
            tail_secs() * self.probe_share
        } else {
            0.0
        };
        share * compute_secs + probe
    }
}

/// A unit of work for the compute worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeStep {
    /// Append the loaded cache of chunk `chunk` (re-rotated to its position if needed).
    Import {
        /// The request.
        request: RequestId,
        /// The chunk.
        chunk: usize,
    },
    /// Compute chunk `chunk` in context.
    Compute {
        /// The request.
        request: RequestId,
        /// The chunk.
        chunk: usize,
    },
    /// Compute the bottom `layers` layers of chunk `chunk` while a ranged read loads the
    /// rest (the layer split of the chunk where the two sides meet).
    Bottom {
        /// The request.
        request: RequestId,
        /// The chunk.
        chunk: usize,
        /// Layers computed.
        layers: usize,
    },
    /// Fill the top layers (`first_layer..`) of chunk `chunk`, whose bottom layers were
    /// computed, with their loaded cache.
    FillTop {
        /// The request.
        request: RequestId,
        /// The chunk.
        chunk: usize,
        /// The first loaded layer.
        first_layer: usize,
    },
    /// Compute the question tail and produce the first token's logits.
    Tail {
        /// The request.
        request: RequestId,
    },
}

impl ComputeStep {
    /// The request the step belongs to.
    pub fn request(&self) -> RequestId {
        match *self {
            Self::Import { request, .. }
            | Self::Compute { request, .. }
            | Self::Bottom { request, .. }
            | Self::FillTop { request, .. }
            | Self::Tail { request } => request,
        }
    }
}

/// The compute worker's next move.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NextCompute {
    /// Run this step.
    Run(ComputeStep),
    /// Nothing runnable now; look again when something finishes or at this time (a waiting
    /// decision may flip then: an in-flight load has taken longer than computing would).
    Wait(Option<f64>),
}

/// A load for the I/O pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LoadStep {
    /// The request.
    pub request: RequestId,
    /// The chunk whose stored cache to fetch.
    pub chunk: usize,
    /// The first layer to fetch: 0 reads the whole cache, more a ranged read of the top
    /// layers (the compute worker computes the layers below).
    pub first_layer: usize,
}

/// What the driver does with the data of a finished load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadVerdict {
    /// Keep it: the compute worker will import it.
    Keep,
    /// Drop it: the chunk was computed meanwhile, or the request is gone.
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Slot {
    Pending,
    /// A load in flight of the layers from `first_layer` on.
    Loading {
        since: f64,
        first_layer: usize,
    },
    /// Loaded from `first_layer` on.
    Loaded {
        first_layer: usize,
    },
    Computing,
    Filled,
}

#[derive(Debug)]
struct Request {
    arrival: f64,
    shape: RequestShape,
    /// Per chunk: whether the loader may still try it.
    loadable: Vec<bool>,
    slots: Vec<Slot>,
    /// Position of each chunk's first token.
    positions: Vec<usize>,
    /// The compute front: chunks before it are in the cache.
    next: usize,
    tail_started: bool,
    loads_in_flight: usize,
    /// Expected seconds of blending the chunk caches imported so far, done with the tail.
    pending_blend_secs: f64,
    /// Bottom layers of the front chunk (`next`) in the cache, its top awaited.
    bottom: usize,
    /// A step computing the front chunk's bottom layers is running.
    computing_bottom: bool,
    report: PrefillReport,
}

impl Request {
    fn new(arrival: f64, shape: RequestShape) -> Self {
        let n = shape.chunks.len();
        let positions = chunk_starts(shape.chunks.iter().map(|c| c.tokens));
        let loadable = shape
            .chunks
            .iter()
            .map(|c| c.stored && shape.mode != Mode::ComputeOnly)
            .collect();
        let report = PrefillReport {
            mode: shape.mode,
            chunks: n,
            chunk_timings: vec![ChunkTiming::default(); n],
            ..PrefillReport::default()
        };
        Self {
            arrival,
            loadable,
            slots: vec![Slot::Pending; n],
            positions,
            next: 0,
            tail_started: false,
            loads_in_flight: 0,
            pending_blend_secs: 0.0,
            bottom: 0,
            computing_bottom: false,
            report,
            shape,
        }
    }

    fn tail_position(&self) -> usize {
        self.positions[self.shape.chunks.len()]
    }

    /// The chunk the loader would fetch next: the last one not yet claimed (loads walk
    /// from the back).
    fn load_candidate(&self) -> Option<usize> {
        (self.next..self.slots.len())
            .rev()
            .find(|&i| self.slots[i] == Slot::Pending && self.loadable[i])
    }

    /// The share of a chunk's bytes that a read of its layers from `first_layer` on moves.
    fn read_share(&self, first_layer: usize) -> f64 {
        1.0 - layer_share(first_layer, self.shape.layers)
    }

    fn miss(&mut self, chunk: usize, reason: MissReason) {
        if reason.degrades() {
            self.report.degraded = true;
        }
        self.report.misses.push(Miss { chunk, reason });
    }
}

/// The share of a model's `layers` layers below `layer` (0 for a model of no layers).
pub(crate) fn layer_share(layer: usize, layers: usize) -> f64 {
    if layers == 0 {
        0.0
    } else {
        layer.min(layers) as f64 / layers as f64
    }
}

/// The position of each chunk's first token, then the position after the last chunk (where
/// the tail starts), for chunks of the given lengths laid out from position 0.
pub fn chunk_starts(lengths: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut starts = vec![0];
    for len in lengths {
        starts.push(starts[starts.len() - 1] + len);
    }
    starts
}

/// Online cost estimates: compute time of a chunk at a position, load time of a chunk.
#[derive(Debug, Clone)]
pub struct CostModel {
    compute_per_token: f64,
    compute_per_token_per_position: f64,
    /// Observed / predicted compute time (EWMA): the prior's shape, scaled to this machine.
    compute_scale: f64,
    /// Seconds per token of one load (EWMA), latency included, raised by loads given up
    /// after longer than that.
    load_per_token: f64,
    /// The same from finished loads only (the prior until one finishes): what a load
    /// takes when the store is healthy, against which a stall is judged.
    finished_load_per_token: f64,
    loads_seen: u64,
}

const EWMA: f64 = 0.3;

/// Compute steps shorter than this teach the cost model nothing: their time is mostly the
/// fixed cost of one pass over the weights (a question tail of ten tokens can take as long
/// as fifty chunk tokens), which a per-token model would spread over every chunk after.
const MIN_OBSERVED_TOKENS: usize = 64;

impl CostModel {
    fn new(config: &SchedulerConfig) -> Self {
        Self {
            compute_per_token: config.compute_secs_per_token,
            compute_per_token_per_position: config.compute_secs_per_token_per_position,
            compute_scale: 1.0,
            load_per_token: config.load_secs_per_token,
            finished_load_per_token: config.load_secs_per_token,
            loads_seen: 0,
        }
    }

    fn compute_prior(&self, tokens: usize, position: usize) -> f64 {
        // Each token attends to everything before it: cost grows with the mid position.
        let mid = position as f64 + tokens as f64 / 2.0;
        tokens as f64 * (self.compute_per_token + self.compute_per_token_per_position * mid)
    }

    /// Expected seconds to compute `tokens` tokens starting at `position`.
    pub fn compute_secs(&self, tokens: usize, position: usize) -> f64 {
        self.compute_scale * self.compute_prior(tokens, position)
    }

    /// Expected seconds of one load of a `tokens`-token chunk.
    pub fn load_secs(&self, tokens: usize) -> f64 {
        self.load_per_token * tokens as f64
    }

    fn observe_compute(&mut self, tokens: usize, position: usize, secs: f64) {
        if tokens < MIN_OBSERVED_TOKENS {
            return;
        }
        let prior = self.compute_prior(tokens, position);
        if prior > 0.0 && secs.is_finite() && secs > 0.0 {
            self.compute_scale = (1.0 - EWMA) * self.compute_scale + EWMA * (secs / prior);
        }
    }

    /// Whether a load has finished: until then the load estimate is the configured prior,
    /// a guess about the store.
    pub fn loads_observed(&self) -> bool {
        self.loads_seen > 0
    }

    /// Expected seconds of one load of a `tokens`-token chunk from a healthy store (finished
    /// loads only).
    pub fn finished_load_secs(&self, tokens: usize) -> f64 {
        self.finished_load_per_token * tokens as f64
    }

    /// A load given up after `secs` would have taken at least that long (a censored
    /// observation): the estimate only rises. Without it, a store slower than the prior
    /// whose loads are always overtaken would never teach its real speed.
    fn observe_load_at_least(&mut self, tokens: usize, secs: f64) {
        if tokens > 0 && secs.is_finite() && secs / tokens as f64 > self.load_per_token {
            self.load_per_token = self.blend(self.load_per_token, secs / tokens as f64);
        }
    }

    pub(crate) fn observe_load(&mut self, tokens: usize, secs: f64) {
        if tokens == 0 || !secs.is_finite() {
            return;
        }
        let per_token = secs / tokens as f64;
        self.load_per_token = self.blend(self.load_per_token, per_token);
        self.finished_load_per_token = self.blend(self.finished_load_per_token, per_token);
        self.loads_seen += 1;
    }

    /// The estimate after an observation: until a load has finished the observation
    /// replaces it outright (priors for storage are guesses), then an EWMA.
    fn blend(&self, estimate: f64, observed: f64) -> f64 {
        if self.loads_seen == 0 {
            observed
        } else {
            (1.0 - EWMA) * estimate + EWMA * observed
        }
    }
}

/// The scheduler's state: every request in flight and the shared cost estimates.
#[derive(Debug)]
pub struct Dispatcher {
    config: SchedulerConfig,
    policy: Policy,
    costs: CostModel,
    requests: BTreeMap<RequestId, Request>,
    next_id: RequestId,
    loads_in_flight: usize,
    /// Loads given up (overtaken or cancelled) that the caller has not yet aborted.
    aborted: Vec<LoadStep>,
}

impl Dispatcher {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            policy: config.policy,
            costs: CostModel::new(&config),
            config,
            requests: BTreeMap::new(),
            next_id: 0,
            loads_in_flight: 0,
            aborted: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// The current cost estimates.
    pub fn costs(&self) -> &CostModel {
        &self.costs
    }

    /// Requests admitted and not yet finished or cancelled.
    pub fn in_flight(&self) -> usize {
        self.requests.len()
    }

    /// Loads issued and not yet finished.
    pub fn loads_in_flight(&self) -> usize {
        self.loads_in_flight
    }

    /// Admits a request at time `now`.
    pub fn admit(&mut self, now: f64, shape: RequestShape) -> RequestId {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(id, Request::new(now, shape));
        id
    }

    /// Position of chunk `chunk` of `request` (the tail's when `chunk` is the chunk count).
    pub fn position(&self, request: RequestId, chunk: usize) -> Option<usize> {
        self.requests.get(&request)?.positions.get(chunk).copied()
    }

    /// Forgets a request (cancelled or failed). Its in-flight loads are discarded on return.
    /// Its loads in flight are given up (see [`Dispatcher::take_aborted_loads`]).
    pub fn cancel(&mut self, request: RequestId) -> Option<PrefillReport> {
        let r = self.requests.remove(&request)?;
        for (chunk, slot) in r.slots.iter().enumerate() {
            if let Slot::Loading { first_layer, .. } = *slot {
                self.loads_in_flight = self.loads_in_flight.saturating_sub(1);
                self.aborted.push(LoadStep {
                    request,
                    chunk,
                    first_layer,
                });
            }
        }
        Some(r.report)
    }

    /// Loads given up since the last call (their chunk was computed first, or their request
    /// was cancelled). Their I/O slots are already free: the caller stops them and must not
    /// report them to [`Dispatcher::load_done`].
    pub fn take_aborted_loads(&mut self) -> Vec<LoadStep> {
        std::mem::take(&mut self.aborted)
    }

    /// The next load to issue, if an I/O slot is free and some request has a stored chunk
    /// its compute front has not reached. Marks it in flight.
    pub fn next_load(&mut self, now: f64) -> Option<LoadStep> {
        if self.loads_in_flight >= self.config.io_concurrency {
            return None;
        }
        let candidates: Vec<(RequestId, usize)> = self
            .eligible()
            .filter_map(|(&id, r)| r.load_candidate().map(|c| (id, c)))
            .collect();
        let (id, chunk) = match self.policy {
            // Arrival order: ids are issued in arrival order.
            Policy::PerRequest | Policy::Fcfs => *candidates.first()?,
            Policy::Adaptive => {
                // The request closest to done first (it cuts mean TTFT most), aged by
                // its wait.
                let (id, chunk, _) = candidates
                    .iter()
                    .map(|&(id, chunk)| (id, chunk, self.response_ratio(now, id)))
                    .max_by(|a, b| a.2.total_cmp(&b.2).then(b.0.cmp(&a.0)))?;
                (id, chunk)
            }
        };
        let first_layer = self.split_layer(id, chunk);
        let r = self.requests.get_mut(&id)?;
        r.slots[chunk] = Slot::Loading {
            since: now,
            first_layer,
        };
        r.loads_in_flight += 1;
        r.report.loads_issued += 1;
        self.loads_in_flight += 1;
        Some(LoadStep {
            request: id,
            chunk,
            first_layer,
        })
    }

    /// The first layer to load of `chunk` of `request` when the loader fetches it now: 0
    /// loads it whole. Above 0, the compute worker computes the layers below while a ranged
    /// read fetches the rest, so the chunk where the two sides meet is shared at a layer
    /// instead of going wholly to whichever side finishes it later (CacheFlow's layer
    /// dimension). Chosen only where the cost model predicts the chunk done sooner than
    /// either side alone would, so a store fast enough to deliver the chunk before the
    /// compute worker reaches it is always read whole.
    ///
    /// A split turns load work into compute work the ranged read cannot replace: it pays
    /// only where the compute worker would otherwise wait for this request's loads, so it
    /// is not chosen while another request is being prefilled (under load the compute
    /// worker is the bottleneck, and a split would take its time from that request).
    fn split_layer(&self, request: RequestId, chunk: usize) -> usize {
        let r = &self.requests[&request];
        let layers = r.shape.layers;
        let shape = r.shape.chunks[chunk];
        let others_prefilling = self
            .requests
            .iter()
            .any(|(&id, other)| id != request && !other.tail_started);
        if !self.config.layer_split
            || r.shape.mode != Mode::Bidirectional
            || layers < 2
            || shape.recompute_share > 0.0
            || others_prefilling
        {
            return 0;
        }
        // When the compute worker reaches the chunk: after the chunks before it that no
        // load is delivering.
        let ahead: f64 = (r.next..chunk)
            .map(|i| {
                let compute = self
                    .costs
                    .compute_secs(r.shape.chunks[i].tokens, r.positions[i]);
                match r.slots[i] {
                    Slot::Pending => compute,
                    Slot::Computing => compute / 2.0,
                    _ => compute * IMPORT_SHARE,
                }
            })
            .sum();
        let compute = self.costs.compute_secs(shape.tokens, r.positions[chunk]);
        let load = self.costs.load_secs(shape.tokens);
        // Only a chunk the compute worker would otherwise compute whole (it gets there and
        // through it before the load arrives) is split: the split then costs less compute
        // than the chunk level, never more. Splitting a chunk the load would deliver in
        // time would add compute to save waiting, a loss whenever other work wants it.
        if !(ahead + compute < load && compute > 0.0 && load.is_finite()) {
            return 0;
        }
        // The bottom share x computed while the top share 1 - x loads, both done together:
        // ahead + x * compute = (1 - x) * load. Rounded down: the side that was measured
        // less recently (the store) gets the larger part of any error.
        let share = (load - ahead) / (compute + load);
        let first_layer = (share * layers as f64).floor() as usize;
        if first_layer == 0 || first_layer >= layers {
            return 0;
        }
        let part = first_layer as f64 / layers as f64;
        let split = (ahead + part * compute).max((1.0 - part) * load);
        let whole = load.min(ahead + compute);
        // A split costs a pass of its own and a second handling of the chunk: it must
        // gain clearly.
        if split < whole - SPLIT_MIN_GAIN * compute {
            first_layer
        } else {
            0
        }
    }

    /// Records the end of a load and says whether its data is still wanted. A load that
    /// was given up (aborted) is ignored.
    pub fn load_done(&mut self, now: f64, step: LoadStep, result: LoadOutcome) -> LoadVerdict {
        let Some(r) = self.requests.get_mut(&step.request) else {
            return LoadVerdict::Discard;
        };
        let Slot::Loading { since, .. } = r.slots[step.chunk] else {
            return LoadVerdict::Discard;
        };
        self.loads_in_flight = self.loads_in_flight.saturating_sub(1);
        r.loads_in_flight = r.loads_in_flight.saturating_sub(1);
        let tokens = r.shape.chunks[step.chunk].tokens;
        // A ranged read teaches what a whole read would have taken.
        let whole_secs = (now - since) / r.read_share(step.first_layer);
        match result {
            LoadOutcome::Loaded { bytes, .. } => {
                r.slots[step.chunk] = Slot::Loaded {
                    first_layer: step.first_layer,
                };
                r.report.bytes_loaded += bytes;
                r.report.load_secs += now - since;
                if step.first_layer == 0 {
                    r.report.chunk_timings[step.chunk].read_span =
                        Some((since - r.arrival, now - r.arrival));
                }
                self.costs.observe_load(tokens, whole_secs);
                LoadVerdict::Keep
            }
            LoadOutcome::Missing(reason) => {
                r.slots[step.chunk] = Slot::Pending;
                r.loadable[step.chunk] = false;
                r.miss(step.chunk, reason);
                LoadVerdict::Discard
            }
            LoadOutcome::Failed(error) => {
                // A load that timed out would have taken at least that long: without
                // this, a store slower than the timeout would never teach its speed and
                // every request would wait on its loads again.
                self.costs.observe_load_at_least(tokens, whole_secs);
                // A failing store fails every later load too: compute the rest.
                r.slots[step.chunk] = Slot::Pending;
                r.loadable.iter_mut().for_each(|l| *l = false);
                r.miss(step.chunk, MissReason::StoreFailed(error.to_string()));
                LoadVerdict::Discard
            }
        }
    }

    /// The compute worker's next step, chosen by the policy. Marks it running.
    pub fn next_compute(&mut self, now: f64) -> NextCompute {
        let mut recheck: Option<f64> = None;
        let mut imports = Vec::new();
        let mut runnable = Vec::new();
        for (&request, r) in self.eligible() {
            match self.front(now, request, r) {
                Front::Run(step @ (ComputeStep::Import { .. } | ComputeStep::FillTop { .. })) => {
                    imports.push(step)
                }
                Front::Run(step) => runnable.push(step),
                Front::Wait(at) => {
                    if let Some(at) = at {
                        recheck = Some(recheck.map_or(at, |r: f64| r.min(at)));
                    }
                }
                Front::Busy => {}
            }
        }
        // Imports first: they are cheap, and each one moves a compute front forward.
        let step = match imports.first() {
            Some(&step) => step,
            None => match self.choose_compute(now, &runnable) {
                Some(step) => step,
                None => return NextCompute::Wait(recheck),
            },
        };
        let r = self
            .requests
            .get_mut(&step.request())
            .expect("chosen among live requests");
        match step {
            ComputeStep::Import { chunk, .. } | ComputeStep::FillTop { chunk, .. } => {
                r.report.meeting_point.get_or_insert(chunk);
                r.slots[chunk] = Slot::Computing;
            }
            ComputeStep::Bottom { chunk, .. } => {
                r.report.meeting_point.get_or_insert(chunk);
                r.computing_bottom = true;
            }
            ComputeStep::Compute { chunk, .. } => {
                if let Slot::Loading { since, first_layer } = r.slots[chunk] {
                    // Computing beats waiting for this load: it is abandoned, and its I/O
                    // slot goes to another load at once.
                    r.report.meeting_point.get_or_insert(chunk);
                    r.report.loads_abandoned += 1;
                    r.loads_in_flight = r.loads_in_flight.saturating_sub(1);
                    self.loads_in_flight = self.loads_in_flight.saturating_sub(1);
                    self.aborted.push(LoadStep {
                        request: step.request(),
                        chunk,
                        first_layer,
                    });
                    let tokens = r.shape.chunks[chunk].tokens;
                    let share = r.read_share(first_layer);
                    let expected = self.costs.finished_load_secs(tokens) * share;
                    if now - since > self.config.stall_factor * expected.max(1e-3) {
                        r.miss(chunk, MissReason::Stalled);
                    }
                    self.costs
                        .observe_load_at_least(tokens, (now - since) / share);
                }
                r.slots[chunk] = Slot::Computing;
            }
            ComputeStep::Tail { .. } => r.tail_started = true,
        }
        NextCompute::Run(step)
    }

    /// Records a finished compute step that took `secs`. Returns the request's report when
    /// the step was its tail (the request is then done and forgotten).
    pub fn compute_done(
        &mut self,
        now: f64,
        step: ComputeStep,
        secs: f64,
    ) -> Option<PrefillReport> {
        let r = self.requests.get_mut(&step.request())?;
        match step {
            ComputeStep::Bottom { layers, .. } => {
                r.computing_bottom = false;
                r.bottom = layers;
                r.report.compute_secs += secs;
                None
            }
            ComputeStep::Import { chunk, .. } | ComputeStep::FillTop { chunk, .. } => {
                if let ComputeStep::FillTop { first_layer, .. } = step {
                    r.bottom = 0;
                    r.report.chunks_split += 1;
                    r.report.split_layer = Some(first_layer);
                }
                r.slots[chunk] = Slot::Filled;
                r.next = chunk + 1;
                let shape = r.shape.chunks[chunk];
                r.report.chunks_loaded += 1;
                r.report.tokens_loaded += shape.tokens;
                r.report.import_secs += secs;
                if matches!(step, ComputeStep::Import { .. }) {
                    r.report.chunk_timings[chunk].imported_secs = Some(secs);
                }
                let compute = self.costs.compute_secs(shape.tokens, r.positions[chunk]);
                let tail_position = r.tail_position();
                let costs = &self.costs;
                let blend = r
                    .shape
                    .blend_secs(chunk, compute, r.pending_blend_secs, || {
                        costs.compute_secs(r.shape.tail_tokens, tail_position)
                    });
                r.pending_blend_secs += blend;
                None
            }
            ComputeStep::Compute { chunk, .. } => {
                // Computed whole: any bottom layers of a split were computed again.
                r.bottom = 0;
                r.slots[chunk] = Slot::Filled;
                r.next = chunk + 1;
                let tokens = r.shape.chunks[chunk].tokens;
                r.report.chunks_computed += 1;
                r.report.tokens_computed += tokens;
                r.report.compute_secs += secs;
                r.report.computed_chunks.push(chunk);
                r.report.chunk_timings[chunk].computed_secs = Some(secs);
                self.costs.observe_compute(tokens, r.positions[chunk], secs);
                None
            }
            ComputeStep::Tail { .. } => {
                let tokens = r.shape.tail_tokens;
                let position = r.tail_position();
                r.report.tokens_computed += tokens;
                r.report.compute_secs += secs;
                r.report.tail_secs = secs;
                if r.pending_blend_secs == 0.0 {
                    // A tail pass that blended chunks in says nothing of the tail alone.
                    self.costs.observe_compute(tokens, position, secs);
                }
                let mut r = self.requests.remove(&step.request())?;
                r.report.ttft_secs = now - r.arrival;
                if r.report.meeting_point.is_none() && r.shape.mode != Mode::ComputeOnly {
                    r.report.meeting_point = Some(r.shape.chunks.len());
                }
                Some(r.report)
            }
        }
    }

    /// Records the tokens of imported chunk caches recomputed with the tail (reported
    /// with the tail's [`Dispatcher::compute_done`]).
    pub fn recomputed(&mut self, request: RequestId, tokens: usize) {
        if let Some(r) = self.requests.get_mut(&request) {
            r.report.tokens_recomputed += tokens;
        }
    }

    /// Records an import that failed (the loaded cache did not fit): the chunk is computed
    /// instead.
    pub fn import_failed(&mut self, step: ComputeStep, reason: String) {
        if let ComputeStep::Import { request, chunk } | ComputeStep::FillTop { request, chunk, .. } =
            step
            && let Some(r) = self.requests.get_mut(&request)
        {
            r.slots[chunk] = Slot::Pending;
            r.loadable[chunk] = false;
            r.miss(chunk, MissReason::Rejected(reason));
        }
    }

    /// Records a compute step that failed: the request is dropped with its report.
    pub fn compute_failed(&mut self, step: ComputeStep) -> Option<PrefillReport> {
        self.cancel(step.request())
    }

    /// The requests that may get work: the oldest alone under [`Policy::PerRequest`], every
    /// one otherwise (ids are issued in arrival order).
    fn eligible(&self) -> impl Iterator<Item = (&RequestId, &Request)> {
        let take = match self.policy {
            Policy::PerRequest => 1,
            Policy::Fcfs | Policy::Adaptive => usize::MAX,
        };
        self.requests.iter().take(take)
    }

    fn front(&self, now: f64, request: RequestId, r: &Request) -> Front {
        if r.computing_bottom {
            return Front::Busy;
        }
        if r.next == r.slots.len() {
            return if r.tail_started {
                Front::Busy
            } else {
                Front::Run(ComputeStep::Tail { request })
            };
        }
        let chunk = r.next;
        let compute_step = Front::Run(ComputeStep::Compute { request, chunk });
        match r.slots[chunk] {
            Slot::Computing | Slot::Filled => Front::Busy,
            Slot::Loaded { first_layer: 0 } => Front::Run(ComputeStep::Import { request, chunk }),
            // A ranged read's top fills the chunk once its bottom layers are computed.
            Slot::Loaded { first_layer } if r.bottom == first_layer => {
                Front::Run(ComputeStep::FillTop {
                    request,
                    chunk,
                    first_layer,
                })
            }
            Slot::Loaded { first_layer } => Front::Run(ComputeStep::Bottom {
                request,
                chunk,
                layers: first_layer,
            }),
            Slot::Pending if r.loadable[chunk] && r.shape.mode == Mode::LoadOnly => {
                // Load-only computes nothing that is stored: the loader will take it.
                Front::Wait(None)
            }
            Slot::Pending if r.loadable[chunk] => {
                // Compute a stored chunk only if that is sooner than the loader, walking
                // from the back, would deliver it; otherwise leave it to the loader.
                let tokens = r.shape.chunks[chunk].tokens;
                let compute = self.costs.compute_secs(tokens, r.positions[chunk]);
                // A loaded chunk still costs its recomputation: loading saves the rest.
                let blend = compute * r.shape.chunks[chunk].recompute_share;
                let queued = (chunk..r.slots.len())
                    .filter(|&i| {
                        r.loadable[i] && matches!(r.slots[i], Slot::Pending | Slot::Loading { .. })
                    })
                    .count();
                let rounds = queued.div_ceil(self.config.io_concurrency.max(1)) as f64;
                // Loads of this request running past their expected time stretch the
                // estimate (the store may be stalled): wait at most about one compute time.
                let oldest = r
                    .slots
                    .iter()
                    .filter_map(|s| match s {
                        Slot::Loading { since, .. } => Some(*since),
                        _ => None,
                    })
                    .min_by(f64::total_cmp);
                let per_load = self
                    .costs
                    .load_secs(tokens)
                    .max(oldest.map_or(0.0, |o| now - o));
                if compute <= rounds * per_load + blend {
                    compute_step
                } else {
                    Front::Wait(oldest.map(|o| o + compute / rounds + 1e-6))
                }
            }
            Slot::Pending => compute_step,
            Slot::Loading { since, first_layer } => {
                if r.shape.mode != Mode::Bidirectional {
                    return Front::Wait(None);
                }
                let tokens = r.shape.chunks[chunk].tokens;
                let compute = self.costs.compute_secs(tokens, r.positions[chunk]);
                let blend = compute * r.shape.chunks[chunk].recompute_share;
                let expected = self.costs.load_secs(tokens) * r.read_share(first_layer);
                let elapsed = now - since;
                if first_layer > 0 && r.bottom < first_layer && elapsed <= expected {
                    // The bottom of a split chunk is computed while its top loads.
                    return Front::Run(ComputeStep::Bottom {
                        request,
                        chunk,
                        layers: first_layer,
                    });
                }
                // The meeting point: wait for the load, or compute the chunk if that is
                // faster. A load well past its expected time is assumed to need as long
                // again (it may be stalled), so a stuck store costs at most about one
                // compute time; one just past it is late, not stalled.
                let overdue = expected * OVERDUE_SLACK;
                let remaining = if elapsed < overdue {
                    (expected - elapsed).max(0.0)
                } else {
                    elapsed
                };
                if remaining + blend > compute {
                    compute_step
                } else {
                    Front::Wait(Some(since + overdue.max(compute) + 1e-6))
                }
            }
        }
    }

    /// Estimated seconds until `request` has its first token if it had the compute worker
    /// to itself and its loads kept going.
    fn remaining_secs(&self, now: f64, request: RequestId) -> f64 {
        let Some(r) = self.requests.get(&request) else {
            return f64::INFINITY;
        };
        let (must, compute, load) = self.remaining_parts(now, r);
        must + overlap(compute, load, r.shape.mode)
    }

    /// (waiting + remaining) / remaining: the shortest remaining first, while a request's
    /// claim grows with its wait, so a long one is not starved by a stream of short ones
    /// (highest response ratio next).
    fn response_ratio(&self, now: f64, request: RequestId) -> f64 {
        let Some(r) = self.requests.get(&request) else {
            return 0.0;
        };
        let remaining = self.remaining_secs(now, request).max(1e-6);
        (now - r.arrival + remaining) / remaining
    }

    /// (compute that only the compute worker can do, compute time of the loadable rest,
    /// load time of the loadable rest) for a request's unfilled chunks and tail.
    fn remaining_parts(&self, now: f64, r: &Request) -> (f64, f64, f64) {
        let mut must = if r.tail_started {
            0.0
        } else {
            self.costs
                .compute_secs(r.shape.tail_tokens, r.tail_position())
                + r.pending_blend_secs
        };
        let (mut compute, mut load) = (0.0, 0.0);
        let streams = self.config.io_concurrency.max(1) as f64;
        for i in r.next..r.slots.len() {
            let tokens = r.shape.chunks[i].tokens;
            let c = self.costs.compute_secs(tokens, r.positions[i]);
            match r.slots[i] {
                Slot::Filled | Slot::Computing => {}
                Slot::Loaded { first_layer } => {
                    // A split chunk's bottom layers are still to compute.
                    let bottom =
                        first_layer.saturating_sub(r.bottom) as f64 / r.shape.layers.max(1) as f64;
                    must += self.costs.compute_secs(tokens, 0) * IMPORT_SHARE
                        + c * (r.shape.chunks[i].recompute_share + bottom);
                }
                Slot::Loading { since, first_layer } => {
                    compute += c;
                    let read = self.costs.load_secs(tokens) * r.read_share(first_layer);
                    load += (read - (now - since)).max(0.0) / streams;
                }
                Slot::Pending if r.loadable[i] => {
                    compute += c;
                    load += self.costs.load_secs(tokens) / streams;
                }
                Slot::Pending => must += c,
            }
        }
        (must, compute, load)
    }

    fn choose_compute(&self, now: f64, runnable: &[ComputeStep]) -> Option<ComputeStep> {
        match self.policy {
            Policy::PerRequest | Policy::Fcfs => runnable.first().copied(),
            Policy::Adaptive => {
                // Work only the compute worker can do (chunks with no stored cache, tails)
                // goes first: a stored chunk computed while such work waits spends the
                // scarce resource on what the I/O pool could have delivered (Cake's
                // order: non-prefix prefill before prefix-cache prefill). Stored chunks
                // take the compute left over, so a cached request's meeting point moves
                // with the load; one whose load is in flight comes last (overtaking it
                // throws away the I/O already spent). Within a class, the highest response
                // ratio: the request closest to done first, which cuts the sum of TTFTs
                // most, with a claim that grows with its wait, so none starves.
                // The bottom of a split chunk is stored-chunk work: it goes with the stored
                // chunks, after work that only the compute worker can do.
                runnable
                    .iter()
                    .map(|&step| {
                        let id = step.request();
                        let r = &self.requests[&id];
                        let class = match step {
                            ComputeStep::Compute { chunk, .. }
                                if matches!(r.slots[chunk], Slot::Loading { .. }) =>
                            {
                                2
                            }
                            ComputeStep::Compute { chunk, .. } if r.loadable[chunk] => 1,
                            ComputeStep::Bottom { .. } => 1,
                            _ => 0,
                        };
                        (step, class, self.response_ratio(now, id))
                    })
                    .min_by(|a, b| {
                        a.1.cmp(&b.1)
                            .then(b.2.total_cmp(&a.2))
                            .then(a.0.request().cmp(&b.0.request()))
                    })
                    .map(|(step, _, _)| step)
            }
        }
    }
}

/// Share of a chunk's compute time that importing its loaded cache costs (a copy and, for
/// position-independent caches, a rotation): small, but not zero.
const IMPORT_SHARE: f64 = 0.05;

/// A load is overdue (perhaps stalled) past this multiple of its expected time; before,
/// it is merely late: reads vary, and overtaking a load that was about to arrive throws
/// away its I/O and a chunk of compute.
const OVERDUE_SLACK: f64 = 1.25;

/// Least gain, as a share of the chunk's compute time, for which a chunk is split at a
/// layer: below it the extra pass and the second handling of the chunk eat the gain.
const SPLIT_MIN_GAIN: f64 = 0.1;

/// Time to finish work that both sides can do, when they split it to finish together.
fn overlap(compute: f64, load: f64, mode: Mode) -> f64 {
    match mode {
        Mode::ComputeOnly => compute,
        Mode::LoadOnly => load,
        Mode::Bidirectional if compute + load > 0.0 => compute * load / (compute + load),
        Mode::Bidirectional => 0.0,
    }
}

enum Front {
    /// The request's next step.
    Run(ComputeStep),
    /// Waiting for a load; look again at this time, if any.
    Wait(Option<f64>),
    /// A step of this request is running.
    Busy,
}
