//! The bidirectional scheduler with the real model and real stores: exactness, write-back,
//! and every fault turning into computation.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ragcake::engine::{
    DType, DTypeChoice, Engine, EngineConfig, FinishReason, GenerateParams, KvCache, KvRange,
    Sampler, Sampling, Tensor,
};
use ragcake::kvstore::object_store::memory::InMemory;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use ragcake::kvstore::{CacheKey, KvStore, StorageDtype, Throttle, throttled};
use ragcake::scheduler::{
    BlendChunk, CacheKind, ChunkSpec, ComputeBackend, Filled, LoadBackend, LookupSummary,
    MIN_PREFILL_PIECE, MissReason, Mode, PlanOptions, PrefillRequest, PromptChunk, Recompute,
    RecomputeRule, RequestEvent, RequestStream, Scheduler, SchedulerConfig, SchedulerStats,
    StoredCache, plan, spread_recompute,
};
use ragcake_bench::layer_split::{LayerSplitConfig, SplitPoint, prefill_layer_split};

use crate::common::{
    max_abs, max_abs_diff, mean_kl, model_path, prose_tokens, runtime, s3_store_at,
    s3_store_that_is_down, shared_dense_engine, silent_server, store_over, stored_bytes,
};

/// A preamble, five chunks of prose of different lengths, and a question tail.
fn context() -> (Vec<Vec<u32>>, Vec<u32>) {
    let engine = shared_dense_engine();
    let tokens = prose_tokens(700);
    let mut chunks = vec![
        engine
            .tokenizer()
            .encode("Answer from the context.\n", false)
            .unwrap(),
    ];
    let mut at = 0;
    for len in [96, 150, 128, 200, 110] {
        chunks.push(tokens[at..at + len].to_vec());
        at += len;
    }
    let tail = engine
        .tokenizer()
        .encode("\nQuestion: what did keepers trim?", false)
        .unwrap();
    (chunks, tail)
}

/// Logits of the whole prompt computed in one pass, without the scheduler.
fn reference_logits(chunks: &[Vec<u32>], tail: &[u32]) -> Tensor {
    let engine = shared_dense_engine();
    let prompt: Vec<u32> = chunks.iter().flatten().chain(tail).copied().collect();
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &prompt, 512).unwrap()
}

fn scheduler(store: Arc<KvStore>, config: SchedulerConfig) -> Scheduler<Engine, KvStore> {
    Scheduler::start(shared_dense_engine(), store, config)
}

fn memory_store(dtype: StorageDtype) -> Arc<KvStore> {
    Arc::new(store_over(Arc::new(InMemory::new()), Path::default()).with_storage_dtype(dtype))
}

/// The scheduler's stats once `settled` holds of them, or after 10 s: write-backs are
/// queued and finished after the answer, so counts are read when they have settled.
async fn stats_when(
    scheduler: &Scheduler<Engine, KvStore>,
    settled: impl Fn(&SchedulerStats) -> bool,
) -> SchedulerStats {
    for _ in 0..400 {
        let stats = scheduler.stats();
        if settled(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    scheduler.stats()
}

/// Waits (bounded) until the scheduler has written back `n` chunks.
async fn written_back(scheduler: &Scheduler<Engine, KvStore>, n: u64) {
    let stats = stats_when(scheduler, |s| s.write_backs >= n).await;
    assert!(
        stats.write_backs >= n,
        "write-back did not finish: {stats:?}"
    );
}

/// Computes the context once with write-back on, so every chunk's exact prefix cache is
/// stored; waits (bounded) for the write-backs.
async fn fill_with_prefix_caches(
    scheduler: &Scheduler<Engine, KvStore>,
    store: &KvStore,
    chunks: &[Vec<u32>],
    tail: &[u32],
) {
    let before = scheduler.stats().write_backs;
    let (request, _) = planned(store, chunks, tail, Mode::ComputeOnly).await;
    let done = scheduler.prefill(request).await.unwrap();
    assert_eq!(done.report.chunks_computed, chunks.len());
    written_back(scheduler, before + chunks.len() as u64).await;
}

fn assert_same_logits<C: ComputeBackend<Logits = Tensor>>(
    got: &Filled<C>,
    want: &Tensor,
    tolerance: f32,
) {
    let diff = max_abs_diff(&got.logits, want);
    assert!(
        diff <= tolerance * max_abs(want),
        "logits differ by {diff}: {:?}",
        got.report
    );
    let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax(&got.logits), argmax(want), "greedy token differs");
}

#[test]
fn prefix_caches_written_back_then_loaded_reproduce_full_computation() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        // f32 storage: loading must reproduce computation to float-reordering noise.
        let store = memory_store(StorageDtype::F32);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());

        let (request, lookup) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        assert_eq!(lookup.prefix_hits + lookup.chunk_hits, 0, "empty store");
        let cold = scheduler.prefill(request).await.unwrap();
        assert_eq!(cold.report.chunks_computed, chunks.len());
        assert_same_logits(&cold, &want, 1e-4);
        written_back(&scheduler, chunks.len() as u64).await;

        for mode in [Mode::Bidirectional, Mode::LoadOnly] {
            let (request, lookup) = planned(&store, &chunks, &tail, mode).await;
            assert_eq!(lookup.prefix_hits, chunks.len());
            let warm = scheduler.prefill(request).await.unwrap();
            assert!(warm.report.chunks_loaded > 0, "{:?}", warm.report);
            assert_eq!(
                warm.report.chunks_loaded + warm.report.chunks_computed,
                chunks.len()
            );
            assert!(!warm.report.degraded);
            assert_same_logits(&warm, &want, 1e-4);
        }
        let (request, _) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        let all_loaded = scheduler.prefill(request).await.unwrap();
        assert_eq!(all_loaded.report.chunks_loaded, chunks.len());
        assert_eq!(all_loaded.report.tokens_computed, tail.len());
    });
}

#[test]
fn f16_stored_prefix_caches_keep_the_greedy_answer() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F16);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        fill_with_prefix_caches(&scheduler, &store, &chunks, &tail).await;
        let (request, _) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        let warm = scheduler.prefill(request).await.unwrap();
        assert_eq!(warm.report.chunks_loaded, chunks.len());
        // f16 rounding of the stored keys and values: small, not zero.
        assert_same_logits(&warm, &want, 2e-2);
    });
}

