//! The pipeline and the HTTP service end to end: the demo corpus ingested into embedded
//! Qdrant and a local KV directory, questions answered through retrieval, the bidirectional
//! scheduler and generation; faults of the store and the index; bad HTTP input; load.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ragcake::engine::{ChatMessage, Role};
use ragcake::ingest::{Ingest, IngestConfig};
use ragcake::kvstore::{KvStore, StorageDtype, open_url};
use ragcake::pipeline::{
    Answer, ApiKey, AskOptions, AskRequest, HttpConfig, Pipeline, PipelineConfig,
    WriteBackAdmission, http,
};
use ragcake::retriever::{
    ChunkId, EdgeIndex, IndexPoint, IndexedChunk, RetrieverError, ScoredChunk, VectorIndex,
};
use ragcake::scheduler::{MissReason, Mode, SchedulerStats};

use crate::common::{
    CountingStore, embedder, get_text, local_kv, runtime, s3_store_that_is_down,
    shared_dense_engine,
};

fn repo_path(relative: &str) -> PathBuf {
    crate::common::repo_dir().join(relative)
}

/// The demo corpus, ingested once (index + chunk caches) into a temporary directory shared
/// by the tests of this file.
struct DemoCorpus {
    dir: tempfile::TempDir,
    index: Arc<dyn VectorIndex>,
}

fn demo_corpus() -> &'static DemoCorpus {
    static CORPUS: OnceLock<DemoCorpus> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let index: Arc<dyn VectorIndex> =
            Arc::new(EdgeIndex::open(&dir.path().join("index"), embedder().dim()).unwrap());
        let kv = local_kv(&dir.path().join("kv"));
        runtime().block_on(async {
            let job = Ingest::new(
                shared_dense_engine(),
                embedder(),
                index.clone(),
                kv,
                IngestConfig::default(),
            )
            .unwrap();
            let summary = job.run(&[repo_path("demo/corpus")], &|_| {}).await.unwrap();
            assert!(summary.kv_computed > 10, "{summary:?}");
        });
        DemoCorpus { dir, index }
    })
}

/// A copy of the demo corpus's KV directory that a test may damage.
fn private_kv_copy(into: &Path) -> Arc<KvStore> {
    let status = std::process::Command::new("cp")
        .arg("-r")
        .arg(demo_corpus().dir.path().join("kv"))
        .arg(into)
        .status()
        .unwrap();
    assert!(status.success());
    local_kv(into)
}

async fn pipeline_over(
    index: Arc<dyn VectorIndex>,
    kv: Arc<KvStore>,
    config: PipelineConfig,
) -> Pipeline {
    Pipeline::builder()
        .engine(shared_dense_engine())
        .embedder(embedder())
        .index(index)
        .kv_store(kv)
        .config(config)
        .build()
        .await
        .unwrap()
}

/// A pipeline over the demo index with a KV store of its own, so its write-backs never
/// become another test's prefix hits (the directory lives as long as the pipeline needs it).
async fn pipeline_with_own_kv(
    corpus: &DemoCorpus,
    config: PipelineConfig,
) -> (Pipeline, tempfile::TempDir) {
    let own_kv = tempfile::tempdir().unwrap();
    let kv = local_kv(own_kv.path());
    let pipeline = pipeline_over(corpus.index.clone(), kv, config).await;
    (pipeline, own_kv)
}

fn options(mode: Mode, exact: bool, max_tokens: usize) -> AskOptions {
    AskOptions {
        mode,
        exact,
        max_tokens,
        ..AskOptions::default()
    }
}

/// Waits (bounded: 30 s, the suite's other tests share the two cores) until the scheduler
/// has written back at least `n` chunks (a chunk whose prefix cache another test stored
/// already counts: it is not written again).
async fn wait_for_write_backs(pipeline: &Pipeline, n: u64) {
    for _ in 0..300 {
        let stats = pipeline.scheduler_stats();
        if stats.write_backs + stats.write_backs_skipped >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("write-backs: {:?}", pipeline.scheduler_stats());
}

/// Waits (bounded: 15 s) until no write-back is pending; fails the test past the bound.
async fn write_backs_drained(pipeline: &Pipeline) {
    for _ in 0..300 {
        if pipeline.scheduler_stats().write_back_pending_bytes == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "write-backs still pending after 15 s: {:?}",
        pipeline.scheduler_stats()
    );
}

#[test]
fn a_demo_question_is_answered_from_the_corpus_and_a_repeat_loads_its_prefix_caches_exactly() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let pipeline = pipeline_over(corpus.index.clone(), kv, PipelineConfig::default()).await;
        let question = "What kind of cheese is Varrow Blue and what milk is it made from?";
        let first = pipeline
            .ask(AskRequest::new(question).with_options(options(Mode::Bidirectional, true, 48)))
            .await
            .unwrap();
        assert!(
            first.sources.iter().any(|s| s.doc_id.ends_with("food.md")),
            "{:?}",
            first.sources
        );
        assert!(first.text.contains("sheep"), "{:?}", first.text);
        let b = &first.breakdown;
        assert!(b.ttft_secs > 0.0 && b.ttft_secs <= b.total_secs);
        assert_eq!(b.prefill.chunks, first.sources.len() + 1, "{b:?}");
        assert!(!b.degraded);

        // Everything computed in context is written back as exact prefix caches; the same
        // question again finds them all and loads from the back.
        wait_for_write_backs(&pipeline, b.prefill.chunks_computed as u64).await;
        let again = pipeline
            .ask(AskRequest::new(question).with_options(options(Mode::Bidirectional, true, 48)))
            .await
            .unwrap();
        let b2 = &again.breakdown;
        assert_eq!(b2.lookups.prefix_hits, b2.prefill.chunks, "{b2:?}");
        assert!(b2.prefill.chunks_loaded >= 1, "{b2:?}");
        assert_eq!(again.sources, first.sources);
        // Exact caches: the same answer as computing everything.
        assert_eq!(again.text, first.text);
    });
}

