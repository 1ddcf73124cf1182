//! The scheduling logic under the deterministic simulator.

use super::bounds::{ChunkCosts, prefill_bounds};
use super::dispatch::{ChunkShape, Dispatcher, RequestShape};
use super::sim::{SimCosts, SimRequest, simulate};
use super::{LoadOutcome, MissReason, Mode, Policy, PrefillReport, SchedulerConfig};

const CHUNK: usize = 256;

fn costs(compute_per_token: f64, load_per_token: f64) -> SimCosts {
    SimCosts {
        compute_secs_per_token: compute_per_token,
        compute_secs_per_token_per_position: 0.0,
        compute_secs_per_step: 0.0,
        import_secs_per_token: 1e-6,
        load_latency_secs: 0.0,
        load_secs_per_token: load_per_token,
        // SmolLM2-135M in f16: 30 layers x 2 x 3 heads x 64 x 2 bytes.
        bytes_per_token: 23_040,
        store_fails_at: None,
    }
}

/// A config whose priors are the simulated machine's true costs.
fn config(costs: &SimCosts, policy: Policy, io: usize) -> SchedulerConfig {
    SchedulerConfig {
        policy,
        io_concurrency: io,
        compute_secs_per_token: costs.compute_secs_per_token,
        compute_secs_per_token_per_position: costs.compute_secs_per_token_per_position,
        load_secs_per_token: costs.load_secs_per_token.min(1e3),
        load_timeout_secs: 1e4,
        ..SchedulerConfig::default()
    }
}

fn shape(chunks: usize, stored: impl Fn(usize) -> bool, mode: Mode) -> RequestShape {
    blended_shape(chunks, stored, mode, 0.0)
}

/// [`shape`] whose stored chunks cost `recompute_share` of their compute once loaded.
fn blended_shape(
    chunks: usize,
    stored: impl Fn(usize) -> bool,
    mode: Mode,
    recompute_share: f64,
) -> RequestShape {
    RequestShape {
        chunks: (0..chunks)
            .map(|i| ChunkShape {
                tokens: CHUNK,
                stored: stored(i),
                recompute_share: if stored(i) { recompute_share } else { 0.0 },
            })
            .collect(),
        tail_tokens: 16,
        mode,
        probe_share: 0.0,
        layers: 30,
    }
}

fn run_one(costs: &SimCosts, io: usize, shape: RequestShape) -> PrefillReport {
    let config = config(costs, Policy::Adaptive, io);
    let mut reports = simulate(
        config,
        costs,
        &[SimRequest {
            arrival: 0.0,
            shape,
        }],
    )
    .unwrap();
    reports.remove(0)
}

#[test]
fn equal_rates_meet_in_the_middle() {
    let costs = costs(1e-3, 1e-3);
    let report = run_one(&costs, 1, shape(16, |_| true, Mode::Bidirectional));
    let meet = report.meeting_point.unwrap();
    assert!((7..=9).contains(&meet), "met at chunk {meet}: {report:?}");
    assert_eq!(report.chunks_computed + report.chunks_loaded, 16);
    let compute_only = 16.0 * CHUNK as f64 * 1e-3;
    assert!(
        report.ttft_secs < 0.6 * compute_only,
        "TTFT {} vs compute-only {compute_only}",
        report.ttft_secs
    );
}

#[test]
fn blending_loaded_chunks_is_compute_work_that_enters_the_meeting_point() {
    let costs = costs(1e-3, 1e-3);
    let plain = run_one(&costs, 1, shape(16, |_| true, Mode::Bidirectional));
    let blended = run_one(
        &costs,
        1,
        blended_shape(16, |_| true, Mode::Bidirectional, 0.2),
    );
    assert_eq!(blended.chunks_computed + blended.chunks_loaded, 16);
    assert!(
        blended.chunks_computed >= plain.chunks_computed,
        "{plain:?}\n{blended:?}"
    );
    // The blends run after the loads they follow: TTFT grows by about the blends' compute.
    let blends = 0.2 * blended.chunks_loaded as f64 * CHUNK as f64 * 1e-3;
    assert!(
        blended.ttft_secs > plain.ttft_secs,
        "{plain:?}\n{blended:?}"
    );
    assert!(
        blended.ttft_secs <= plain.ttft_secs + blends + 2.0 * CHUNK as f64 * 1e-3,
        "{plain:?}\n{blended:?}"
    );
    // Still well below computing everything.
    assert!(
        blended.ttft_secs < 0.75 * 16.0 * CHUNK as f64 * 1e-3,
        "{blended:?}"
    );
}