/// Stores `tokens`' position-independent cache: the chunk computed alone, at position 0.
async fn store_chunk_cache(store: &KvStore, tokens: &[u32]) {
    let engine = shared_dense_engine();
    let mut alone = engine.new_cache();
    engine
        .append(&mut alone, tokens, tokens.len(), false)
        .unwrap();
    let kv = alone.export(0..tokens.len()).unwrap();
    store
        .put(&store.chunk_key(&[], tokens), tokens, &kv)
        .await
        .unwrap();
}

#[test]
fn a_chunk_cache_in_the_middle_writes_back_only_the_chunks_before_it() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F32);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        store_chunk_cache(&store, &chunks[2]).await;

        let (request, lookup) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        assert_eq!((lookup.prefix_hits, lookup.chunk_hits), (0, 1));
        let mixed = scheduler.prefill(request).await.unwrap();
        assert_eq!(mixed.report.chunks_loaded, 1, "{:?}", mixed.report);
        assert_eq!(mixed.report.in_context_chunks, 2, "{:?}", mixed.report);
        written_back(&scheduler, 2).await;
        // Only the two chunks before the approximate one are stored as prefix caches.
        let keys = store.prefix_chain(chunks.iter().map(Vec::as_slice));
        for (i, key) in keys.iter().enumerate() {
            let stored = store.contains(key).await.unwrap();
            assert_eq!(stored, i < 2, "prefix cache of chunk {i}");
        }
        assert_eq!(scheduler.stats().write_backs, 2);

        // The exact request that follows loads those two and computes the rest: the
        // logits of full computation.
        let prompt = chunks.iter().cloned().map(PromptChunk::from).collect();
        let options = PlanOptions {
            mode: Mode::LoadOnly,
            exact: true,
            ..PlanOptions::default()
        };
        let (request, lookup) = plan(&*store, prompt, tail.clone(), options).await;
        assert_eq!((lookup.prefix_hits, lookup.chunk_hits), (2, 0));
        let exact = scheduler.prefill(request).await.unwrap();
        assert_eq!(exact.report.chunks_loaded, 2, "{:?}", exact.report);
        assert_eq!(exact.report.in_context_chunks, chunks.len());
        assert_same_logits(&exact, &want, 1e-4);
    });
}

#[test]
fn the_caller_reusing_its_cache_at_once_does_not_change_what_is_written_back() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F32);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let mut done = scheduler.prefill(request).await.unwrap();
        // Refill the same buffers with other tokens before the write-backs have run.
        done.cache.truncate(0);
        let other = prose_tokens(1500)[800..1400].to_vec();
        shared_dense_engine()
            .append(&mut done.cache, &other, 512, false)
            .unwrap();
        written_back(&scheduler, chunks.len() as u64).await;

        let (request, lookup) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        assert_eq!(lookup.prefix_hits, chunks.len());
        let warm = scheduler.prefill(request).await.unwrap();
        assert_eq!(warm.report.chunks_loaded, chunks.len());
        assert_same_logits(&warm, &want, 1e-4);
    });
}

#[test]
fn a_prefix_cache_already_stored_is_not_written_again() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let store = memory_store(StorageDtype::F16);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        fill_with_prefix_caches(&scheduler, &store, &chunks, &tail).await;
        let puts = store.stats().puts;

        // Compute-only plans no lookup: the write-back asks first and finds them stored.
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        scheduler.prefill(request).await.unwrap();
        for _ in 0..200 {
            if scheduler.stats().write_backs_skipped >= chunks.len() as u64 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert_eq!(scheduler.stats().write_backs_skipped, chunks.len() as u64);

        // Bidirectional planning finds them: nothing to write back even if computed.
        let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        assert!(request.chunks.iter().all(|c| c.write_back.is_none()));
        scheduler.prefill(request).await.unwrap();
        assert_eq!(
            store.stats().puts,
            puts,
            "a stored prefix cache was written again"
        );
    });
}

/// A request whose chunks are all planned as stored under their prefix keys.
/// Flips one byte at `fraction` of the length of the blob stored under `key`.
async fn corrupt_blob(store: &KvStore, key: &CacheKey, fraction: f64) {
    let path = store.path_of(key);
    let mut blob = stored_bytes(store, key).await;
    let at = (blob.len() as f64 * fraction) as usize;
    blob[at] ^= 0x40;
    store
        .object_store()
        .put(&path, PutPayload::from(blob))
        .await
        .unwrap();
}

/// Every chunk computed, the request flagged degraded, the answer unchanged.
fn assert_computed_around_a_failed_store(done: &Filled<Engine>, chunks: usize, want: &Tensor) {
    assert_eq!(done.report.chunks_computed, chunks, "{:?}", done.report);
    assert!(done.report.degraded, "{:?}", done.report);
    assert_same_logits(done, want, 1e-4);
}

/// Plans a prefill of `chunks` then `tail` against `store` (every chunk cache's status
/// unknown, so planning asks the store).
async fn planned(
    store: &KvStore,
    chunks: &[Vec<u32>],
    tail: &[u32],
    mode: Mode,
) -> (PrefillRequest<CacheKey>, LookupSummary) {
    let chunks = chunks.iter().cloned().map(PromptChunk::from).collect();
    plan(store, chunks, tail.to_vec(), mode.into()).await
}

fn planned_as_stored(chunks: &[Vec<u32>], tail: &[u32], mode: Mode) -> PrefillRequest<CacheKey> {
    let store = memory_store(StorageDtype::F16);
    let keys = store.prefix_chain(chunks.iter().map(Vec::as_slice));
    PrefillRequest {
        chunks: chunks
            .iter()
            .zip(keys)
            .map(|(tokens, key)| ChunkSpec {
                tokens: tokens.as_slice().into(),
                stored: Some(StoredCache {
                    key,
                    kind: CacheKind::Prefix,
                }),
                write_back: None,
                recompute: Recompute::NONE,
            })
            .collect(),
        tail: tail.to_vec(),
        mode,
    }
}

/// A KV store whose backend is down, and a scheduler that gives up a load after 2 s.
fn on_a_store_that_is_down() -> (Arc<KvStore>, Scheduler<Engine, KvStore>) {
    let (down, prefix) = s3_store_that_is_down();
    let store = Arc::new(store_over(down, prefix));
    let config = SchedulerConfig {
        load_timeout_secs: 2.0,
        ..SchedulerConfig::default()
    };
    (store.clone(), scheduler(store, config))
}