#[test]
fn one_ask_sends_one_metadata_request_per_chunk_and_one_get_per_loaded_chunk() {
    let corpus = demo_corpus();
    let scratch = tempfile::tempdir().unwrap();
    let _ = private_kv_copy(&scratch.path().join("kv"));
    runtime().block_on(async {
        let url = format!("file://{}", scratch.path().join("kv").display());
        let (inner, prefix) = open_url(&url, Vec::new()).unwrap();
        let counting = Arc::new(CountingStore::new(inner));
        let kv = Arc::new(KvStore::for_engine(
            counting.clone(),
            prefix,
            &shared_dense_engine(),
        ));
        let pipeline = pipeline_over(corpus.index.clone(), kv, PipelineConfig::default()).await;
        // A question no other test asks: its chunks have chunk caches (ingest stored them),
        // no prefix caches. Load-only, so that every stored chunk is read.
        let answer = pipeline
            .ask(
                AskRequest::new("Which harbour town holds the autumn regatta?")
                    .with_options(options(Mode::LoadOnly, false, 8)),
            )
            .await
            .unwrap();
        let (heads, gets, _) = counting.counts();
        let b = &answer.breakdown;
        assert_eq!(answer.sources.len(), 3, "top_k is 3 by default");
        let chunks = b.prefill.chunks;
        assert_eq!(chunks, 4, "the preamble and three retrieved chunks");
        assert!(
            heads <= chunks,
            "{heads} metadata requests for {chunks} chunks: {b:?}"
        );
        assert_eq!(heads, b.lookups.requests, "{b:?}");
        assert!(b.prefill.chunks_loaded >= 3, "{b:?}");
        assert_eq!(
            gets, b.prefill.chunks_loaded,
            "one GET per loaded chunk: {b:?}"
        );
    });
}

#[test]
fn exact_mode_recomputes_a_corrupt_blob_counts_it_and_answers_the_same() {
    let _ = demo_corpus();
    let scratch = tempfile::tempdir().unwrap();
    let kv = private_kv_copy(&scratch.path().join("kv"));
    runtime().block_on(async {
        let pipeline =
            pipeline_over(demo_corpus().index.clone(), kv, PipelineConfig::default()).await;
        let question = "Who founded the observatory on the island?";
        let reference = pipeline
            .ask(AskRequest::new(question).with_options(options(Mode::ComputeOnly, true, 24)))
            .await
            .unwrap();
        wait_for_write_backs(&pipeline, reference.breakdown.prefill.chunks as u64).await;

        // Damage every stored blob: one flipped byte near the end of each.
        let mut damaged = 0;
        for entry in walk(&scratch.path().join("kv")) {
            let mut bytes = std::fs::read(&entry).unwrap();
            let at = bytes.len() - 3;
            bytes[at] ^= 0x10;
            std::fs::write(&entry, bytes).unwrap();
            damaged += 1;
        }
        assert!(damaged > 0);
        let answer = pipeline
            .ask(AskRequest::new(question).with_options(options(Mode::LoadOnly, true, 24)))
            .await
            .unwrap();
        let p = &answer.breakdown.prefill;
        assert_eq!(p.chunks_loaded, 0, "{p:?}");
        assert!(
            p.misses
                .iter()
                .any(|m| matches!(m.reason, MissReason::Rejected(_))),
            "{p:?}"
        );
        assert!(
            !answer.breakdown.degraded,
            "a corrupt blob is a miss, not a store failure"
        );
        assert_eq!(answer.text, reference.text);
        let metrics = pipeline.metrics().encode();
        assert!(
            metrics.contains("ragcake_cache_misses_total{reason=\"rejected\"}"),
            "{metrics}"
        );
    });
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_kv_store_that_is_down_gives_computed_answers_flagged_degraded() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let (down, prefix) = s3_store_that_is_down();
        let kv = Arc::new(KvStore::for_engine(down, prefix, &shared_dense_engine()));
        let mut config = PipelineConfig::default();
        config.scheduler.load_timeout_secs = 2.0;
        let pipeline = pipeline_over(corpus.index.clone(), kv, config).await;
        let answer = pipeline
            .ask(
                AskRequest::new("How many steps does the Varrow Head lighthouse tower have?")
                    .with_options(options(Mode::Bidirectional, false, 16)),
            )
            .await
            .unwrap();
        let b = &answer.breakdown;
        assert!(b.degraded, "{b:?}");
        assert_eq!(b.prefill.chunks_loaded, 0);
        assert_eq!(b.prefill.chunks_computed, b.prefill.chunks);
        assert!(!answer.text.is_empty());
        assert!(
            pipeline
                .metrics()
                .encode()
                .contains("ragcake_requests_total{outcome=\"degraded\"} 1")
        );
    });
}