#[test]
fn a_question_probe_costs_one_more_tail_pass_once_per_request() {
    // Load-only, so both requests import the same chunks and differ only in the probe.
    let costs = costs(1e-3, 1e-4);
    let blended = blended_shape(8, |_| true, Mode::LoadOnly, 0.2);
    let probing = RequestShape {
        probe_share: 1.0,
        ..blended.clone()
    };
    let tail = blended.tail_tokens as f64 * 1e-3;
    let without = run_one(&costs, 1, blended);
    let with = run_one(&costs, 1, probing);
    let extra = with.ttft_secs - without.ttft_secs;
    assert!(
        (extra - tail).abs() < 1e-9,
        "{extra} s more, a tail is {tail} s"
    );
}

#[test]
fn faster_loading_moves_the_meeting_point_forward() {
    let slow = run_one(
        &costs(1e-3, 3e-3),
        1,
        shape(16, |_| true, Mode::Bidirectional),
    );
    let fast = run_one(
        &costs(1e-3, 0.33e-3),
        1,
        shape(16, |_| true, Mode::Bidirectional),
    );
    assert!(
        slow.chunks_computed > fast.chunks_computed,
        "{slow:?}\n{fast:?}"
    );
    // About a quarter computed when loading is 3x faster, three quarters when 3x slower.
    assert!((3..=5).contains(&fast.chunks_computed), "{fast:?}");
    assert!((11..=13).contains(&slow.chunks_computed), "{slow:?}");
}

#[test]
fn costly_short_tails_do_not_make_chunks_look_costly() {
    // Every step pays 0.3 s (a pass over the weights): a 16-token tail costs as much as
    // 300 chunk tokens. Loads take 3 s a chunk (all four at once), computing the four
    // 2.2 s, so a cached request is best computed, even after load-only requests whose
    // only compute steps were their tails.
    let mut costs = costs(1e-3, 3.0 / CHUNK as f64);
    costs.compute_secs_per_step = 0.3;
    let config = SchedulerConfig {
        load_secs_per_token: costs.load_secs_per_token,
        ..config(&costs, Policy::Fcfs, 4)
    };
    let requests: Vec<SimRequest> = (0..8)
        .map(|i| SimRequest {
            arrival: i as f64 * 10.0,
            shape: shape(
                4,
                |_| true,
                if i < 4 {
                    Mode::LoadOnly
                } else {
                    Mode::Bidirectional
                },
            ),
        })
        .collect();
    let reports = simulate(config, &costs, &requests).unwrap();
    let computing = 4.0 * (0.3 + 0.256) + 0.3 + 0.016;
    for report in &reports[4..] {
        assert!(
            report.ttft_secs < 1.2 * computing,
            "waited for loads: {report:?}"
        );
    }
}

#[test]
fn zero_bandwidth_computes_everything() {
    let costs = costs(1e-3, f64::INFINITY);
    let report = run_one(&costs, 4, shape(16, |_| true, Mode::Bidirectional));
    assert_eq!(report.chunks_computed, 16, "{report:?}");
    assert_eq!(report.chunks_loaded, 0);
    let compute_only = (16 * CHUNK + 16) as f64 * 1e-3;
    assert!(report.ttft_secs <= compute_only * 1.01, "{report:?}");
}

#[test]
fn zero_compute_rate_loads_everything_stored() {
    let costs = costs(10.0, 1e-4);
    let stored = |i: usize| i % 4 != 1;
    let report = run_one(&costs, 4, shape(16, stored, Mode::Bidirectional));
    assert_eq!(report.chunks_loaded, 12, "{report:?}");
    assert_eq!(report.chunks_computed, 4);
}

#[test]
fn compute_only_never_reads_the_store() {
    let costs = costs(1e-3, 1e-4);
    let report = run_one(&costs, 4, shape(8, |_| true, Mode::ComputeOnly));
    assert_eq!(report.loads_issued, 0);
    assert_eq!(report.chunks_computed, 8);
    assert_eq!(report.meeting_point, None);
}