#[test]
fn a_store_that_is_down_is_computed_around_and_flagged_degraded() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let (_, scheduler) = on_a_store_that_is_down();
        for mode in [Mode::Bidirectional, Mode::LoadOnly] {
            let done = scheduler
                .prefill(planned_as_stored(&chunks, &tail, mode))
                .await
                .unwrap();
            assert_computed_around_a_failed_store(&done, chunks.len(), &want);
            assert!(
                done.report
                    .misses
                    .iter()
                    .any(|m| matches!(m.reason, MissReason::StoreFailed(_) | MissReason::Stalled))
            );
        }
    });
}

#[test]
fn a_stalled_store_costs_about_one_chunk_not_the_stall() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let fast = Arc::new(store_over(inner.clone(), Path::default()));
        let filler = scheduler(fast.clone(), SchedulerConfig::default());
        fill_with_prefix_caches(&filler, &fast, &chunks, &tail).await;

        // The same objects behind a store that takes 60 s to answer any read.
        let stalled = throttled(
            inner,
            Throttle {
                bytes_per_second: None,
                latency: Duration::from_secs(60),
            },
        );
        let store = Arc::new(store_over(stalled, Path::default()));
        // What this store takes when healthy (a local read, ~0.1 ms per token): a load
        // overtaken after many times that is a stall, however fast the machine computes.
        let config = SchedulerConfig {
            load_secs_per_token: 1e-4,
            ..SchedulerConfig::default()
        };
        let scheduler = scheduler(store, config);
        let started = std::time::Instant::now();
        let done = scheduler
            .prefill(planned_as_stored(&chunks, &tail, Mode::Bidirectional))
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "waited for the stall"
        );
        assert_computed_around_a_failed_store(&done, chunks.len(), &want);
    });
}

#[test]
fn a_corrupt_blob_is_recomputed_and_the_answer_is_unchanged() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F32);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        fill_with_prefix_caches(&scheduler, &store, &chunks, &tail).await;

        // Flip a byte in the middle of the last chunk's blob.
        let keys = store.prefix_chain(chunks.iter().map(Vec::as_slice));
        corrupt_blob(&store, keys.last().unwrap(), 0.5).await;

        let (request, _) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        let done = scheduler.prefill(request).await.unwrap();
        let last = chunks.len() - 1;
        assert!(
            done.report
                .misses
                .iter()
                .any(|m| m.chunk == last && matches!(m.reason, MissReason::Rejected(_))),
            "{:?}",
            done.report
        );
        assert_eq!(done.report.chunks_computed, 1);
        assert!(
            !done.report.degraded,
            "a corrupt blob is a miss, not a store failure"
        );
        assert_same_logits(&done, &want, 1e-4);
        assert_eq!(store.stats().rejected, 1);
    });
}

/// A store whose every request takes a minute.
fn stalled_store() -> Arc<KvStore> {
    let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
    let stalled = throttled(
        inner,
        Throttle {
            bytes_per_second: None,
            latency: Duration::from_secs(60),
        },
    );
    Arc::new(store_over(stalled, Path::default()))
}

#[test]
fn a_cancelled_request_frees_its_resources() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let scheduler = scheduler(stalled_store(), SchedulerConfig::default());
        let request = planned_as_stored(&chunks, &tail, Mode::LoadOnly);
        let gave_up =
            tokio::time::timeout(Duration::from_millis(200), scheduler.prefill(request)).await;
        assert!(
            gave_up.is_err(),
            "load-only on a stalled store cannot finish in 200 ms"
        );
        let stats = scheduler.stats();
        assert_eq!(stats.cancelled, 1, "{stats:?}");
        assert_eq!(stats.in_flight, 0, "{stats:?}");
        // The scheduler keeps serving.
        let done = scheduler
            .prefill(planned_as_stored(&chunks, &tail, Mode::ComputeOnly))
            .await
            .unwrap();
        assert_eq!(done.report.chunks_computed, chunks.len());
    });
}

#[test]
fn prefix_caches_in_the_default_storage_give_the_logits_of_computation_bit_for_bit() {
    // What `exact` promises: a request over exact prefix caches (stored in f32 by default)
    // gets the logits computing the same chunks gives, to the bit.
    runtime().block_on(async {
        let (chunks, tail) = context();
        let store = Arc::new(store_over(Arc::new(InMemory::new()), Path::default()));
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let computed = scheduler.prefill(request).await.unwrap();
        written_back(&scheduler, chunks.len() as u64).await;
        let options = PlanOptions {
            mode: Mode::LoadOnly,
            exact: true,
            ..PlanOptions::default()
        };
        let prompt = chunks.iter().cloned().map(PromptChunk::from).collect();
        let (request, lookup) = plan(&*store, prompt, tail.clone(), options).await;
        assert_eq!(lookup.prefix_hits, chunks.len());
        let loaded = scheduler.prefill(request).await.unwrap();
        assert_eq!(loaded.report.chunks_loaded, chunks.len());
        assert_eq!(max_abs_diff(&loaded.logits, &computed.logits), 0.0);
    });
}

#[test]
fn an_engine_computing_in_bf16_keeps_the_greedy_token_and_loads_its_own_prefix_caches_bit_for_bit()
{
    // The GPU's dtype, on the CPU: weights and KV in bf16 (as `--dtype bf16`, the default
    // on a GPU). Its exact prefix caches are keyed apart from the f32 engine's and reproduce
    // its own computation to the bit.
    runtime().block_on(async {
        let config = EngineConfig {
            dtype: Some(DTypeChoice::Bf16),
            quantized_decode: false,
            ..EngineConfig::default()
        };
        let engine = Arc::new(Engine::load(model_path(), &config).unwrap());
        assert_eq!(engine.new_cache().dtype(), DType::BF16);
        let (chunks, tail) = context();
        let f32_logits = reference_logits(&chunks, &tail);
        let store = Arc::new(KvStore::for_engine(
            Arc::new(InMemory::new()),
            Path::default(),
            &engine,
        ));
        let f32_store = memory_store(StorageDtype::F32);
        assert_ne!(
            store.prefix_key(None, &chunks[0]),
            f32_store.prefix_key(None, &chunks[0]),
            "bf16 and f32 caches share no key"
        );
        let scheduler = Scheduler::start(engine.clone(), store.clone(), SchedulerConfig::default());
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let computed = scheduler.prefill(request).await.unwrap();
        written_back(&scheduler, chunks.len() as u64).await;
        // bf16 rounding moves the logits a little, not the answer.
        let argmax = |t: &Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        let f32_of_bf16 = computed.logits.to_dtype(DType::F32).unwrap();
        assert_eq!(argmax(&f32_of_bf16), argmax(&f32_logits));
        let diff = max_abs_diff(&f32_of_bf16, &f32_logits);
        assert!(
            diff < 0.1 * max_abs(&f32_logits),
            "bf16 logits {diff} off f32"
        );

        let (request, lookup) = planned(&store, &chunks, &tail, Mode::LoadOnly).await;
        assert_eq!(lookup.prefix_hits, chunks.len());
        let loaded = scheduler.prefill(request).await.unwrap();
        assert_eq!(loaded.report.chunks_loaded, chunks.len());
        assert_eq!(max_abs_diff(&loaded.logits, &computed.logits), 0.0);
    });
}