/// A store that accepts connections and never answers, and a port that refuses them,
/// behind the whole pipeline and its HTTP service: planning gives up each chunk's lookup at
/// its deadline (or on the refusal), the question is answered by computation within that
/// deadline plus the time the same question takes computed, flagged degraded, and
/// `/metrics` counts every chunk's lookup as a miss with its reason.
#[test]
fn a_store_that_hangs_or_refuses_costs_a_question_its_lookup_deadline_not_the_clients_retries() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let question = "How many steps does the Varrow Head lighthouse tower have?";
        let body = serde_json::json!({
            "question": question,
            "options": {"max_tokens": 8, "top_k": 3},
        });
        let client = reqwest::Client::new();
        // The same question computed, over a store that works, for the bound.
        let (working, _own) = pipeline_with_own_kv(corpus, PipelineConfig::default()).await;
        let base = serve(working, HttpConfig::default()).await;
        let mut computed = serde_json::json!(body);
        computed["options"]["mode"] = "compute-only".into();
        let started = std::time::Instant::now();
        let (status, json) =
            post_raw(&client, &format!("{base}/v1/ask"), computed.to_string()).await;
        let compute_secs = started.elapsed().as_secs_f64();
        assert_eq!(status, 200, "{json}");

        let lookup_timeout = 1.0;
        for (what, endpoint, reason) in [
            ("silent", crate::common::silent_server(), "lookup_timed_out"),
            ("refused", "http://127.0.0.1:9".to_string(), "lookup_failed"),
        ] {
            let (store, prefix) = crate::common::s3_store_at(&endpoint);
            let kv = Arc::new(KvStore::for_engine(store, prefix, &shared_dense_engine()));
            let mut config = PipelineConfig::default();
            config.scheduler.lookup_timeout_secs = lookup_timeout;
            let pipeline = pipeline_over(corpus.index.clone(), kv, config).await;
            let base = serve(pipeline, HttpConfig::default()).await;
            let started = std::time::Instant::now();
            let (status, json) =
                post_raw(&client, &format!("{base}/v1/ask"), body.to_string()).await;
            let took = started.elapsed().as_secs_f64();
            assert_eq!(status, 200, "{what}: {json}");
            let breakdown = &json["breakdown"];
            assert_eq!(breakdown["degraded"], true, "{what}: {json}");
            assert_eq!(breakdown["prefill"]["chunks_loaded"], 0, "{what}: {json}");
            // Two cores shared with the other tests: the computed time doubled, plus a
            // second, is still far below one of object_store's own 30 s attempts.
            let bound = lookup_timeout + 2.0 * compute_secs + 1.0;
            assert!(took <= bound, "{what}: {took:.2} s > {bound:.2} s");
            let chunks = breakdown["prefill"]["chunks"].as_u64().unwrap();
            let lookups = &breakdown["lookups"];
            let counted = if reason == "lookup_timed_out" {
                lookups["timed_out"].as_u64().unwrap()
            } else {
                lookups["errors"].as_u64().unwrap()
            };
            assert_eq!(
                counted, chunks,
                "{what}: every chunk's lookup missed: {json}"
            );
            let text = get_text(&format!("{base}/metrics")).await;
            let line = format!("ragcake_cache_misses_total{{reason=\"{reason}\"}} {chunks}");
            assert!(text.contains(&line), "{what}: no {line:?} in\n{text}");
            assert!(
                text.contains("ragcake_requests_total{outcome=\"degraded\"} 1"),
                "{what}: {text}"
            );
        }
    });
}