#[test]
fn load_only_loads_every_stored_chunk_even_when_computing_is_faster() {
    let costs = costs(1e-4, 1e-3);
    let stored = |i: usize| i != 3;
    let report = run_one(&costs, 2, shape(8, stored, Mode::LoadOnly));
    assert_eq!(report.chunks_loaded, 7, "{report:?}");
    assert_eq!(report.chunks_computed, 1);
}

#[test]
fn a_store_that_dies_halfway_still_completes_flagged_degraded() {
    let mut costs = costs(1e-3, 2e-3);
    let load_all = 16.0 * CHUNK as f64 * 2e-3;
    costs.store_fails_at = Some(load_all / 4.0);
    for mode in [Mode::Bidirectional, Mode::LoadOnly] {
        let report = run_one(&costs, 1, shape(16, |_| true, mode));
        assert_eq!(
            report.chunks_computed + report.chunks_loaded,
            16,
            "{report:?}"
        );
        assert!(
            report.chunks_loaded > 0,
            "loaded before the store died: {report:?}"
        );
        assert!(report.degraded, "{report:?}");
        assert!(
            report
                .misses
                .iter()
                .any(|m| matches!(m.reason, MissReason::StoreFailed(_))),
            "{report:?}"
        );
    }
}

#[test]
fn a_stalled_load_is_overtaken_by_compute() {
    // Loads are expected fast (the prior) but take 100x longer.
    let costs = costs(1e-3, 0.1);
    let mut config = config(&costs, Policy::Adaptive, 4);
    config.load_secs_per_token = 1e-4;
    let shape = shape(8, |_| true, Mode::Bidirectional);
    let report = simulate(
        config,
        &costs,
        &[SimRequest {
            arrival: 0.0,
            shape,
        }],
    )
    .unwrap()
    .remove(0);
    let compute_only = (8 * CHUNK + 16) as f64 * 1e-3;
    // Waiting for one stalled load costs at most about one chunk's compute time.
    assert!(report.ttft_secs < compute_only * 1.3, "{report:?}");
    assert!(report.degraded, "{report:?}");
    assert!(
        report
            .misses
            .iter()
            .any(|m| m.reason == MissReason::Stalled)
    );
}

#[test]
fn a_load_that_times_out_raises_the_expected_load_time() {
    let mut config = SchedulerConfig {
        load_secs_per_token: 1e-4,
        ..SchedulerConfig::default()
    };
    config.load_timeout_secs = 5.0;
    let mut dispatcher = Dispatcher::new(config);
    dispatcher.admit(0.0, shape(4, |_| true, Mode::LoadOnly));
    let step = dispatcher.next_load(0.0).expect("a stored chunk to load");
    let before = dispatcher.costs().load_secs(CHUNK);
    // The load gave up at the timeout: it would have taken at least that long.
    dispatcher.load_done(
        5.0,
        step,
        LoadOutcome::Failed(crate::StoreError::TimedOut(std::time::Duration::from_secs(
            5,
        ))),
    );
    let after = dispatcher.costs().load_secs(CHUNK);
    assert!(
        before < 1.0 && after >= 5.0,
        "expected load of a chunk: {before:.3} s before the timeout, {after:.3} s after"
    );
}

/// A deterministic mixed workload: every third request uncached, the others fully or half
/// cached, arriving every `gap` seconds.
fn mixed_workload(n: usize, gap: f64, chunks: usize) -> Vec<SimRequest> {
    (0..n)
        .map(|i| {
            let stored: Box<dyn Fn(usize) -> bool> = match i % 3 {
                0 => Box::new(|_| false),
                1 => Box::new(|_| true),
                _ => Box::new(|c| c % 2 == 0),
            };
            SimRequest {
                arrival: i as f64 * gap,
                shape: shape(chunks, stored, Mode::Bidirectional),
            }
        })
        .collect()
}