/// Stores the chunk caches of `chunks[1..]`, each computed after `chunks[0]` (the
/// preamble: the context the precompute job computes chunk caches after).
async fn store_chunk_caches_after_the_preamble(store: &KvStore, chunks: &[Vec<u32>]) {
    let engine = shared_dense_engine();
    let context = &chunks[0];
    for tokens in &chunks[1..] {
        let mut cache = engine.new_cache();
        engine
            .append(&mut cache, context, context.len(), false)
            .unwrap();
        engine
            .append(&mut cache, tokens, tokens.len(), false)
            .unwrap();
        let kv = cache.export(context.len()..cache.len()).unwrap();
        let key = store.chunk_key(context, tokens);
        store.put(&key, tokens, &kv).await.unwrap();
    }
}

/// An in-memory store holding the chunk caches of `chunks[1..]` computed after `chunks[0]`,
/// and a scheduler over it that writes nothing back.
async fn with_chunk_caches(chunks: &[Vec<u32>]) -> (Arc<KvStore>, Scheduler<Engine, KvStore>) {
    let store = memory_store(StorageDtype::F16);
    store_chunk_caches_after_the_preamble(&store, chunks).await;
    let config = SchedulerConfig {
        write_back: false,
        ..SchedulerConfig::default()
    };
    (store.clone(), scheduler(store, config))
}

/// Plans `chunks` (the preamble first, each other one recorded as having a chunk cache)
/// with chunk caches computed after the preamble, blended by `recompute`.
async fn planned_with_chunk_caches(
    store: &KvStore,
    chunks: &[Vec<u32>],
    tail: &[u32],
    mode: Mode,
    recompute: Recompute,
) -> (PrefillRequest<CacheKey>, LookupSummary) {
    let prompt = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| PromptChunk::with_chunk_cache(c.clone(), i > 0))
        .collect();
    let options = PlanOptions {
        mode,
        exact: false,
        recompute,
        chunk_context: chunks[0].as_slice().into(),
        ..PlanOptions::default()
    };
    plan(store, prompt, tail.to_vec(), options).await
}

fn deviation(ratio: f64) -> Recompute {
    Recompute {
        ratio,
        ..Recompute::NONE
    }
}

#[test]
fn chunk_caches_are_blended_with_the_tail_by_every_rule_and_recomputing_every_token_is_full_computation()
 {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let (store, scheduler) = with_chunk_caches(&chunks).await;
        let loaded: usize = chunks[1..].iter().map(Vec::len).sum();
        // The first chunk follows the context its cache was computed after: nothing to
        // blend there; its share of the budget goes to the chunks after it.
        let needing = loaded - chunks[1].len();

        let mut naive_kl = None;
        for (rule, ratio) in std::iter::once((RecomputeRule::Deviation, 0.0)).chain(
            RecomputeRule::ALL
                .into_iter()
                .flat_map(|rule| [(rule, 0.2), (rule, 1.0)]),
        ) {
            let recompute = Recompute {
                rule,
                ratio,
                correct_attention: false,
                load_paid: false,
            };
            let (request, lookup) =
                planned_with_chunk_caches(&store, &chunks, &tail, Mode::LoadOnly, recompute).await;
            assert_eq!(
                (lookup.chunk_hits, lookup.other_context),
                (chunks.len() - 1, false)
            );
            assert_eq!(request.chunks[1].recompute.ratio, 0.0);
            let spread = (ratio * loaded as f64 / needing as f64).min(1.0);
            let expected: usize = request.chunks[2..]
                .iter()
                .map(|c| {
                    assert_eq!(c.recompute.ratio, spread);
                    c.recompute.tokens(c.tokens.len())
                })
                .sum();
            let done = scheduler.prefill(request).await.unwrap();
            assert_eq!(
                done.report.chunks_loaded,
                chunks.len() - 1,
                "{:?}",
                done.report
            );
            assert_eq!(done.report.tokens_recomputed, expected, "{recompute:?}");
            assert_eq!(
                done.report.in_context_chunks, 1,
                "chunk caches are approximate"
            );
            let kl = mean_kl(&want, &done.logits);
            match (naive_kl, ratio) {
                (None, _) => naive_kl = Some(kl),
                (Some(naive), 0.2) => assert!(
                    kl < naive,
                    "{rule}: blending 20% did not come closer: KL {kl} vs naive {naive}"
                ),
                _ => {
                    // Every token after the first chunk recomputed: full computation, up
                    // to the f16 rounding of the first chunk's cache.
                    assert_eq!(expected, needing);
                    assert_same_logits(&done, &want, 2e-2);
                }
            }
        }
    });
}

#[test]
fn chunk_caches_planned_on_a_store_that_is_down_are_computed_and_nothing_is_blended() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let (store, scheduler) = on_a_store_that_is_down();
        let mut request = planned_as_stored(&chunks, &tail, Mode::Bidirectional);
        for (chunk, spec) in request.chunks.iter_mut().enumerate().skip(1) {
            spec.stored = Some(StoredCache {
                key: store.chunk_key(&chunks[0], &chunks[chunk]),
                kind: CacheKind::Chunk,
            });
        }
        spread_recompute(&mut request.chunks, deviation(0.3), &chunks[0]);
        let done = scheduler.prefill(request).await.unwrap();
        assert_computed_around_a_failed_store(&done, chunks.len(), &want);
        assert_eq!(done.report.tokens_recomputed, 0);
    });
}