/// Ingest stored the demo corpus's chunk caches in f16; a service configured for int8
/// would find every one absent. It says so at start (the warning names both dtypes and
/// the setting) and in `/healthz`; a service configured as ingest was finds every sampled
/// chunk's key and says nothing.
#[test]
fn a_service_looking_for_chunk_caches_in_another_dtype_than_ingest_stored_says_so() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let url = format!("file://{}", corpus.dir.path().join("kv").display());
        let engine = shared_dense_engine();
        let int8 = KvStore::open_for_engine(&url, Vec::new(), &engine)
            .unwrap()
            .with_storage_dtype_for(ragcake::kvstore::CacheKind::Chunk, StorageDtype::Int8);
        let config = PipelineConfig {
            chunk_cache_dtype: StorageDtype::Int8,
            ..PipelineConfig::default()
        };
        let mismatched = pipeline_over(corpus.index.clone(), Arc::new(int8), config).await;
        let check = mismatched.chunk_cache_check().clone();
        assert!(check.sampled > 0, "{check:?}");
        assert_eq!(check.matching, 0, "{check:?}");
        assert_eq!(check.recorded_as, Some(StorageDtype::F16), "{check:?}");
        let warning = check.warning.clone().unwrap();
        assert!(
            warning.contains("f16") && warning.contains("int8"),
            "{warning}"
        );
        assert!(warning.contains("chunk_cache_dtype"), "{warning}");
        let base = serve(mismatched, HttpConfig::default()).await;
        let health: serde_json::Value =
            serde_json::from_str(&get_text(&format!("{base}/healthz")).await).unwrap();
        assert_eq!(health["chunk_caches"]["matching"], 0, "{health}");
        assert_eq!(health["chunk_caches"]["recorded_as"], "f16", "{health}");
        assert!(health["chunk_caches"]["warning"].is_string(), "{health}");

        let matched = pipeline_over(
            corpus.index.clone(),
            local_kv(&corpus.dir.path().join("kv")),
            PipelineConfig::default(),
        )
        .await;
        let check = matched.chunk_cache_check();
        assert!(
            check.sampled > 0 && check.matching == check.sampled,
            "{check:?}"
        );
        assert_eq!(check.warning, None);
    });
}

/// A real embedded index behind a switch that makes it fail like an unreachable server.
#[derive(Debug)]
struct SwitchableIndex {
    inner: Arc<dyn VectorIndex>,
    down: AtomicBool,
}

impl SwitchableIndex {
    fn check(&self) -> ragcake::retriever::Result<()> {
        if self.down.load(Ordering::SeqCst) {
            Err(RetrieverError::Index("connection refused".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl VectorIndex for SwitchableIndex {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    async fn upsert(&self, points: Vec<IndexPoint>) -> ragcake::retriever::Result<()> {
        self.check()?;
        self.inner.upsert(points).await
    }
    async fn search(
        &self,
        vector: &[f32],
        limit: usize,
    ) -> ragcake::retriever::Result<Vec<ScoredChunk>> {
        self.check()?;
        self.inner.search(vector, limit).await
    }
    async fn get(&self, ids: &[ChunkId]) -> ragcake::retriever::Result<Vec<IndexedChunk>> {
        self.check()?;
        self.inner.get(ids).await
    }
    async fn doc_chunks(
        &self,
        doc_id: &str,
        limit: usize,
    ) -> ragcake::retriever::Result<Vec<IndexedChunk>> {
        self.check()?;
        self.inner.doc_chunks(doc_id, limit).await
    }
    async fn delete_doc_except(
        &self,
        doc_id: &str,
        keep: &[ChunkId],
    ) -> ragcake::retriever::Result<()> {
        self.check()?;
        self.inner.delete_doc_except(doc_id, keep).await
    }
    async fn count(&self) -> ragcake::retriever::Result<usize> {
        self.check()?;
        self.inner.count().await
    }
}

/// Serves `pipeline` on a loopback port; returns its base URL.
async fn serve(pipeline: Pipeline, config: HttpConfig) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let router = http::router(pipeline, &config);
    tokio::spawn(
        async move { http::serve(listener, router, &config, std::future::pending()).await },
    );
    base
}

async fn post_raw(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, serde_json::Value) {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let json = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text:?}"));
    (status, json)
}

#[test]
fn bad_http_input_gets_a_json_4xx_and_the_service_keeps_serving() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let index = Arc::new(SwitchableIndex {
            inner: corpus.index.clone(),
            down: AtomicBool::new(false),
        });
        let pipeline = pipeline_over(index.clone(), kv, PipelineConfig::default()).await;
        let metrics = pipeline.metrics().clone();
        let config = HttpConfig {
            max_body_bytes: 16 * 1024,
            ..HttpConfig::default()
        };
        let base = serve(pipeline, config).await;
        let client = reqwest::Client::new();
        let ask = format!("{base}/v1/ask");
        let chat = format!("{base}/v1/chat/completions");
        let huge_question = "why ".repeat(2000);
        let cases: Vec<(&str, &String, Vec<u8>, u16)> = vec![
            ("malformed JSON", &ask, b"{\"question\": ".to_vec(), 400),
            ("wrong type", &ask, br#"{"question": 42}"#.to_vec(), 422),
            (
                "unknown field",
                &ask,
                br#"{"question": "q", "qestion": 1}"#.to_vec(),
                422,
            ),
            (
                "empty question",
                &ask,
                br#"{"question": "   "}"#.to_vec(),
                400,
            ),
            (
                "huge question",
                &ask,
                serde_json::to_vec(&serde_json::json!({ "question": huge_question })).unwrap(),
                400,
            ),
            ("oversized body", &ask, vec![b' '; 32 * 1024], 413),
            (
                "invalid UTF-8",
                &ask,
                b"{\"question\": \"\xff\xfe\"}".to_vec(),
                400,
            ),
            (
                "bad option",
                &ask,
                br#"{"question": "q", "options": {"top_k": 0}}"#.to_vec(),
                400,
            ),
            (
                "recompute ratio out of range",
                &ask,
                br#"{"question": "q", "options": {"recompute": {"ratio": 1.5}}}"#.to_vec(),
                400,
            ),
            (
                "unknown option",
                &ask,
                br#"{"question": "q", "options": {"warp": 9}}"#.to_vec(),
                400,
            ),
            (
                "unknown model",
                &chat,
                br#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#.to_vec(),
                404,
            ),
            (
                "no user message last",
                &chat,
                br#"{"model": "ragcake", "messages": [{"role": "system", "content": "hi"}]}"#
                    .to_vec(),
                400,
            ),
        ];
        for (name, url, body, want) in cases {
            let (status, json) = post_raw(&client, url, body).await;
            assert_eq!(status, want, "{name}: {json}");
            assert!(json["error"]["message"].is_string(), "{name}: {json}");
        }
        let response = client.get(&ask).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 405);
        let response = client.get(format!("{base}/nowhere")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 404);

        // Still serving.
        let (status, answer) = post_raw(
            &client,
            &ask,
            br#"{"question": "How long is the Varrow Coast Path?", "options": {"max_tokens": 8}}"#
                .to_vec(),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        assert!(answer["breakdown"]["ttft_secs"].as_f64().unwrap() > 0.0);
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);
        let health: serde_json::Value = health.json().await.unwrap();
        assert_eq!(health["scheduler"]["worker_alive"], true, "{health}");
        assert_eq!(health["scheduler"]["worker_restarts"], 0, "{health}");
        assert!(
            health["scheduler"]["write_back_pending_bytes"].is_u64(),
            "{health}"
        );

        // The index goes down: a clear 503, and the health check says so.
        index.down.store(true, Ordering::SeqCst);
        let (status, json) = post_raw(
            &client,
            &ask,
            br#"{"question": "How long is the Varrow Coast Path?"}"#.to_vec(),
        )
        .await;
        assert_eq!(status, 503, "{json}");
        assert_eq!(json["error"]["code"], "index_unavailable");
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 503);
        index.down.store(false, Ordering::SeqCst);

        let text = get_text(&format!("{base}/metrics")).await;
        assert!(
            text.contains("ragcake_http_responses_total{status=\"413\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("ragcake_requests_total{outcome=\"unavailable\"} 1"),
            "{text}"
        );
        assert!(text.contains("ragcake_ttft_seconds_count 1"), "{text}");
        // The scheduler's write-back counters, mirrored at the scrape.
        assert!(text.contains("ragcake_writeback_dropped_total 0"), "{text}");
        assert!(text.contains("ragcake_writeback_pending_bytes "), "{text}");
        drop(metrics);
    });
}