#[test]
fn many_concurrent_requests_all_finish_and_none_starves() {
    let mut costs = costs(1e-3, 1e-3);
    costs.compute_secs_per_token_per_position = 1e-7;
    let requests = mixed_workload(200, 0.5, 8);
    let reports = simulate(config(&costs, Policy::Adaptive, 4), &costs, &requests).unwrap();
    assert_eq!(reports.len(), 200);
    for r in &reports {
        assert_eq!(r.chunks_computed + r.chunks_loaded, 8, "{r:?}");
        assert!(r.ttft_secs.is_finite() && r.ttft_secs > 0.0, "{r:?}");
    }
}

fn config_fcfs(costs: &SimCosts) -> SchedulerConfig {
    config(costs, Policy::Fcfs, 4)
}

#[test]
fn adaptive_policy_cuts_mean_ttft_against_fcfs() {
    let mut costs = costs(1e-3, 1e-3);
    costs.compute_secs_per_token_per_position = 1e-7;
    let requests = mixed_workload(60, 1.0, 8);
    let mean = |reports: &[PrefillReport]| {
        reports.iter().map(|r| r.ttft_secs).sum::<f64>() / reports.len() as f64
    };
    let adaptive = simulate(config(&costs, Policy::Adaptive, 4), &costs, &requests).unwrap();
    let fcfs = simulate(config_fcfs(&costs), &costs, &requests).unwrap();
    assert!(
        mean(&adaptive) < mean(&fcfs),
        "adaptive {} vs fcfs {}",
        mean(&adaptive),
        mean(&fcfs)
    );
}

#[test]
fn simulation_is_deterministic() {
    let costs = costs(1e-3, 1e-3);
    let requests = mixed_workload(30, 0.3, 6);
    let a = simulate(config(&costs, Policy::Adaptive, 4), &costs, &requests).unwrap();
    let b = simulate(config(&costs, Policy::Adaptive, 4), &costs, &requests).unwrap();
    assert_eq!(a, b);
}

#[test]
fn a_long_uncached_request_is_not_starved_by_a_stream_of_short_ones() {
    let costs = costs(1e-3, 1e-3);
    // One 8-chunk request, then 1-chunk requests slightly faster than compute can serve.
    let mut requests = vec![SimRequest {
        arrival: 0.0,
        shape: shape(8, |_| false, Mode::Bidirectional),
    }];
    requests.extend((1..200).map(|i| SimRequest {
        arrival: i as f64 * 0.25,
        shape: shape(1, |_| false, Mode::Bidirectional),
    }));
    let reports = simulate(config(&costs, Policy::Adaptive, 4), &costs, &requests).unwrap();
    // Shortest-first alone would leave it waiting for the whole stream (~50 s); aged by
    // its wait, it gets the compute worker every few short requests.
    let long = reports[0].ttft_secs;
    assert!(long <= 10.0, "the long request waited {long} s");
    assert_eq!(reports.len(), 200);
}

fn serving_trace(n: usize, rate: f64, mode: Mode) -> Vec<SimRequest> {
    // Deterministic pseudo-random arrivals and kinds.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut at = 0.0;
    (0..n)
        .map(|_| {
            at += -(1.0 - next()).ln() / rate;
            let kind = next();
            let stored: Box<dyn Fn(usize) -> bool> = if kind < 0.5 {
                Box::new(|_| true)
            } else if kind < 0.75 {
                Box::new(|c| c < 2)
            } else {
                Box::new(|_| false)
            };
            SimRequest {
                arrival: at,
                shape: shape(4, stored, mode),
            }
        })
        .collect()
}

/// Throughput (requests over first arrival to last first token), mean and p99 TTFT.
fn serve(policy: Policy, mode: Mode, rate: f64) -> (f64, f64, f64) {
    // SmolLM2-135M-like compute (~1 s per 256-token chunk) and a store whose loads take
    // ~6 s each, four at a time: the two sides are about equally fast in aggregate.
    let mut costs = costs(3.8e-3, 0.023);
    costs.compute_secs_per_token_per_position = 3e-7;
    let requests = serving_trace(60, rate, mode);
    let config = SchedulerConfig {
        // The runtime's pessimistic prior: the first loads teach the real rate.
        load_secs_per_token: 1e-2,
        ..config(&costs, policy, 4)
    };
    let reports = simulate(config, &costs, &requests).unwrap();
    let end = requests
        .iter()
        .zip(&reports)
        .map(|(q, r)| q.arrival + r.ttft_secs)
        .fold(0.0, f64::max);
    let mut ttft: Vec<f64> = reports.iter().map(|r| r.ttft_secs).collect();
    ttft.sort_by(f64::total_cmp);
    let mean = ttft.iter().sum::<f64>() / ttft.len() as f64;
    let p99 = ttft[ttft.len() * 99 / 100 - 1];
    (ttft.len() as f64 / (end - requests[0].arrival), mean, p99)
}

