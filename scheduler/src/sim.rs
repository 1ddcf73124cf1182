//! A discrete-event simulator of the scheduler: the same [`Dispatcher`] decisions, driven by a
//! virtual clock and given costs instead of a model and a store. Deterministic, so the
//! scheduling logic is tested exactly, and fast enough to sweep what-ifs.

use std::collections::HashMap;
use std::time::Duration;

use super::LoadOutcome;
use super::dispatch::{
    ComputeStep, Dispatcher, LoadStep, NextCompute, RequestId, RequestShape, layer_share,
};
use super::{PrefillReport, SchedulerConfig, StoreError};
use crate::error::{Result, SchedulerError};

/// The simulated machine.
#[derive(Debug, Clone, PartialEq)]
pub struct SimCosts {
    /// Compute seconds per token…
    pub compute_secs_per_token: f64,
    /// …plus this much per token per position before it…
    pub compute_secs_per_token_per_position: f64,
    /// …plus this much per step, whatever its length (one pass over the weights).
    pub compute_secs_per_step: f64,
    /// Seconds per token to import a loaded chunk.
    pub import_secs_per_token: f64,
    /// Fixed time of every load.
    pub load_latency_secs: f64,
    /// Seconds per token of one load (infinite: the store never answers).
    pub load_secs_per_token: f64,
    /// Bytes of stored KV per token (reported as bytes loaded).
    pub bytes_per_token: u64,
    /// From this time on, every load fails (the store dies).
    pub store_fails_at: Option<f64>,
}

impl SimCosts {
    /// Seconds to compute `tokens` tokens starting at `position`, in one step.
    pub fn compute(&self, tokens: usize, position: usize) -> f64 {
        let mid = position as f64 + tokens as f64 / 2.0;
        self.compute_secs_per_step
            + tokens as f64
                * (self.compute_secs_per_token + self.compute_secs_per_token_per_position * mid)
    }
}

/// A request arriving at `arrival` seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct SimRequest {
    /// Arrival time.
    pub arrival: f64,
    /// Chunks, tail and mode.
    pub shape: RequestShape,
}

/// Bound on simulated events: every run ends.
const MAX_EVENTS: usize = 10_000_000;

/// Runs `requests` through a scheduler with `config` on the machine `costs` and returns each
/// request's report (in the order given).
pub fn simulate(
    config: SchedulerConfig,
    costs: &SimCosts,
    requests: &[SimRequest],
) -> Result<Vec<PrefillReport>> {
    let mut order: Vec<usize> = (0..requests.len()).collect();
    order.sort_by(|&a, &b| requests[a].arrival.total_cmp(&requests[b].arrival));
    let timeout = config.load_timeout_secs;
    let mut dispatcher = Dispatcher::new(config);
    let mut ids: Vec<(RequestId, usize)> = Vec::new();
    let mut reports: Vec<Option<PrefillReport>> = vec![None; requests.len()];
    let mut arrivals = order.into_iter().peekable();
    let mut now = 0.0f64;
    let mut busy: Option<(f64, ComputeStep, f64)> = None;
    let mut loads: Vec<(f64, LoadStep, LoadOutcome)> = Vec::new();
    let mut blends: HashMap<RequestId, f64> = HashMap::new();

    for _ in 0..MAX_EVENTS {
        while let Some(&i) = arrivals.peek() {
            if requests[i].arrival > now {
                break;
            }
            arrivals.next();
            ids.push((dispatcher.admit(now, requests[i].shape.clone()), i));
        }
        while let Some(step) = dispatcher.next_load(now) {
            let shape = &requests[index_of(&ids, step.request)].shape;
            // A ranged read of the top layers moves their share of the bytes.
            let share = 1.0 - layer_share(step.first_layer, shape.layers);
            let tokens = shape.chunks[step.chunk].tokens as f64 * share;
            loads.push(simulate_load(costs, timeout, now, tokens, step));
        }
        let mut recheck = None;
        if busy.is_none() {
            match dispatcher.next_compute(now) {
                NextCompute::Run(step) => {
                    let secs = step_secs(&dispatcher, costs, requests, &ids, step, &mut blends);
                    busy = Some((now + secs, step, secs));
                }
                NextCompute::Wait(at) => recheck = at.filter(|&t| t > now),
            }
            let aborted = dispatcher.take_aborted_loads();
            if !aborted.is_empty() {
                loads.retain(|l| !aborted.contains(&l.1));
                // Freed I/O slots take the next loads at once.
                continue;
            }
        }
        let next_arrival = arrivals.peek().map(|&i| requests[i].arrival);
        let next_load = loads.iter().map(|l| l.0).min_by(f64::total_cmp);
        let next = [next_arrival, busy.map(|b| b.0), next_load, recheck]
            .into_iter()
            .flatten()
            .filter(|t| t.is_finite())
            .min_by(f64::total_cmp);
        let Some(next) = next else {
            return finish(reports, requests.len());
        };
        now = next.max(now);
        if let Some((done, step, secs)) = busy
            && done <= now
        {
            busy = None;
            if let Some(report) = dispatcher.compute_done(now, step, secs) {
                let index = index_of(&ids, step.request());
                reports[index] = Some(report);
            }
        }
        let (done, pending): (Vec<_>, Vec<_>) = loads.into_iter().partition(|l| l.0 <= now);
        loads = pending;
        for (_, step, result) in done {
            dispatcher.load_done(now, step, result);
        }
    }
    Err(SchedulerError::Simulation(format!(
        "simulation did not finish within {MAX_EVENTS} events"
    )))
}