#[test]
fn openai_chat_completions_answer_with_and_without_streaming_alike() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let pipeline = pipeline_over(corpus.index.clone(), kv, PipelineConfig::default()).await;
        let base = serve(pipeline, HttpConfig::default()).await;
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/chat/completions");
        let body = |stream: bool| {
            serde_json::json!({
                "model": "ragcake",
                "messages": [
                    {"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": [{"type": "text", "text": "What is the highest point of the Isle of Varrow?"}]}
                ],
                "max_tokens": 24,
                "stream": stream,
                "stream_options": {"include_usage": true},
                "user": "ignored-by-ragcake",
            })
        };
        let (status, whole) =
            post_raw(&client, &url, serde_json::to_vec(&body(false)).unwrap()).await;
        assert_eq!(status, 200, "{whole}");
        assert_eq!(whole["object"], "chat.completion");
        assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
        let content = whole["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(!content.is_empty());
        assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() > 0);
        assert!(!whole["ragcake"]["sources"].as_array().unwrap().is_empty());

        let response = client.post(&url).json(&body(true)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let text = response.text().await.unwrap();
        let data: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .collect();
        assert_eq!(data.last(), Some(&"[DONE]"), "{text}");
        let chunks: Vec<serde_json::Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, content, "greedy: the stream spells the same answer");
        let last = chunks.last().unwrap();
        assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
        assert!(last["usage"]["total_tokens"].as_u64().unwrap() > 0, "{last}");
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    });
}