#[test]
fn a_blended_request_cancelled_in_flight_leaves_the_next_one_unchanged() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let (store, scheduler) = with_chunk_caches(&chunks).await;
        let request =
            || planned_with_chunk_caches(&store, &chunks, &tail, Mode::LoadOnly, deviation(1.0));
        let uninterrupted = scheduler.prefill(request().await.0).await.unwrap();
        // Every chunk recomputed takes seconds: dropped while its loads or its blend run.
        let gave_up = tokio::time::timeout(
            Duration::from_millis(300),
            scheduler.prefill(request().await.0),
        )
        .await;
        assert!(gave_up.is_err(), "a full blend does not finish in 300 ms");
        let stats = scheduler.stats();
        assert_eq!((stats.cancelled, stats.in_flight), (1, 0), "{stats:?}");
        let again = scheduler.prefill(request().await.0).await.unwrap();
        assert_eq!(
            again.report.tokens_recomputed,
            uninterrupted.report.tokens_recomputed
        );
        assert_eq!(max_abs_diff(&again.logits, &uninterrupted.logits), 0.0);
    });
}

#[test]
fn concurrent_requests_share_the_compute_worker_and_all_finish() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F32);
        let scheduler = Arc::new(scheduler(store.clone(), SchedulerConfig::default()));
        fill_with_prefix_caches(&scheduler, &store, &chunks, &tail).await;

        let mut tasks = Vec::new();
        for i in 0..6 {
            let (scheduler, store, chunks, tail) = (
                scheduler.clone(),
                store.clone(),
                chunks.clone(),
                tail.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mode = Mode::ALL[i % 3];
                let (request, _) = planned(&store, &chunks, &tail, mode).await;
                scheduler.prefill(request).await.unwrap()
            }));
        }
        for task in tasks {
            let done = task.await.unwrap();
            assert_same_logits(&done, &want, 1e-4);
        }
        let stats = scheduler.stats();
        assert_eq!(stats.completed, 7);
        assert_eq!(stats.in_flight, 0);
    });
}

/// The test context, its reference logits, and an f32 store holding every chunk's exact
/// prefix cache.
async fn stored_context() -> (Vec<Vec<u32>>, Vec<u32>, Tensor, Arc<KvStore>) {
    let (chunks, tail) = context();
    let want = reference_logits(&chunks, &tail);
    let store = memory_store(StorageDtype::F32);
    let filler = scheduler(store.clone(), SchedulerConfig::default());
    fill_with_prefix_caches(&filler, &store, &chunks, &tail).await;
    (chunks, tail, want, store)
}

/// Every stored chunk split, its layers from `layer` on loaded.
fn split_config(layer: usize) -> LayerSplitConfig {
    LayerSplitConfig {
        split: SplitPoint { chunk: 0, layer },
        io_concurrency: 4,
        load_timeout_secs: 2.0,
    }
}

#[test]
fn a_layer_split_of_stored_prefix_caches_reproduces_full_computation() {
    runtime().block_on(async {
        let (chunks, tail, want, store) = stored_context().await;
        let engine = shared_dense_engine();
        let layers = engine.kv_shape().n_layers;

        for split in [1, layers / 3, layers - 1] {
            let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
            let done =
                prefill_layer_split(engine.clone(), store.clone(), request, &split_config(split))
                    .await
                    .unwrap();
            assert_eq!(done.report.chunks_loaded, chunks.len(), "{:?}", done.report);
            assert_eq!(done.report.chunks_computed, 0);
            assert_eq!(done.report.split_layer, Some(split));
            assert_eq!(done.report.tokens_computed, tail.len());
            assert!(done.report.misses.is_empty() && !done.report.degraded);
            assert_same_logits(&done, &want, 1e-4);
        }

        // The front computed in full, the rest split.
        let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        let config = LayerSplitConfig {
            split: SplitPoint { chunk: 3, layer: 7 },
            ..split_config(7)
        };
        let done = prefill_layer_split(engine.clone(), store.clone(), request, &config)
            .await
            .unwrap();
        assert_eq!(
            done.report.computed_chunks,
            vec![0, 1, 2],
            "{:?}",
            done.report
        );
        assert_eq!(done.report.chunks_loaded, chunks.len() - 3);
        assert_same_logits(&done, &want, 1e-4);

        // A chunk with no stored cache in the middle is computed in full, after the tops
        // of the chunks before it.
        let (mut request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        request.chunks[2].stored = None;
        let done = prefill_layer_split(engine.clone(), store.clone(), request, &split_config(12))
            .await
            .unwrap();
        assert_eq!(done.report.computed_chunks, vec![2], "{:?}", done.report);
        assert_eq!(done.report.chunks_loaded, chunks.len() - 1);
        assert_same_logits(&done, &want, 1e-4);

        // A split with nothing to compute or nothing to load is refused.
        for split in [0, layers] {
            let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
            let refused =
                prefill_layer_split(engine.clone(), store.clone(), request, &split_config(split))
                    .await;
            assert!(refused.is_err(), "split at {split} was accepted");
        }
    });
}

#[test]
fn a_layer_split_computes_around_a_corrupt_top_and_a_store_that_is_down() {
    runtime().block_on(async {
        let (chunks, tail, want, store) = stored_context().await;
        let engine = shared_dense_engine();
        let keys = store.prefix_chain(chunks.iter().map(Vec::as_slice));
        // Three quarters in: inside the value tensors of the top layers, which are read.
        corrupt_blob(&store, &keys[1], 0.75).await;

        let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        let done = prefill_layer_split(engine.clone(), store.clone(), request, &split_config(10))
            .await
            .unwrap();
        assert!(
            done.report
                .misses
                .iter()
                .any(|m| m.chunk == 1 && matches!(m.reason, MissReason::Rejected(_))),
            "{:?}",
            done.report
        );
        assert_eq!(done.report.computed_chunks, vec![1]);
        assert!(
            !done.report.degraded,
            "a corrupt blob is a miss, not a failure"
        );
        assert_same_logits(&done, &want, 1e-4);

        let (down, prefix) = s3_store_that_is_down();
        let down = Arc::new(store_over(down, prefix));
        let request = planned_as_stored(&chunks, &tail, Mode::Bidirectional);
        let done = prefill_layer_split(engine.clone(), down, request, &split_config(10))
            .await
            .unwrap();
        assert_computed_around_a_failed_store(&done, chunks.len(), &want);
    });
}

#[test]
fn the_shared_scheduler_splits_chunks_at_a_layer_on_a_slow_store_and_keeps_the_logits() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let fast = Arc::new(
            store_over(inner.clone(), Path::default()).with_storage_dtype(StorageDtype::F32),
        );
        let filler = scheduler(fast.clone(), SchedulerConfig::default());
        fill_with_prefix_caches(&filler, &fast, &chunks, &tail).await;

        // The same f32 blobs (46 KB per token) at 2 MB/s per read: a whole chunk loads in
        // 2-5 s, longer than computing the context up to it, so the chunks the compute
        // worker would otherwise compute whole are split.
        let bandwidth = 2e6;
        let slow = throttled(
            inner,
            Throttle {
                bytes_per_second: Some(bandwidth),
                latency: Duration::ZERO,
            },
        );
        let store =
            Arc::new(store_over(slow, Path::default()).with_storage_dtype(StorageDtype::F32));
        let bytes_per_token = shared_dense_engine()
            .model()
            .config()
            .kv_shape()
            .values_per_token()
            * 4;
        let config = SchedulerConfig {
            load_secs_per_token: bytes_per_token as f64 / bandwidth,
            ..SchedulerConfig::default()
        };
        let scheduler = scheduler(store.clone(), config);
        let (request, _) = planned(&store, &chunks, &tail, Mode::Bidirectional).await;
        let done = scheduler.prefill(request).await.unwrap();
        let report = &done.report;
        assert!(report.chunks_split >= 1, "{report:?}");
        assert!(
            report.split_layer.is_some_and(|l| l > 0 && l < 30),
            "{report:?}"
        );
        assert_eq!(
            report.chunks_computed + report.chunks_loaded,
            chunks.len(),
            "{report:?}"
        );
        assert!(report.misses.is_empty() && !report.degraded, "{report:?}");
        // Bottom layers computed in context, top layers loaded from exact prefix caches
        // stored in f32: the logits of full computation.
        assert_same_logits(&done, &want, 1e-4);
    });
}