#[test]
fn adaptive_serves_a_mixed_stream_faster_than_every_baseline() {
    // Offered ~1.4x what compute alone sustains.
    let rate = 0.35;
    let (throughput, mean, p99) = serve(Policy::Adaptive, Mode::Bidirectional, rate);
    // The baselines (Cake's +26% throughput), then the shared-pool FCFS
    // bidirectional scheduler, which already loads ahead for queued requests: adaptive
    // still beats it, by less.
    let baselines = [
        (Policy::Fcfs, Mode::ComputeOnly, 1.26),
        (Policy::Fcfs, Mode::LoadOnly, 1.26),
        (Policy::PerRequest, Mode::Bidirectional, 1.26),
        (Policy::Fcfs, Mode::Bidirectional, 1.05),
    ];
    for (policy, mode, margin) in baselines {
        let (base_throughput, base_mean, base_p99) = serve(policy, mode, rate);
        let report = format!(
            "adaptive {throughput:.3} req/s, mean {mean:.1} s, p99 {p99:.1} s; {policy} {mode} \
             {base_throughput:.3} req/s, mean {base_mean:.1} s, p99 {base_p99:.1} s"
        );
        assert!(throughput >= margin * base_throughput, "{report}");
        assert!(mean < 0.8 * base_mean, "{report}");
        assert!(p99 <= base_p99, "{report}");
    }
}

#[test]
fn per_request_policy_serves_one_request_at_a_time() {
    let costs = costs(1e-3, 1e-3);
    let requests: Vec<SimRequest> = (0..3)
        .map(|i| SimRequest {
            arrival: i as f64 * 1e-3,
            shape: shape(4, |_| true, Mode::Bidirectional),
        })
        .collect();
    let config = config(&costs, Policy::PerRequest, 4);
    let reports = simulate(config, &costs, &requests).unwrap();
    // No request loads ahead while an earlier one is in flight: each gets the whole
    // machine in turn, so each waits for the ones before it, and finishes alone as fast.
    let alone = run_one(&costs, 4, shape(4, |_| true, Mode::Bidirectional)).ttft_secs;
    for (i, (report, request)) in reports.iter().zip(&requests).enumerate() {
        let finished = request.arrival + report.ttft_secs;
        let expected = (i + 1) as f64 * alone;
        assert!(
            (finished - expected).abs() < 0.05 * alone,
            "request {i} finished at {finished}, expected {expected} ({reports:?})"
        );
    }
}

/// One request alone, with the layer split on or off.
fn run_split(costs: &SimCosts, io: usize, shape: RequestShape, layer_split: bool) -> PrefillReport {
    let config = SchedulerConfig {
        layer_split,
        ..config(costs, Policy::Adaptive, io)
    };
    let request = SimRequest {
        arrival: 0.0,
        shape,
    };
    simulate(config, costs, &[request]).unwrap().remove(0)
}

#[test]
fn the_meeting_chunk_is_split_at_a_layer_where_compute_and_loads_are_even() {
    // Four chunks, four reads at once, each read as slow as computing all four: at the
    // chunk level every split point takes four chunk times; split at layers, each side
    // takes a share of the chunks it meets on.
    let costs = costs(1e-3, 4e-3);
    let whole = run_split(&costs, 4, shape(4, |_| true, Mode::Bidirectional), false);
    let split = run_split(&costs, 4, shape(4, |_| true, Mode::Bidirectional), true);
    let report = format!("chunk level {whole:?}\nlayer split {split:?}");
    assert_eq!(whole.chunks_split, 0, "{report}");
    assert!(split.chunks_split >= 1, "{report}");
    assert_eq!(split.chunks_computed + split.chunks_loaded, 4, "{report}");
    assert!(
        split.split_layer.is_some_and(|l| l > 0 && l < 30),
        "{report}"
    );
    assert!(split.ttft_secs < 0.9 * whole.ttft_secs, "{report}");
    assert!(!split.degraded && split.misses.is_empty(), "{report}");
}