#[test]
fn a_full_queue_sheds_with_429_and_retry_after_while_accepted_requests_are_all_answered() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let config = PipelineConfig {
            max_concurrent: 2,
            max_queue: 4,
            ..PipelineConfig::default()
        };
        let pipeline = pipeline_over(corpus.index.clone(), kv, config).await;
        let base = serve(pipeline, HttpConfig::default()).await;
        let client = reqwest::Client::new();
        let questions = [
            "When is the Ember Festival held?",
            "How many pupils attend Varrow School?",
            "What is the name of the current Varrow lifeboat?",
            "How much power can each of the island's wind turbines produce?",
        ];
        const REQUESTS: usize = 200;
        let semaphore = Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for i in 0..REQUESTS {
            let client = client.clone();
            let url = format!("{base}/v1/ask");
            let body = serde_json::json!({
                "question": questions[i % questions.len()],
                "options": {"max_tokens": 2, "top_k": 1},
            });
            let permit = semaphore.clone().acquire_owned().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let response = client.post(url).json(&body).send().await.unwrap();
                let status = response.status().as_u16();
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string());
                let json: serde_json::Value = response.json().await.unwrap();
                (status, retry_after, json)
            }));
        }
        let (mut ok, mut rejected) = (0, 0);
        for task in tasks {
            let (status, retry_after, json) = task.await.unwrap();
            match status {
                200 => ok += 1,
                429 => {
                    assert_eq!(json["error"]["code"], "overloaded");
                    let secs: u64 = retry_after
                        .expect("a 429 says when to retry")
                        .parse()
                        .unwrap();
                    assert!(secs >= 1, "Retry-After: {secs}");
                    rejected += 1
                }
                other => panic!("status {other}: {json}"),
            }
        }
        assert_eq!(ok + rejected, REQUESTS);
        assert!(ok >= questions.len(), "{ok} answered");
        // 16 clients at once against room for 6 (2 answering, 4 queued): the queue overflows.
        assert!(rejected > 0, "no request was shed: {ok} answered");
        let text = get_text(&format!("{base}/metrics")).await;
        let value = |name: &str| -> usize {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as usize
        };
        assert_eq!(
            value("ragcake_requests_total{outcome=\"ok\"}"),
            ok,
            "{text}"
        );
        assert_eq!(
            value("ragcake_requests_total{outcome=\"overloaded\"}"),
            rejected,
            "{text}"
        );
        assert_eq!(value("ragcake_http_responses_total{status=\"200\"}"), ok);
        assert_eq!(value("ragcake_ttft_seconds_count"), ok);
        assert_eq!(value("ragcake_requests_in_flight"), 0);
    });
}

#[test]
fn the_official_openai_python_client_talks_to_the_service() {
    let Some(python) = ragcake_test_support::required_env(
        "RAGCAKE_TEST_OPENAI_PYTHON",
        "scripts/test.sh installs the client and sets it",
    ) else {
        return;
    };
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let pipeline = pipeline_over(corpus.index.clone(), kv, PipelineConfig::default()).await;
        let base = serve(pipeline, HttpConfig::default()).await;
        // The client blocks; the service must keep running on this runtime meanwhile.
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(python)
                .arg(repo_path("scripts/openai_client.py"))
                .arg(format!("{base}/v1"))
                .arg("What does the free electric minibus do?")
                .output()
        })
        .await
        .unwrap()
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let got: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        let content = got["content"].as_str().unwrap();
        assert!(!content.is_empty(), "{got}");
        assert_eq!(got["streamed"], got["content"], "{got}");
        assert!(got["completion_tokens"].as_u64().unwrap() > 0);
        assert_eq!(got["stream_finish_reason"], got["finish_reason"]);
        assert!(got["stream_total_tokens"].as_u64().unwrap() > 0, "{got}");
        assert_eq!(got["models"], serde_json::json!(["ragcake"]));
        assert_eq!(got["unknown_model_status"], 404);
    });
}

#[test]
fn a_question_over_the_timeout_fails_with_504_and_frees_its_place() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let config = PipelineConfig {
            timeout_secs: 0.05,
            ..PipelineConfig::default()
        };
        let pipeline = pipeline_over(corpus.index.clone(), kv, config).await;
        let metrics = pipeline.metrics().clone();
        let base = serve(pipeline, HttpConfig::default()).await;
        let (status, json) = post_raw(
            &reqwest::Client::new(),
            &format!("{base}/v1/ask"),
            br#"{"question": "How many pairs of puffins nest on the western cliffs?"}"#.to_vec(),
        )
        .await;
        assert_eq!(status, 504, "{json}");
        assert_eq!(json["error"]["code"], "timeout");
        let text = metrics.encode();
        assert!(
            text.contains("ragcake_requests_total{outcome=\"timeout\"} 1"),
            "{text}"
        );
        assert!(text.contains("ragcake_requests_in_flight 0"), "{text}");
    });
}