#[test]
fn write_back_to_a_store_that_never_answers_is_bounded_counted_and_never_delays_answers() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let (silent, prefix) = s3_store_at(&silent_server());
        let store = Arc::new(store_over(silent, prefix));
        // Room for one request's chunks (exported as the cache holds them: f32).
        let per_token = shared_dense_engine()
            .model()
            .config()
            .kv_shape()
            .values_per_token()
            * 4;
        let request_bytes = chunks.iter().map(Vec::len).sum::<usize>() * per_token;
        let config = SchedulerConfig {
            write_back_queue_bytes: request_bytes * 3 / 2,
            write_back_timeout_secs: 60.0,
            ..SchedulerConfig::default()
        };
        let scheduler = scheduler(store.clone(), config);
        for _ in 0..3 {
            let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
            let done = scheduler.prefill(request).await.unwrap();
            assert_eq!(done.report.chunks_computed, chunks.len());
            let stats = scheduler.stats();
            assert!(
                stats.write_back_pending_bytes as usize <= request_bytes * 3 / 2,
                "{stats:?}"
            );
        }
        // The first request's chunks wait on the silent store; the others' did not fit.
        let dropped = 2 * chunks.len() as u64;
        let stats = stats_when(&scheduler, |s| s.write_backs_dropped >= dropped).await;
        assert_eq!(
            stats.write_back_pending_bytes as usize, request_bytes,
            "{stats:?}"
        );
        assert_eq!(
            stats.write_backs_dropped,
            2 * chunks.len() as u64,
            "{stats:?}"
        );
        assert_eq!(stats.write_backs, 0);

        // Each write is given up at the timeout: the queue drains, the failures counted.
        let config = SchedulerConfig {
            write_back_timeout_secs: 0.5,
            ..SchedulerConfig::default()
        };
        let scheduler = self::scheduler(store.clone(), config);
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        scheduler.prefill(request).await.unwrap();
        let failed = chunks.len() as u64;
        let stats = stats_when(&scheduler, |s| {
            s.write_back_failures >= failed && s.write_back_pending_bytes == 0
        })
        .await;
        assert_eq!(stats.write_back_pending_bytes, 0, "{stats:?}");
        assert_eq!(stats.write_back_failures, chunks.len() as u64, "{stats:?}");
        assert_eq!(stats.write_backs_dropped, 0, "{stats:?}");
    });
}

/// The engine behind a fault switch: the next prefill pass or decode step panics when set.
struct Faulty {
    engine: Arc<Engine>,
    panic_in_compute: AtomicBool,
    panic_in_decode: AtomicBool,
}

impl Faulty {
    fn trip(switch: &AtomicBool, step: &str) {
        if switch.swap(false, Ordering::SeqCst) {
            panic!("fault injected in a {step} step");
        }
    }
}

impl ComputeBackend for Faulty {
    type Cache = KvCache;
    type Kv = KvRange;
    type Logits = Tensor;

    fn new_cache(&self) -> KvCache {
        self.engine.new_cache()
    }
    fn max_tokens(&self) -> usize {
        ComputeBackend::max_tokens(&*self.engine)
    }
    fn compute(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        logits: bool,
    ) -> ragcake::scheduler::Result<Option<Tensor>> {
        Self::trip(&self.panic_in_compute, "prefill");
        ComputeBackend::compute(&*self.engine, cache, tokens, logits)
    }
    fn import(&self, cache: &mut KvCache, kv: &KvRange) -> ragcake::scheduler::Result<()> {
        ComputeBackend::import(&*self.engine, cache, kv)
    }
    fn export(
        &self,
        cache: &KvCache,
        range: std::ops::Range<usize>,
    ) -> ragcake::scheduler::Result<KvRange> {
        ComputeBackend::export(&*self.engine, cache, range)
    }
    fn kv_bytes(&self, kv: &KvRange) -> usize {
        kv.bytes()
    }
    fn compute_tail(
        &self,
        cache: &mut KvCache,
        tail: &[u32],
        blends: &[BlendChunk],
    ) -> ragcake::scheduler::Result<(Tensor, usize)> {
        ComputeBackend::compute_tail(&*self.engine, cache, tail, blends)
    }
    fn layers(&self) -> usize {
        ComputeBackend::layers(&*self.engine)
    }
    fn compute_bottom(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        layers: usize,
    ) -> ragcake::scheduler::Result<()> {
        ComputeBackend::compute_bottom(&*self.engine, cache, tokens, layers)
    }
    fn fill_top(
        &self,
        cache: &mut KvCache,
        kv: &KvRange,
        first_layer: usize,
    ) -> ragcake::scheduler::Result<()> {
        ComputeBackend::fill_top(&*self.engine, cache, kv, first_layer)
    }
    fn decode(
        &self,
        caches: &mut [&mut KvCache],
        tokens: &[u32],
    ) -> ragcake::scheduler::Result<Vec<Tensor>> {
        Self::trip(&self.panic_in_decode, "decode");
        ComputeBackend::decode(&*self.engine, caches, tokens)
    }
    fn sample(&self, sampler: &mut Sampler, logits: &Tensor) -> ragcake::scheduler::Result<u32> {
        ComputeBackend::sample(&*self.engine, sampler, logits)
    }
    fn ends_generation(&self, token: u32) -> bool {
        ComputeBackend::ends_generation(&*self.engine, token)
    }
    fn next_position(&self, cache: &KvCache) -> usize {
        cache.next_position()
    }
}