fn finish(reports: Vec<Option<PrefillReport>>, n: usize) -> Result<Vec<PrefillReport>> {
    let done: Vec<PrefillReport> = reports.into_iter().flatten().collect();
    if done.len() != n {
        return Err(SchedulerError::Simulation(format!(
            "{} of {n} simulated requests never finished",
            n - done.len()
        )));
    }
    Ok(done)
}

fn index_of(ids: &[(RequestId, usize)], id: RequestId) -> usize {
    ids.iter()
        .find(|(r, _)| *r == id)
        .map(|(_, i)| *i)
        .expect("admitted")
}

/// A load of `tokens` tokens' worth of bytes (fractional for ranged reads).
fn simulate_load(
    costs: &SimCosts,
    timeout: f64,
    now: f64,
    tokens: f64,
    step: LoadStep,
) -> (f64, LoadStep, LoadOutcome) {
    let duration = costs.load_latency_secs + costs.load_secs_per_token * tokens;
    let end = now + duration;
    if let Some(dies) = costs.store_fails_at
        && end >= dies
    {
        let at = dies.max(now + costs.load_latency_secs).min(now + timeout);
        return (at, step, LoadOutcome::Failed(StoreError::Unavailable));
    }
    if duration > timeout {
        return (
            now + timeout,
            step,
            LoadOutcome::Failed(StoreError::TimedOut(Duration::from_secs_f64(timeout))),
        );
    }
    let bytes = (tokens * costs.bytes_per_token as f64).round() as u64;
    (end, step, LoadOutcome::Loaded { kv: (), bytes })
}

/// Seconds `step` takes; blends of imported chunk caches are kept in `blends` until the
/// tail that runs them.
fn step_secs(
    dispatcher: &Dispatcher,
    costs: &SimCosts,
    requests: &[SimRequest],
    ids: &[(RequestId, usize)],
    step: ComputeStep,
    blends: &mut HashMap<RequestId, f64>,
) -> f64 {
    let shape = &requests[index_of(ids, step.request())].shape;
    match step {
        ComputeStep::Import { request, chunk } => {
            // Its blend is done with the tail: charged there.
            let c = &shape.chunks[chunk];
            let position = dispatcher.position(request, chunk).unwrap_or(0);
            let tail_position = dispatcher
                .position(request, shape.chunks.len())
                .unwrap_or(0);
            let so_far = blends.entry(request).or_default();
            *so_far += shape.blend_secs(chunk, costs.compute(c.tokens, position), *so_far, || {
                costs.compute(shape.tail_tokens, tail_position)
            });
            costs.import_secs_per_token * c.tokens as f64
        }
        ComputeStep::Compute { request, chunk } => {
            let position = dispatcher.position(request, chunk).unwrap_or(0);
            costs.compute(shape.chunks[chunk].tokens, position)
        }
        ComputeStep::Bottom {
            request,
            chunk,
            layers,
        } => {
            // One pass, through the bottom layers only.
            let position = dispatcher.position(request, chunk).unwrap_or(0);
            let whole = costs.compute(shape.chunks[chunk].tokens, position);
            costs.compute_secs_per_step
                + (whole - costs.compute_secs_per_step) * layer_share(layers, shape.layers)
        }
        ComputeStep::FillTop {
            chunk, first_layer, ..
        } => {
            let share = 1.0 - layer_share(first_layer, shape.layers);
            costs.import_secs_per_token * shape.chunks[chunk].tokens as f64 * share
        }
        ComputeStep::Tail { request } => {
            let position = dispatcher
                .position(request, shape.chunks.len())
                .unwrap_or(0);
            costs.compute(shape.tail_tokens, position) + blends.remove(&request).unwrap_or(0.0)
        }
    }
}