#[test]
fn questions_that_time_out_mid_answer_stop_decoding_and_the_decode_limit_holds() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        const QUESTION: &str = "Tell me everything about the island's history.";
        // The time to a first token on this machine, now (tests share its cores): the
        // timeout must fall after it and long before 1000 tokens are decoded.
        let (probe, _probe_kv) = pipeline_with_own_kv(corpus, PipelineConfig::default()).await;
        let started = std::time::Instant::now();
        let mut request = AskRequest::new(QUESTION);
        request.options.max_tokens = 1;
        probe.ask(request).await.unwrap();
        let ttft = started.elapsed().as_secs_f64();
        let mut config = PipelineConfig {
            timeout_secs: (4.0 * ttft).max(3.0),
            max_concurrent: 3,
            ..PipelineConfig::default()
        };
        config.scheduler.max_decoding = 2;
        let (pipeline, _kv) = pipeline_with_own_kv(corpus, config).await;
        let handle = pipeline.clone();
        let base = serve(pipeline, HttpConfig::default()).await;
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/chat/completions");
        // Started apart, so each gets its first token before its timeout and times out
        // while its answer (1000 tokens, past any end of generation) is being decoded.
        let asks = (0..3u32).map(|i| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let gap = std::time::Duration::from_secs_f64(1.5 * ttft);
                tokio::time::sleep(gap * i).await;
                let body = serde_json::json!({
                    "model": "ragcake",
                    "messages": [{"role": "user", "content": QUESTION}],
                    "max_tokens": 1000,
                    // The answer must still be decoding at the timeout, not end early.
                    "ignore_eos": true,
                });
                post_raw(&client, &url, serde_json::to_vec(&body).unwrap()).await
            }
        });
        let answers = futures::future::join_all(asks).await;
        for (status, json) in &answers {
            assert!(*status == 504 || *status == 200, "{status}: {json}");
        }
        assert!(answers.iter().any(|(status, _)| *status == 504));
        // Nothing decodes on after its question timed out.
        let stats = once_nothing_decodes(&handle).await;
        assert!(stats.decodes_cancelled >= 1, "{stats:?}");
        // Every answer that got its first token ended, finished or cancelled.
        assert_eq!(
            stats.decodes_cancelled + stats.decodes_finished,
            stats.completed,
            "{stats:?}"
        );
        assert!(stats.peak_decode_batch <= 2, "{stats:?}");
    });
}

/// The scheduler's counters once no answer is decoding and no prefill is in flight (waits
/// up to ten seconds).
async fn once_nothing_decodes(pipeline: &Pipeline) -> SchedulerStats {
    for _ in 0..400 {
        let stats = pipeline.scheduler_stats();
        if stats.decoding == 0 && stats.in_flight == 0 {
            return stats;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("still decoding: {:?}", pipeline.scheduler_stats());
}

#[test]
fn a_client_that_leaves_mid_answer_stops_its_decoding_at_the_next_step() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let (pipeline, _kv) = pipeline_with_own_kv(corpus, PipelineConfig::default()).await;
        let handle = pipeline.clone();
        let base = serve(pipeline, HttpConfig::default()).await;
        let body = serde_json::json!({
            "model": "ragcake",
            "messages": [{"role": "user", "content": "Tell me everything about the island's history."}],
            "max_tokens": 1000,
            "stream": true,
        });
        let mut response = reqwest::Client::new()
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        // The first piece of the answer arrives; then the client goes away.
        let mut seen = String::new();
        let has_text = |seen: &str| {
            seen.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                .any(|c| {
                    c["choices"][0]["delta"]["content"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty())
                })
        };
        for _ in 0..1000 {
            let chunk = response.chunk().await.unwrap().expect("the stream goes on");
            seen += &String::from_utf8_lossy(&chunk);
            if has_text(&seen) {
                break;
            }
        }
        assert!(has_text(&seen), "{seen}");
        drop(response);
        let stats = once_nothing_decodes(&handle).await;
        assert_eq!(stats.decodes_cancelled, 1, "{stats:?}");
        assert!(stats.tokens_decoded < 1000, "it decoded on: {stats:?}");
    });
}

#[test]
fn tenants_with_their_own_api_keys_never_see_each_others_prefix_hits() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        let (pipeline, _kv) = pipeline_with_own_kv(corpus, PipelineConfig::default()).await;
        let handle = pipeline.clone();
        let config = HttpConfig {
            api_keys: ApiKey::parse_list("key-a, key-b").unwrap(),
            ..HttpConfig::default()
        };
        let base = serve(pipeline, config).await;
        let client = reqwest::Client::new();
        let url = format!("{base}/v1/ask");
        let ask = |key: Option<&'static str>, question: &'static str| {
            let mut request = client.post(&url).json(&serde_json::json!({
                "question": question,
                "system": "You are the Isle of Varrow's guide. Answer in one sentence.",
                "options": {"max_tokens": 4, "mode": "bidirectional"},
            }));
            if let Some(key) = key {
                request = request.bearer_auth(key);
            }
            async move {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                (status, response.json::<serde_json::Value>().await.unwrap())
            }
        };
        let prefix_hits = |answer: &serde_json::Value| {
            answer["breakdown"]["lookups"]["prefix_hits"]
                .as_u64()
                .unwrap()
        };

        // Without a key, or with a wrong one: 401, as JSON. Health needs none.
        let (status, json) = ask(None, "When is the Ember Festival held?").await;
        assert_eq!(status, 401, "{json}");
        assert_eq!(json["error"]["code"], "invalid_api_key");
        let (status, _) = ask(Some("key-c"), "When is the Ember Festival held?").await;
        assert_eq!(status, 401);
        let health = client.get(format!("{base}/healthz")).send().await.unwrap();
        assert_eq!(health.status().as_u16(), 200);

        // Tenant A asks; its system prompt's cache is written back under its salt.
        let (status, first) = ask(Some("key-a"), "When is the Ember Festival held?").await;
        assert_eq!(status, 200, "{first}");
        assert_eq!(prefix_hits(&first), 0, "{first}");
        write_backs_drained(&handle).await;
        // A's next question finds it...
        let (_, again) = ask(Some("key-a"), "How many pupils attend Varrow School?").await;
        assert!(prefix_hits(&again) >= 1, "{again}");
        // ...B, with the same system prompt, does not.
        let (status, other) = ask(Some("key-b"), "How many pupils attend Varrow School?").await;
        assert_eq!(status, 200, "{other}");
        assert_eq!(prefix_hits(&other), 0, "{other}");
    });
}