#[test]
fn a_panic_in_a_step_fails_that_request_and_the_restarted_worker_serves_the_rest() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let want = reference_logits(&chunks, &tail);
        let store = memory_store(StorageDtype::F32);
        let faulty = Arc::new(Faulty {
            engine: shared_dense_engine(),
            panic_in_compute: AtomicBool::new(false),
            panic_in_decode: AtomicBool::new(false),
        });
        let scheduler = Scheduler::start(faulty.clone(), store.clone(), SchedulerConfig::default());

        faulty.panic_in_compute.store(true, Ordering::SeqCst);
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let failed = tokio::time::timeout(Duration::from_secs(60), scheduler.prefill(request))
            .await
            .expect("a panicking step fails its request, it does not wedge it");
        let Err(error) = failed else {
            panic!("the panicking step's request fails");
        };
        assert!(error.to_string().contains("compute worker"), "{error}");

        // The next request is served by the restarted worker, with the right answer.
        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let done = scheduler.prefill(request).await.unwrap();
        assert_same_logits(&done, &want, 1e-4);

        // A decode step that panics ends its sequences' streams without a finish.
        faulty.panic_in_decode.store(true, Ordering::SeqCst);
        let mut stream = scheduler
            .decode(done.cache, &done.logits, greedy(8))
            .unwrap();
        let mut finished = false;
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
                Ok(Some(RequestEvent::Token(_))) => {}
                Ok(Some(_)) => finished = true,
                Ok(None) => break,
                Err(_) => panic!("a stream of a panicked decode step never ended"),
            }
        }
        assert!(
            !finished,
            "a decode step that panicked cannot have finished"
        );

        let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
        let done = scheduler.prefill(request).await.unwrap();
        assert_same_logits(&done, &want, 1e-4);
        let stats = scheduler.stats();
        assert_eq!(stats.worker_restarts, 2, "{stats:?}");
        assert!(stats.worker_alive, "{stats:?}");
        assert_eq!((stats.in_flight, stats.decoding), (0, 0), "{stats:?}");
        assert_eq!(stats.failed, 1, "{stats:?}");
    });
}

/// Three prompts (the preamble, one chunk, the question), each prefilled alone.
fn decode_prompts() -> Vec<(ragcake::engine::KvCache, Tensor)> {
    let engine = shared_dense_engine();
    let (chunks, tail) = context();
    chunks[1..4]
        .iter()
        .map(|chunk| {
            let prompt: Vec<u32> = [&chunks[0], chunk, &tail]
                .into_iter()
                .flatten()
                .copied()
                .collect();
            let mut cache = engine.new_cache();
            let logits = engine.prefill(&mut cache, &prompt, 512).unwrap();
            (cache, logits)
        })
        .collect()
}

/// Greedy parameters for `max_tokens` tokens.
fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

/// Reads a decode stream to its end after the `tokens` read from it already: all its
/// tokens and how it finished.
async fn read_to_end(mut stream: RequestStream, mut tokens: Vec<u32>) -> (Vec<u32>, FinishReason) {
    for _ in 0..10_000 {
        match stream
            .next()
            .await
            .expect("a stream ends with Finished or Failed")
        {
            RequestEvent::Token(t) => tokens.push(t),
            RequestEvent::Finished {
                reason, tokens: n, ..
            } => {
                assert_eq!(n, tokens.len());
                return (tokens, reason);
            }
            RequestEvent::Failed(error) => panic!("decode failed: {error}"),
            RequestEvent::Prefilled(report) => panic!("a second prefill report: {report:?}"),
        }
    }
    panic!("no end after 10000 events");
}

#[test]
fn sequences_decoded_together_in_the_scheduler_get_the_greedy_tokens_they_get_alone() {
    runtime().block_on(async {
        let engine = shared_dense_engine();
        const TOKENS: usize = 12;
        let alone: Vec<(Vec<u32>, FinishReason)> = decode_prompts()
            .into_iter()
            .map(|(mut cache, logits)| {
                let generation = engine
                    .generate(&mut cache, &logits, &greedy(TOKENS), |_| {
                        std::ops::ControlFlow::Continue(())
                    })
                    .unwrap();
                (generation.tokens, generation.finish_reason)
            })
            .collect();

        let scheduler = scheduler(memory_store(StorageDtype::F16), SchedulerConfig::default());
        let mut prompts = decode_prompts().into_iter();
        // The first sequence decodes a few steps before the others join it.
        let (cache, logits) = prompts.next().unwrap();
        let mut first = scheduler.decode(cache, &logits, greedy(TOKENS)).unwrap();
        let mut early = Vec::new();
        for _ in 0..3 {
            match first.next().await {
                Some(RequestEvent::Token(t)) => early.push(t),
                other => panic!("{other:?}"),
            }
        }
        let others: Vec<RequestStream> = prompts
            .map(|(cache, logits)| scheduler.decode(cache, &logits, greedy(TOKENS)).unwrap())
            .collect();
        let mut together = vec![];
        together.push(read_to_end(first, early).await);
        for stream in others {
            together.push(read_to_end(stream, Vec::new()).await);
        }
        for (i, (got, want)) in together.iter().zip(&alone).enumerate() {
            assert_eq!(got, want, "sequence {i}");
        }
        let stats = no_decoding_left(&scheduler).await;
        // The first token of each comes from its prefill logits, every other from a step;
        // a stop token takes one more.
        let stepped: usize = alone
            .iter()
            .map(|(t, reason)| t.len() - usize::from(*reason == FinishReason::Length))
            .sum();
        assert_eq!(stats.tokens_decoded, stepped as u64, "{stats:?}");
        assert!(
            stats.decode_steps < stats.tokens_decoded,
            "no step decoded two sequences at once: {stats:?}"
        );
        assert_eq!(
            (stats.decodes_finished, stats.decoding),
            (3, 0),
            "{stats:?}"
        );
    });
}