#[test]
fn a_store_fast_enough_to_deliver_before_compute_arrives_is_never_split() {
    // Loads 10x faster than computing: nothing to gain at a layer, and the same TTFT.
    let costs = costs(1e-3, 1e-4);
    for io in [1, 4] {
        let whole = run_split(&costs, io, shape(8, |_| true, Mode::Bidirectional), false);
        let split = run_split(&costs, io, shape(8, |_| true, Mode::Bidirectional), true);
        assert_eq!(split.chunks_split, 0, "{split:?}");
        assert_eq!(split.ttft_secs, whole.ttft_secs, "{whole:?}\n{split:?}");
    }
    // Chunk caches blended in are never split (their recomputation needs the whole chunk).
    let costs = self::costs(1e-3, 4e-3);
    let blended = blended_shape(4, |_| true, Mode::Bidirectional, 0.2);
    assert_eq!(run_split(&costs, 4, blended, true).chunks_split, 0);
    // Nor are chunks of load-only requests.
    let load_only = run_split(&costs, 4, shape(4, |_| true, Mode::LoadOnly), true);
    assert_eq!(load_only.chunks_split, 0);
}

#[test]
fn a_split_chunk_whose_top_never_arrives_is_computed_whole() {
    // The store dies just after the ranged reads start: every chunk is computed, bottoms
    // included, and the request completes flagged degraded.
    let mut costs = costs(1e-3, 4e-3);
    costs.store_fails_at = Some(0.05);
    let report = run_split(&costs, 4, shape(4, |_| true, Mode::Bidirectional), true);
    assert_eq!(report.chunks_computed, 4, "{report:?}");
    assert_eq!(report.chunks_split, 0, "{report:?}");
    assert!(report.degraded, "{report:?}");
}

#[test]
fn splitting_at_layers_shortens_served_ttft_on_the_whole() {
    // A split is chosen while a request is the only one being prefilled; a request that
    // arrives during it waits for the bottoms already committed. Across loads and store
    // speeds the splits must pay on the whole, and always when requests rarely overlap.
    let mut ratios = Vec::new();
    for rate in [0.1, 0.2, 0.3, 0.4] {
        for load_per_token in [0.005, 0.01, 0.023, 0.05] {
            let mut costs = costs(3.8e-3, load_per_token);
            costs.compute_secs_per_token_per_position = 3e-7;
            let requests = serving_trace(60, rate, Mode::Bidirectional);
            let mean_ttft = |layer_split| {
                let config = SchedulerConfig {
                    layer_split,
                    load_secs_per_token: 1e-2,
                    ..config(&costs, Policy::Adaptive, 4)
                };
                let reports = simulate(config, &costs, &requests).unwrap();
                reports.iter().map(|r| r.ttft_secs).sum::<f64>() / reports.len() as f64
            };
            let ratio = mean_ttft(true) / mean_ttft(false);
            if rate == 0.1 {
                assert!(
                    ratio <= 1.0,
                    "light load, {load_per_token} s/token: {ratio:.3}"
                );
            }
            ratios.push(ratio);
        }
    }
    let geomean = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    assert!(
        geomean < 0.995,
        "mean TTFT with / without splits: {ratios:.3?}"
    );
}

