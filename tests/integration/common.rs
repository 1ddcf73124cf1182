//! Shared fixtures: the default model, loaded once per test binary.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use futures::stream::BoxStream;

use ragcake::engine::{Engine, EngineConfig, KvCache, ReturnLogits, Tensor};
use ragcake::kvstore::KvStore;
use ragcake::kvstore::object_store::path::Path;
use ragcake::kvstore::object_store::{self as os, ObjectStore};
use ragcake::model_cache::{MINILM, ModelCache, SMOLLM2};
use ragcake::retriever::Embedder;

pub use ragcake_test_support::{
    max_abs, max_abs_diff, runtime, s3_store_at, s3_store_that_is_down, silent_server, stored_bytes,
};

/// The repository root, read when the test runs (cargo sets it): a test binary that a
/// checkout elsewhere built into the shared target directory must not read that checkout.
pub fn repo_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .expect("cargo sets CARGO_MANIFEST_DIR")
        .into()
}

/// Path of the default GGUF model (`RAGCAKE_MODEL` overrides it).
pub fn model_path() -> PathBuf {
    if let Some(path) = std::env::var_os("RAGCAKE_MODEL") {
        return PathBuf::from(path);
    }
    ModelCache::default()
        .require(&SMOLLM2)
        .unwrap_or_else(|e| panic!("{e} (the test script fetches it)"))
}

/// Path of Gemma 3 270M, the second real model (`RAGCAKE_GEMMA3_GGUF` overrides it; the
/// test script fetches it).
pub fn gemma3_path() -> PathBuf {
    if let Some(path) = std::env::var_os("RAGCAKE_GEMMA3_GGUF") {
        return PathBuf::from(path);
    }
    let cache = ModelCache::default();
    let llm = ragcake::model_cache::named_llm("gemma3-270m").expect("a known model");
    assert!(
        cache.has_llm(llm),
        "{} is not fetched (the test script fetches it: ragcake models fetch gemma3-270m)",
        cache.llm_path(llm).display()
    );
    cache.llm_path(llm)
}

/// Gemma 3 270M, loaded on first use and shared by every test.
pub fn gemma3_engine() -> &'static Engine {
    shared_gemma3_engine_cell()
}

/// The same model behind an `Arc`, as the pipeline and ingest hold it.
pub fn shared_gemma3_engine() -> Arc<Engine> {
    shared_gemma3_engine_cell().clone()
}

fn shared_gemma3_engine_cell() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        Arc::new(Engine::load(gemma3_path(), &EngineConfig::default()).expect("load Gemma 3"))
    })
}

/// The default model, loaded on first use and shared by every test.
pub fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| Engine::load(model_path(), &EngineConfig::default()).expect("load model"))
}

/// The default embedder, loaded on first use and shared by every test.
pub fn embedder() -> Arc<Embedder> {
    static EMBEDDER: OnceLock<Arc<Embedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            let dir = ModelCache::default()
                .require(&MINILM)
                .unwrap_or_else(|e| panic!("{e} (the test script fetches it)"));
            Arc::new(Embedder::load(&dir).expect("load the embedder"))
        })
        .clone()
}

/// The default model with decode steps on the dense f32 weights, so one-token forwards use
/// exactly the prefill arithmetic.
pub fn dense_engine() -> &'static Engine {
    dense_engine_cell()
}

/// The same model as [`dense_engine`] behind an `Arc`, as the scheduler holds it.
pub fn shared_dense_engine() -> Arc<Engine> {
    dense_engine_cell().clone()
}

fn dense_engine_cell() -> &'static Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let config = EngineConfig {
            quantized_decode: false,
            ..EngineConfig::default()
        };
        Arc::new(Engine::load(model_path(), &config).expect("load model"))
    })
}

/// Runs `tokens` through `engine`'s model after `cache` and returns the requested logits.
pub fn logits(engine: &Engine, tokens: &[u32], cache: &mut KvCache, which: ReturnLogits) -> Tensor {
    engine
        .model()
        .forward(tokens, cache, which)
        .unwrap()
        .expect("logits were requested")
}

/// A few hundred tokens of ordinary English prose.
pub fn prose_tokens(min_tokens: usize) -> Vec<u32> {
    const TEXT: &str = "The history of the lighthouse is a history of coastal trade. Before \
        electric lamps, keepers trimmed wicks through the night, and a lens the size of a \
        small room gathered the flame into a beam that ships could see twenty miles out. \
        Each light had its own rhythm of flashes so that a navigator could tell one headland \
        from the next. When radio beacons arrived, many towers were automated, and the \
        keepers' cottages became museums, guest houses or ruins. ";
    let tokenizer = engine().tokenizer();
    let mut tokens = Vec::new();
    while tokens.len() < min_tokens {
        tokens.extend(tokenizer.encode(TEXT, false).unwrap());
    }
    tokens.truncate(min_tokens);
    tokens
}

/// Mean KL divergence KL(p‖q) over the rows of two logit tensors (`[rows, vocab]`, or one
/// `[vocab]` row).
pub fn mean_kl(reference: &Tensor, other: &Tensor) -> f32 {
    let rows = |t: &Tensor| {
        let t = t.to_dtype(ragcake::engine::DType::F32).unwrap();
        if t.rank() == 1 {
            t.unsqueeze(0).unwrap()
        } else {
            t
        }
    };
    let log_softmax = |logits: &Tensor| {
        let max = logits.max_keepdim(1).unwrap();
        let shifted = logits.broadcast_sub(&max).unwrap();
        let sum = shifted
            .exp()
            .unwrap()
            .sum_keepdim(1)
            .unwrap()
            .log()
            .unwrap();
        shifted.broadcast_sub(&sum).unwrap()
    };
    let log_p = log_softmax(&rows(reference));
    let log_q = log_softmax(&rows(other));
    let p = log_p.exp().unwrap();
    let kl = (p * (log_p - log_q).unwrap()).unwrap().sum(1).unwrap();
    kl.mean_all().unwrap().to_scalar::<f32>().unwrap()
}