#[test]
fn a_submitted_question_reports_its_prefill_then_streams_the_tokens_of_prefill_then_decode() {
    runtime().block_on(async {
        let store = memory_store(StorageDtype::F16);
        let scheduler = scheduler(store.clone(), SchedulerConfig::default());
        let (chunks, tail) = context();
        let request = planned_as_stored(&chunks, &tail, Mode::ComputeOnly);
        let done = scheduler.prefill(request).await.unwrap();
        let stream = scheduler
            .decode(done.cache, &done.logits, greedy(12))
            .unwrap();
        let want = read_to_end(stream, Vec::new()).await;

        let request = planned_as_stored(&chunks, &tail, Mode::ComputeOnly);
        let mut events = scheduler.submit(request, greedy(12)).unwrap();
        let report = match events.next().await {
            Some(RequestEvent::Prefilled(report)) => report,
            other => panic!("the first event is the prefill report, not {other:?}"),
        };
        assert_eq!(report.chunks_computed, chunks.len(), "{report:?}");
        assert_eq!(read_to_end(events, Vec::new()).await, want);
        let stats = no_decoding_left(&scheduler).await;
        assert_eq!(
            (stats.completed, stats.decodes_finished),
            (2, 2),
            "{stats:?}"
        );
    });
}

#[test]
fn dropping_a_submitted_stream_before_its_prefill_ends_withdraws_the_request() {
    runtime().block_on(async {
        let (chunks, tail) = context();
        let scheduler = scheduler(stalled_store(), SchedulerConfig::default());
        let request = planned_as_stored(&chunks, &tail, Mode::LoadOnly);
        let mut events = scheduler.submit(request, greedy(8)).unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), events.next()).await;
        assert!(
            waited.is_err(),
            "load-only on a stalled store cannot report in 200 ms"
        );
        drop(events);
        let stats = scheduler.stats();
        assert_eq!((stats.cancelled, stats.in_flight), (1, 0), "{stats:?}");
        // Bad sampling settings are refused before any work.
        let bad = GenerateParams {
            sampling: Sampling {
                temperature: -1.0,
                ..Sampling::greedy()
            },
            ..greedy(8)
        };
        let request = planned_as_stored(&chunks, &tail, Mode::ComputeOnly);
        assert!(scheduler.submit(request, bad).is_err());
        assert_eq!(scheduler.stats().admitted, 1);
    });
}

#[test]
fn a_decode_stream_dropped_mid_answer_leaves_at_the_next_step_and_frees_its_place() {
    runtime().block_on(async {
        let scheduler = scheduler(memory_store(StorageDtype::F16), SchedulerConfig::default());
        let (cache, logits) = decode_prompts().remove(0);
        let mut stream = scheduler.decode(cache, &logits, greedy(1000)).unwrap();
        for _ in 0..2 {
            assert!(matches!(stream.next().await, Some(RequestEvent::Token(_))));
        }
        drop(stream);
        let stats = no_decoding_left(&scheduler).await;
        assert_eq!(stats.decodes_cancelled, 1, "{stats:?}");
        assert!(stats.tokens_decoded < 100, "it kept decoding: {stats:?}");
    });
}

/// Waits (bounded) until no sequence decodes (a step's bookkeeping ends after its
/// sequences' last events), and returns the counters then.
async fn no_decoding_left(scheduler: &Scheduler<Engine, KvStore>) -> SchedulerStats {
    for _ in 0..200 {
        let stats = scheduler.stats();
        if stats.decoding == 0 {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("sequences still decode: {:?}", scheduler.stats());
}

/// Computes the test context in a scheduler set up by `config` while one answer decodes;
/// checks the logits and that the answer still decodes. Returns the decode steps taken
/// meanwhile and the chunks' lengths.
async fn decode_steps_while_prefilling(config: SchedulerConfig) -> (u64, Vec<usize>) {
    let store = memory_store(StorageDtype::F16);
    let scheduler = scheduler(store.clone(), config);
    // Plain prose goes on without an end-of-generation token for a long while.
    let engine = shared_dense_engine();
    let mut cache = engine.new_cache();
    let logits = engine.prefill(&mut cache, &prose_tokens(100), 512).unwrap();
    let mut answer = scheduler.decode(cache, &logits, greedy(1000)).unwrap();
    assert!(matches!(answer.next().await, Some(RequestEvent::Token(_))));

    let (chunks, tail) = context();
    let want = reference_logits(&chunks, &tail);
    let (request, _) = planned(&store, &chunks, &tail, Mode::ComputeOnly).await;
    let before = scheduler.stats().decode_steps;
    let done = scheduler.prefill(request).await.unwrap();
    let during = scheduler.stats().decode_steps - before;
    assert_same_logits(&done, &want, 1e-4);
    let stats = scheduler.stats();
    assert_eq!(
        (stats.decoding, stats.decodes_finished),
        (1, 0),
        "{stats:?}"
    );
    (during, chunks.iter().map(Vec::len).collect())
}

/// Cuts of chunks of `lengths` into pieces of at most `piece` tokens.
fn cuts(lengths: &[usize], piece: usize) -> u64 {
    lengths.iter().map(|n| n.div_ceil(piece) as u64 - 1).sum()
}

#[test]
fn a_chunk_computed_while_an_answer_decodes_is_cut_into_pieces_with_decode_steps_between() {
    runtime().block_on(async {
        const PIECE: usize = 32;
        let (during, lengths) = decode_steps_while_prefilling(SchedulerConfig {
            prefill_step_tokens: PIECE,
            tpot_target_secs: 0.0,
            write_back: false,
            ..SchedulerConfig::default()
        })
        .await;
        // A decode step after every piece but a chunk's last.
        let cuts = cuts(&lengths, PIECE);
        assert!(
            during >= cuts,
            "{during} decode steps while computing chunks cut {cuts} times"
        );
    });
}

#[test]
fn a_tight_time_per_output_token_cuts_prefill_into_the_smallest_pieces() {
    runtime().block_on(async {
        let (during, lengths) = decode_steps_while_prefilling(SchedulerConfig {
            prefill_step_tokens: 128,
            // Below any decode step: only the smallest piece fits.
            tpot_target_secs: 1e-9,
            write_back: false,
            ..SchedulerConfig::default()
        })
        .await;
        let (smallest, largest) = (cuts(&lengths, MIN_PREFILL_PIECE), cuts(&lengths, 128));
        assert!(
            smallest > largest && during >= smallest,
            "{during} decode steps; {smallest} cuts expected in pieces of {MIN_PREFILL_PIECE}"
        );
    });
}