#[test]
fn slow_and_silent_clients_are_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let corpus = demo_corpus();
    runtime().block_on(async {
        let kv = local_kv(&corpus.dir.path().join("kv"));
        let pipeline = pipeline_over(corpus.index.clone(), kv, PipelineConfig::default()).await;
        let config = HttpConfig {
            header_read_timeout_secs: 1.0,
            body_read_timeout_secs: 1.0,
            max_connections: 3,
            ..HttpConfig::default()
        };
        let base = serve(pipeline, config).await;
        let address = base.strip_prefix("http://").unwrap().to_string();
        let connect = || tokio::net::TcpStream::connect(address.clone());
        let health = || async {
            let response = reqwest::get(format!("{base}/healthz")).await.unwrap();
            response.status().as_u16()
        };

        // A body that trickles: 10 of its 100 bytes, then nothing.
        let mut trickle = connect().await.unwrap();
        trickle
            .write_all(
                b"POST /v1/ask HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
                  Content-Length: 100\r\n\r\n{\"question",
            )
            .await
            .unwrap();
        // A client that connects and says nothing.
        let mut silent = connect().await.unwrap();
        // Others are served meanwhile.
        assert_eq!(health().await, 200);

        let mut reply = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            trickle.read_to_end(&mut reply),
        )
        .await;
        assert!(read.is_ok(), "the trickling client was never answered");
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
        assert!(reply.contains("\"error\""), "{reply}");

        let mut nothing = Vec::new();
        let closed = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            silent.read_to_end(&mut nothing),
        )
        .await;
        assert!(closed.is_ok(), "the silent connection was never closed");

        // Silent connections up to the cap do not lock others out for good: they are
        // closed at the header timeout and the waiting request is served.
        let _held: Vec<_> = futures::future::join_all((0..3).map(|_| connect()))
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let served = tokio::time::timeout(std::time::Duration::from_secs(20), health()).await;
        assert_eq!(served.ok(), Some(200));
    });
}

#[test]
fn a_conversations_history_is_written_back_only_when_the_admission_rule_says_all() {
    let corpus = demo_corpus();
    runtime().block_on(async {
        for (admission, history_written) in [
            (WriteBackAdmission::Shared, false),
            (WriteBackAdmission::All, true),
        ] {
            let config = PipelineConfig {
                write_back: admission,
                ..PipelineConfig::default()
            };
            let (pipeline, _kv) = pipeline_with_own_kv(corpus, config).await;
            let mut follow_up = AskRequest::new("And how many teachers does it have?")
                .with_options(options(Mode::Bidirectional, true, 2));
            follow_up.history = vec![
                ChatMessage::new(Role::User, "How many pupils attend Varrow School?"),
                ChatMessage::new(Role::Assistant, "Varrow School has 212 pupils."),
            ];
            let with_history = pipeline.ask(follow_up).await.unwrap();
            // Then a new question: its prompt is one anybody could send again.
            let fresh = pipeline
                .ask(
                    AskRequest::new("When is the Ember Festival held?").with_options(options(
                        Mode::Bidirectional,
                        true,
                        2,
                    )),
                )
                .await
                .unwrap();
            // Nothing was stored before (a fresh store): every chunk was computed.
            let computed = |a: &Answer| a.breakdown.prefill.chunks_computed as u64;
            assert_eq!(computed(&fresh), fresh.breakdown.prefill.chunks as u64);
            let expected = computed(&fresh) + u64::from(history_written) * computed(&with_history);
            wait_for_write_backs(&pipeline, expected).await;
            write_backs_drained(&pipeline).await;
            let stats = pipeline.scheduler_stats();
            assert_eq!(
                stats.write_backs + stats.write_backs_skipped,
                expected,
                "{admission:?}: {stats:?}"
            );
            let stored = pipeline.kv().list().await.unwrap();
            assert_eq!(stored.len() as u64, stats.write_backs, "{admission:?}");
        }
    });
}