/// A KV store for the default model over the object store `url` names.
pub fn store_for(url: &str) -> KvStore {
    KvStore::open_for_engine(url, Vec::new(), engine()).unwrap()
}

/// A KV store for the default model over `store`.
pub fn store_over(store: Arc<dyn ObjectStore>, prefix: Path) -> KvStore {
    KvStore::for_engine(store, prefix, engine())
}

/// The body of a GET of `url`, as text.
pub async fn get_text(url: &str) -> String {
    reqwest::get(url).await.unwrap().text().await.unwrap()
}

/// The shared dense engine's KV store in the local directory `dir`.
pub fn local_kv(dir: &std::path::Path) -> Arc<KvStore> {
    let url = format!("file://{}", dir.display());
    Arc::new(KvStore::open_for_engine(&url, Vec::new(), &shared_dense_engine()).unwrap())
}

/// A real object store behind a wrapper that counts the requests passed to it: metadata
/// requests (HEAD), reads (GET, ranged or whole) and writes.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    /// Metadata requests.
    pub heads: AtomicUsize,
    /// Reads.
    pub gets: AtomicUsize,
    /// Writes.
    pub puts: AtomicUsize,
}

impl CountingStore {
    /// Counts the requests to `inner`.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        Self {
            inner,
            heads: AtomicUsize::new(0),
            gets: AtomicUsize::new(0),
            puts: AtomicUsize::new(0),
        }
    }

    /// (metadata requests, reads, writes) so far.
    pub fn counts(&self) -> (usize, usize, usize) {
        let l = |c: &AtomicUsize| c.load(Ordering::SeqCst);
        (l(&self.heads), l(&self.gets), l(&self.puts))
    }
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: os::PutPayload,
        opts: os::PutOptions,
    ) -> os::Result<os::PutResult> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: os::PutMultipartOptions,
    ) -> os::Result<Box<dyn os::MultipartUpload>> {
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: os::GetOptions,
    ) -> os::Result<os::GetResult> {
        let counter = if options.head {
            &self.heads
        } else {
            &self.gets
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[std::ops::Range<u64>],
    ) -> os::Result<Vec<bytes::Bytes>> {
        self.gets.fetch_add(1, Ordering::SeqCst);
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, os::Result<Path>>,
    ) -> BoxStream<'static, os::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, os::Result<os::ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> os::Result<os::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: os::CopyOptions) -> os::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// The `ragcake` binary (package `ragcake-cli`), built by `cargo test --workspace` into the
/// target directory this test binary runs from.
pub fn ragcake_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/integration-… → target/<profile>/ragcake
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join(format!("ragcake{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// Logits of SmolLM2 and Gemma 3 span roughly ±30; f32 prefill in different chunkings
/// reorders sums, so results agree to about 1e-4. 2e-3 is tight enough that any real mistake
/// (a wrong position, a missing key, a mask off by one) shows up as differences of 0.1 or
/// more.
pub const LOGIT_TOLERANCE: f32 = 2e-3;

/// Prefill of `tokens` in pieces of `piece` tokens ends with the logits of one pass.
pub fn assert_prefill_in_pieces_matches_one_pass(engine: &Engine, tokens: &[u32], piece: usize) {
    let mut one = engine.new_cache();
    let reference = engine.prefill(&mut one, tokens, tokens.len()).unwrap();
    let mut pieces = engine.new_cache();
    let got = engine.prefill(&mut pieces, tokens, piece).unwrap();
    let diff = max_abs_diff(&got, &reference);
    assert!(diff < LOGIT_TOLERANCE, "max |Δlogit| = {diff}");
}

/// A cache of `tokens` exported in two ranges split at `split` and imported into a fresh
/// cache continues with `next` to the same logits, bit for bit.
pub fn assert_exported_and_imported_kv_continues_alike(
    engine: &Engine,
    tokens: &[u32],
    split: usize,
    next: &[u32],
) {
    let mut original = engine.new_cache();
    engine.prefill(&mut original, tokens, 256).unwrap();
    let head = original.export(0..split).unwrap();
    let tail = original.export(split..tokens.len()).unwrap();
    assert_eq!((head.base_position(), head.len()), (0, split));
    assert_eq!(
        (tail.base_position(), tail.len()),
        (split, tokens.len() - split)
    );
    assert_eq!(
        tail.bytes(),
        tail.len() * engine.kv_shape().values_per_token() * 4
    );
    let mut rebuilt = engine.new_cache();
    engine.import(&mut rebuilt, &head).unwrap();
    engine.import(&mut rebuilt, &tail).unwrap();
    assert_eq!(rebuilt.len(), tokens.len());
    let expected = logits(engine, next, &mut original, ReturnLogits::All);
    let got = logits(engine, next, &mut rebuilt, ReturnLogits::All);
    assert_eq!(
        max_abs_diff(&expected, &got),
        0.0,
        "same KV must give identical logits"
    );
}