#[test]
fn no_simulated_schedule_beats_the_bounds_computed_from_its_own_costs() {
    // Across store speeds from far faster to far slower than computing, with per-position
    // and per-step compute costs and load latency, one read or four, layer splits on or
    // off: the chunk-level schedule never beats the chunk-level bound, and nothing beats
    // the layer-level bound.
    for load_per_token in [1e-4, 5e-4, 1e-3, 2e-3, 4e-3, 1e-2, 4e-2] {
        for io in [1, 4] {
            for chunks in [3, 8] {
                let mut costs = costs(1e-3, load_per_token);
                costs.compute_secs_per_token_per_position = 2e-7;
                costs.compute_secs_per_step = 2e-3;
                costs.load_latency_secs = 5e-3;
                costs.import_secs_per_token = 2e-5;
                let request = shape(chunks, |_| true, Mode::Bidirectional);
                let per_chunk: Vec<ChunkCosts> = (0..chunks)
                    .map(|i| {
                        // The simulated reads do not slow each other: `io` at once.
                        let read =
                            costs.load_latency_secs + costs.load_secs_per_token * CHUNK as f64;
                        ChunkCosts {
                            compute: costs.compute(CHUNK, i * CHUNK),
                            read,
                            store: read / io as f64,
                            import: costs.import_secs_per_token * CHUNK as f64,
                        }
                    })
                    .collect();
                let tail = costs.compute(request.tail_tokens, chunks * CHUNK);
                let bounds = prefill_bounds(&per_chunk, tail);
                let whole = run_split(&costs, io, request.clone(), false);
                let split = run_split(&costs, io, request, true);
                let case = format!(
                    "{load_per_token} s/token, {io} reads, {chunks} chunks: {bounds:?}\n\
                     chunk level {whole:?}\nlayer split {split:?}"
                );
                let eps = 1e-9;
                assert!(whole.ttft_secs >= bounds.chunk_level - eps, "{case}");
                assert!(whole.ttft_secs >= bounds.layer_level - eps, "{case}");
                assert!(split.ttft_secs >= bounds.layer_level - eps, "{case}");
                // Where loads are slower than computing, the chunk-level schedule meets
                // its bound: the bound is the best schedule, not a loose floor.
                if load_per_token >= 4e-3 {
                    assert!(whole.ttft_secs <= 1.01 * bounds.chunk_level, "{case}");
                }
            }
        }
    }
}

#[test]
fn reports_carry_each_chunks_own_costs_and_the_bounds_built_from_them_hold() {
    // What a benchmark builds its bounds from: each chunk's compute at its position in a
    // compute-only run, each chunk's read and import in a load-only run. Under the
    // simulator they are the machine's true costs, and the bidirectional run does not
    // beat the bounds built from them.
    let mut costs = costs(1e-3, 2e-3);
    costs.compute_secs_per_token_per_position = 2e-7;
    costs.load_latency_secs = 5e-3;
    costs.import_secs_per_token = 2e-5;
    let (chunks, io) = (6, 2);
    let compute_only = run_one(&costs, io, shape(chunks, |_| true, Mode::ComputeOnly));
    let load_only = run_one(&costs, io, shape(chunks, |_| true, Mode::LoadOnly));
    let read = costs.load_latency_secs + costs.load_secs_per_token * CHUNK as f64;
    let import = costs.import_secs_per_token * CHUNK as f64;
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
    assert_eq!(compute_only.chunk_timings.len(), chunks);
    assert_eq!(load_only.chunk_timings.len(), chunks);
    let mut per_chunk = Vec::new();
    for i in 0..chunks {
        let (computed, loaded) = (compute_only.chunk_timings[i], load_only.chunk_timings[i]);
        let compute = computed.computed_secs.expect("computed");
        assert!(
            close(compute, costs.compute(CHUNK, i * CHUNK)),
            "{computed:?}"
        );
        assert_eq!((computed.read_span, computed.imported_secs), (None, None));
        let (start, end) = loaded.read_span.expect("read whole");
        assert!(close(end - start, read), "{loaded:?}");
        assert!(
            close(loaded.imported_secs.expect("imported"), import),
            "{loaded:?}"
        );
        assert_eq!(loaded.computed_secs, None);
        per_chunk.push(ChunkCosts {
            compute,
            read: end - start,
            store: (end - start) / io as f64,
            import,
        });
    }
    let tail = costs.compute(16, chunks * CHUNK);
    assert!(close(compute_only.tail_secs, tail));
    let bounds = prefill_bounds(&per_chunk, compute_only.tail_secs);
    let bidirectional = run_one(&costs, io, shape(chunks, |_| true, Mode::Bidirectional));
    assert!(
        bidirectional.ttft_secs >= bounds.chunk_level - 1e-9,
        "{bounds:?} {bidirectional:?}"
    );
    assert!(
        compute_only.ttft_secs >= bounds.chunk_level && load_only.ttft_secs >= bounds.chunk_level
    );
}
