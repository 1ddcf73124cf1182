//! The retriever with the real embedder, LLM tokenizer, embedded Qdrant and KV store:
//! embeddings against the reference model, chunker properties, the index conformance
//! suite, retrieval of a known passage, and the ingest job's guarantees.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use ragcake::ingest::{Ingest, IngestConfig, IngestError, IngestSummary, Shard};
use ragcake::kvstore::{CacheKey, CacheKind, KvStore, open_url};
use ragcake::pipeline::PromptTemplate;
use ragcake::retriever::{
    CacheStatus, ChunkId, ChunkOrder, Chunker, EdgeIndex, IndexPoint, IndexedChunk,
    QdrantServerIndex, RetrieveOptions, Retriever, TokenizeError, VectorIndex,
};
use ragcake::scheduler::LoadBackend;

use crate::common::{
    embedder, engine, local_kv, max_abs, max_abs_diff, runtime, shared_dense_engine,
};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn embeddings_match_the_reference_model() {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/minilm_embeddings.json")).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let embedded = embedder().embed(&texts).unwrap();
    for (case, vector) in cases.iter().zip(&embedded) {
        let reference: Vec<f32> = case["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(vector.len(), reference.len());
        let cos = cosine(vector, &reference);
        assert!(cos >= 0.999, "cosine {cos} for {:?}", case["text"]);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
}

#[test]
fn an_embedding_does_not_depend_on_its_batch() {
    let alone = embedder()
        .embed_one("Bees dance to show where flowers are.")
        .unwrap();
    let long = "A much longer sentence that forces padding of the shorter one. ".repeat(8);
    let batch = embedder()
        .embed(&[long.as_str(), "Bees dance to show where flowers are."])
        .unwrap();
    let cos = cosine(&alone, &batch[1]);
    assert!(cos > 0.99999, "cosine {cos}");
}

const PROSE: &str = "# Lighthouses\n\nThe history of the lighthouse is a history of coastal \
    trade. Before electric lamps, keepers trimmed wicks through the night! A lens the size \
    of a small room gathered the flame into a beam that ships could see twenty miles out.\n\n\
    Each light had its own rhythm of flashes; a navigator could tell one headland from the \
    next. When radio beacons arrived, many towers were automated.\n- keepers' cottages\n- \
    museums, guest houses or ruins\n\nÜnïcödé ünd émojis 🚢 are text too. ";

#[test]
fn chunks_cover_the_text_respect_the_size_and_are_stable() {
    let tokenizer = engine().tokenizer();
    let tokenize = |t: &str| tokenizer.encode(t, false).map_err(TokenizeError::from);
    let text = PROSE.repeat(6) + &"x".repeat(3000) + " tail";
    for target in [16, 64, 256] {
        let chunker = Chunker::new(&tokenize, target).unwrap();
        let chunks = chunker.split(&text).unwrap();
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined, text, "chunks of {target} do not cover the text");
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!(c.chunk_no as usize, i);
            assert_eq!(&text[c.range.clone()], c.text);
            assert!(!c.text.trim().is_empty(), "blank chunk {i}");
            assert!(
                c.token_ids.len() <= target,
                "chunk {i}: {} tokens",
                c.token_ids.len()
            );
            assert_eq!(c.token_ids, tokenizer.encode(&c.text, false).unwrap());
        }
        assert_eq!(chunker.split(&text).unwrap(), chunks, "not stable");
    }
    assert!(
        Chunker::new(&tokenize, 64)
            .unwrap()
            .split(" \n\t ")
            .unwrap()
            .is_empty()
    );
    assert!(Chunker::new(&tokenize, 0).is_err());
}

#[test]
fn chunks_end_on_paragraph_and_sentence_borders_when_they_can() {
    let tokenizer = engine().tokenizer();
    let tokenize = |t: &str| tokenizer.encode(t, false).map_err(TokenizeError::from);
    let paragraph = "One sentence here. Another sentence follows it. ".repeat(3);
    let text = format!("{paragraph}\n\n{paragraph}\n\n{paragraph}");
    let per_paragraph = tokenizer.encode(&paragraph, false).unwrap().len();
    // Room for one paragraph, not two: every chunk is a whole paragraph.
    let chunks = Chunker::new(&tokenize, per_paragraph + 4)
        .unwrap()
        .split(&text)
        .unwrap();
    assert_eq!(chunks.len(), 3);
    for c in &chunks {
        assert!(c.text.trim_end().ends_with("follows it."), "{:?}", c.text);
    }
    // Room for less than a paragraph: chunks end after a sentence.
    let chunks = Chunker::new(&tokenize, per_paragraph / 2)
        .unwrap()
        .split(&text)
        .unwrap();
    for c in &chunks {
        assert!(c.text.trim_end().ends_with('.'), "{:?}", c.text);
    }
}

/// A unit vector of `dim` pointing mostly along axis `axis`.
fn unit(dim: usize, axis: usize, tilt: f32) -> Vec<f32> {
    let mut v = vec![tilt; dim];
    v[axis % dim] = 1.0;
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter().map(|x| x / norm).collect()
}

fn chunk(doc: &str, no: u32, text: &str) -> IndexedChunk {
    IndexedChunk {
        id: Some(ChunkId::new(doc, no, text)),
        doc_id: doc.into(),
        chunk_no: no,
        text: text.into(),
        token_count: 2,
        token_ids: vec![10, 11],
        source: format!("/corpus/{doc}"),
        llm: "llm".into(),
        kv_key: "key".into(),
        doc_hash: "hash".into(),
    }
}

/// The behaviour every vector index must have.
async fn index_conformance(index: &dyn VectorIndex) {
    let dim = index.dim();
    assert_eq!(index.count().await.unwrap(), 0, "starts empty");
    let points: Vec<IndexPoint> = (0..6)
        .map(|i| IndexPoint {
            chunk: chunk(
                if i < 3 { "a.md" } else { "b.md" },
                i % 3,
                &format!("text {i}"),
            ),
            vector: unit(dim, i as usize, 0.05),
        })
        .collect();
    index.upsert(points.clone()).await.unwrap();
    assert_eq!(index.count().await.unwrap(), 6);

    // Nearest first, payload intact.
    let hits = index.search(&unit(dim, 4, 0.0), 3).await.unwrap();
    assert_eq!(hits.len(), 3);
    assert_eq!(hits[0].chunk, points[4].chunk);
    assert!(
        hits[0].score > 0.99 && hits[0].score > hits[1].score,
        "{hits:?}"
    );
    assert!(
        index
            .search(&unit(dim, 0, 0.0), 0)
            .await
            .unwrap()
            .is_empty()
    );

    // Get returns what exists, ignores what does not.
    let missing = ChunkId::new("nowhere", 0, "x");
    let ids = [
        points[0].chunk.chunk_id(),
        missing,
        points[5].chunk.chunk_id(),
    ];
    let got: HashSet<ChunkId> = index
        .get(&ids)
        .await
        .unwrap()
        .iter()
        .map(IndexedChunk::chunk_id)
        .collect();
    assert_eq!(got, HashSet::from([ids[0], ids[2]]));
    assert!(index.get(&[]).await.unwrap().is_empty());

    // A document's chunks, up to a limit.
    let of_a = index.doc_chunks("a.md", 10).await.unwrap();
    assert_eq!(of_a.len(), 3);
    assert!(of_a.iter().all(|c| c.doc_id == "a.md"));
    assert_eq!(index.doc_chunks("b.md", 2).await.unwrap().len(), 2);
    assert!(index.doc_chunks("nowhere", 10).await.unwrap().is_empty());

    // Upserting an id again replaces the point.
    let mut moved = points[0].clone();
    moved.vector = unit(dim, 5, 0.0);
    index.upsert(vec![moved.clone()]).await.unwrap();
    assert_eq!(index.count().await.unwrap(), 6);
    let hits = index.search(&unit(dim, 5, 0.0), 2).await.unwrap();
    assert!(hits.iter().any(|h| h.chunk == moved.chunk), "{hits:?}");

    // Deleting a document's other chunks keeps the named ones and other documents.
    index
        .delete_doc_except("a.md", &[points[1].chunk.chunk_id()])
        .await
        .unwrap();
    assert_eq!(index.count().await.unwrap(), 4);
    let left = index
        .get(
            &points
                .iter()
                .map(|p| p.chunk.chunk_id())
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    let mut docs: Vec<(String, u32)> = left
        .iter()
        .map(|c| (c.doc_id.clone(), c.chunk_no))
        .collect();
    docs.sort();
    assert_eq!(
        docs,
        [
            ("a.md".into(), 1),
            ("b.md".into(), 0),
            ("b.md".into(), 1),
            ("b.md".into(), 2)
        ]
    );
    index.delete_doc_except("b.md", &[]).await.unwrap();
    assert_eq!(index.count().await.unwrap(), 1);

    // Vectors of the wrong length are refused, not stored.
    let wrong = IndexPoint {
        chunk: chunk("c.md", 0, "wrong"),
        vector: vec![1.0; dim + 1],
    };
    assert!(index.upsert(vec![wrong]).await.is_err());
    assert!(index.search(&vec![1.0; dim + 1], 1).await.is_err());
    assert_eq!(index.count().await.unwrap(), 1);
}

#[test]
fn embedded_qdrant_passes_the_index_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let index = EdgeIndex::open(dir.path(), 8).unwrap();
        index_conformance(&index).await;
        drop(index);
        // Reopened, the data is there; opened with another vector length, it is refused.
        let index = EdgeIndex::open(dir.path(), 8).unwrap();
        assert_eq!(index.count().await.unwrap(), 1);
        drop(index);
        assert!(EdgeIndex::open(dir.path(), 16).is_err());
    });
}

#[test]
fn qdrant_server_passes_the_index_conformance_suite() {
    let Some(url) = ragcake_test_support::required_env(
        "QDRANT_URL",
        "scripts/test.sh starts a Qdrant server from QDRANT_BIN and sets it",
    ) else {
        return;
    };
    runtime().block_on(async {
        let collection = format!("ragcake-test-{}", std::process::id());
        let index = QdrantServerIndex::connect(&url, &collection, 8)
            .await
            .unwrap();
        index_conformance(&index).await;
        let reopened = QdrantServerIndex::connect(&url, &collection, 8)
            .await
            .unwrap();
        assert_eq!(reopened.count().await.unwrap(), 1);
        assert!(
            QdrantServerIndex::connect(&url, &collection, 16)
                .await
                .is_err()
        );
        index.drop_collection().await.unwrap();
    });
}

#[test]
fn an_unreachable_qdrant_server_is_a_clear_error() {
    runtime().block_on(async {
        // A closed loopback port: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}");
        let err = QdrantServerIndex::connect(&url, "c", 8).await.unwrap_err();
        assert!(err.to_string().contains("vector index"), "{err}");
    });
}

/// A small corpus with one fact per document, and files that must be skipped.
fn write_corpus(root: &Path) {
    let docs = [
        (
            "bees.md",
            "# Honey bees\n\nA forager honey bee that finds flowers returns to the hive and \
             performs a waggle dance. The angle of the dance tells the other bees the \
             direction of the flowers relative to the sun, and its length tells the \
             distance.\n",
        ),
        (
            "volcanoes.md",
            "# Volcanoes\n\nMount Etna on Sicily is one of the most active volcanoes in the \
             world. Its eruptions have been recorded since 1500 BC, and lava flows from its \
             flanks regularly reach the villages around it.\n",
        ),
        (
            "chess/openings.txt",
            "The Sicilian Defence begins with 1.e4 c5. Black fights for the centre from the \
             side and aims for an unbalanced game with chances for both players.\n",
        ),
        (
            "lighthouses.md",
            "Before electric lamps, lighthouse keepers trimmed wicks through the night, and a \
             Fresnel lens gathered the flame into a beam ships could see twenty miles out.\n",
        ),
        (
            "bread.txt",
            "Sourdough bread rises because wild yeast and lactic acid bacteria in the starter \
             ferment the flour, releasing carbon dioxide that is trapped in the gluten.\n",
        ),
    ];
    for (name, text) in docs {
        let path = root.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    std::fs::write(root.join("empty.txt"), "").unwrap();
    std::fs::write(root.join("binary.md"), b"PK\x03\x04\0\0binary").unwrap();
    std::fs::write(root.join("latin1.txt"), b"caf\xe9 cr\xe8me").unwrap();
    std::fs::write(root.join("photo.jpg"), b"\xff\xd8\xff").unwrap();
}

/// The embedded index in `dir`, sized for the default embedder.
fn edge_index(dir: &Path) -> Arc<dyn VectorIndex> {
    Arc::new(EdgeIndex::open(dir, embedder().dim()).unwrap())
}

/// Runs the ingest job (48-token chunks) on the shared engine and embedder over `corpus`,
/// writing to `index_dir` and `kv_dir`.
fn ingest(index_dir: &Path, kv_dir: &Path, corpus: &Path, shard: Shard) -> IngestSummary {
    try_ingest(index_dir, kv_dir, corpus, shard, false).unwrap()
}

/// [`ingest`], its error returned; `allow_moved` as [`IngestConfig::allow_moved`].
fn try_ingest(
    index_dir: &Path,
    kv_dir: &Path,
    corpus: &Path,
    shard: Shard,
    allow_moved: bool,
) -> Result<IngestSummary, IngestError> {
    let config = IngestConfig {
        chunk_tokens: 48,
        shard,
        batch: 4,
        precompute_kv: true,
        template: PromptTemplate::default(),
        allow_moved,
    };
    let job = Ingest::new(
        shared_dense_engine(),
        embedder(),
        edge_index(index_dir),
        local_kv(kv_dir),
        config,
    )
    .unwrap();
    runtime().block_on(job.run(&[corpus.to_path_buf()], &|_| {}))
}

#[test]
fn ingest_then_retrieve_finds_the_passage_with_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    write_corpus(&corpus);
    let (index_dir, kv_dir) = (dir.path().join("index"), dir.path().join("kv"));
    let first = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert_eq!(first.documents, 5);
    assert_eq!(first.skipped.len(), 3, "{:?}", first.skipped);
    let reasons: Vec<&str> = first.skipped.iter().map(|s| s.1.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.starts_with("binary")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("not UTF-8")),
        "{reasons:?}"
    );
    assert!(reasons.contains(&"empty"), "{reasons:?}");
    assert!(first.chunks >= 5 && first.chunks_indexed == first.chunks);
    assert_eq!(first.kv_computed, first.chunks);
    assert!(first.bytes_stored > 0);

    // A second run does no new work.
    let again = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert!(again.did_no_work(), "{again:?}");
    assert_eq!(
        (again.documents, again.chunks),
        (first.documents, first.chunks)
    );

    runtime().block_on(async {
        let engine = shared_dense_engine();
        let index = edge_index(&index_dir);
        assert_eq!(index.count().await.unwrap(), first.chunks);
        let kv = local_kv(&kv_dir);
        let llm = Some(engine.fingerprint().to_hex());
        let retriever = Retriever::new(embedder(), index.clone(), llm).unwrap();
        let options = RetrieveOptions {
            top_k: 3,
            ..RetrieveOptions::default()
        };
        let found = retriever
            .retrieve(
                "How do honey bees tell each other where the flowers are?",
                &options,
            )
            .await
            .unwrap();
        assert_eq!(found.chunks[0].chunk.doc_id, "corpus/bees.md", "{found:?}");
        assert!(found.chunks.iter().all(|c| c.cache == CacheStatus::Stored));
        let found = retriever
            .retrieve("Which volcano erupts on Sicily?", &options)
            .await
            .unwrap();
        assert_eq!(found.chunks[0].chunk.doc_id, "corpus/volcanoes.md");

        // The payload names the stored cache: the chunk computed after the template's
        // standard preamble, at the positions that follow it, only its own tokens kept.
        let hit = &found.chunks[0];
        let key = CacheKey::from_hex(CacheKind::Chunk, &hit.chunk.kv_key).unwrap();
        let context = PromptTemplate::default().chunk_context(&engine).unwrap();
        assert_eq!(key, kv.chunk_key(&context, &hit.chunk.token_ids));
        let range = kv
            .get(&key, Some(&hit.chunk.token_ids))
            .await
            .unwrap()
            .hit()
            .expect("stored");
        assert_eq!(range.len(), hit.chunk.token_ids.len());
        assert_eq!(range.base_position(), context.len());
        let mut in_context = engine.new_cache();
        let whole = [context.as_slice(), &hit.chunk.token_ids].concat();
        engine.append(&mut in_context, &whole, 512, false).unwrap();
        let expected = in_context.export(context.len()..whole.len()).unwrap();
        for ((k, v), (ek, ev)) in range.layers().iter().zip(expected.layers()) {
            // f16 storage: a relative error of about 1e-3 of the largest values.
            assert!(max_abs_diff(k, ek) < 2e-2 * max_abs(ek).max(1.0));
            assert!(max_abs_diff(v, ev) < 2e-2 * max_abs(ev).max(1.0));
        }

        // A chunk whose payload records no cache is reported absent and ordered first.
        let mut unrecorded = hit.chunk.clone();
        unrecorded.kv_key.clear();
        let vector = embedder().embed_one(&unrecorded.text).unwrap();
        index
            .upsert(vec![IndexPoint {
                chunk: unrecorded,
                vector,
            }])
            .await
            .unwrap();
        let found = retriever
            .retrieve(
                "Which volcano erupts on Sicily?",
                &RetrieveOptions {
                    order: ChunkOrder::CachedLast,
                    ..options
                },
            )
            .await
            .unwrap();
        assert_eq!(found.chunks[0].chunk.doc_id, "corpus/volcanoes.md");
        assert_eq!(found.chunks[0].cache, CacheStatus::Absent);
        assert!(found.chunks[1..].iter().all(|c| c.cache.is_stored()));

        // For another LLM, no chunk's cache counts.
        let other = Retriever::new(embedder(), index, Some("other".into())).unwrap();
        let found = other.retrieve("Which volcano?", &options).await.unwrap();
        assert!(
            found
                .chunks
                .iter()
                .all(|c| c.cache == CacheStatus::OtherModel)
        );

        // A cache lost from the store is computed and stored again by the next run, and
        // the point records it again.
        kv.delete(&key).await.unwrap();
    });
    let repaired = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert_eq!(repaired.kv_computed, 1, "{repaired:?}");
    assert_eq!(repaired.chunks_indexed, 1, "{repaired:?}");
}

#[test]
fn a_changed_document_is_reingested_without_stale_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    write_corpus(&corpus);
    let (index_dir, kv_dir) = (dir.path().join("index"), dir.path().join("kv"));
    let first = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    std::fs::write(
        corpus.join("bread.txt"),
        "Rye bread is dense. It keeps for a week.\n",
    )
    .unwrap();
    let second = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert_eq!(second.chunks_indexed, 1, "{second:?}");
    let index = edge_index(&index_dir);
    let count = runtime().block_on(index.count()).unwrap();
    assert_eq!(count, second.chunks);
    assert!(second.chunks <= first.chunks);
}

#[test]
fn a_later_run_over_another_input_of_the_same_name_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a/corpus"), dir.path().join("b/corpus"));
    for (root, text) in [
        (&a, "Rye bread is dense. It keeps for a week.\n"),
        (&b, "Spelt bread is light. It keeps for two days.\n"),
    ] {
        std::fs::create_dir_all(root).unwrap();
        std::fs::write(root.join("bread.txt"), text).unwrap();
    }
    let (index_dir, kv_dir) = (dir.path().join("index"), dir.path().join("kv"));
    let first = ingest(&index_dir, &kv_dir, &a, Shard::ALL);
    assert_eq!(first.chunks_indexed, 1);
    // `b/corpus/bread.txt` has the id `corpus/bread.txt` too: refused, a's chunk kept.
    let error = try_ingest(&index_dir, &kv_dir, &b, Shard::ALL, false).unwrap_err();
    assert!(
        matches!(&error, IngestError::OtherSource { doc_id, .. } if doc_id == "corpus/bread.txt"),
        "{error}"
    );
    assert!(error.to_string().contains("--allow-moved"), "{error}");
    let kept = runtime()
        .block_on(edge_index(&index_dir).doc_chunks("corpus/bread.txt", 10))
        .unwrap();
    assert_eq!(kept.len(), 1);
    assert!(kept[0].text.contains("Rye"), "{kept:?}");
    // A changed document from the same input is taken (the same file, a new version)...
    std::fs::write(
        a.join("bread.txt"),
        "Rye bread is dense. It keeps for ten days.\n",
    )
    .unwrap();
    assert_eq!(
        ingest(&index_dir, &kv_dir, &a, Shard::ALL).chunks_indexed,
        1
    );
    // ...and a corpus that moved is taken when the run says so.
    let moved = try_ingest(&index_dir, &kv_dir, &b, Shard::ALL, true).unwrap();
    assert_eq!(moved.chunks_indexed, 1);
    let now = runtime()
        .block_on(edge_index(&index_dir).doc_chunks("corpus/bread.txt", 10))
        .unwrap();
    assert_eq!(now.len(), 1);
    assert!(now[0].text.contains("Spelt"), "{now:?}");
}

#[test]
fn shards_partition_the_corpus_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    write_corpus(&corpus);
    let whole = ingest(
        &dir.path().join("whole-index"),
        &dir.path().join("whole-kv"),
        &corpus,
        Shard::ALL,
    );
    let mut docs = Vec::new();
    let mut chunks = 0;
    for i in 0..3 {
        let shard = Shard { index: i, count: 3 };
        let index_dir = dir.path().join(format!("index-{i}"));
        let summary = ingest(
            &index_dir,
            &dir.path().join(format!("kv-{i}")),
            &corpus,
            shard,
        );
        chunks += summary.chunks;
        let index = edge_index(&index_dir);
        let found = runtime()
            .block_on(index.search(&vec![0.05; index.dim()], 100))
            .unwrap();
        let mine: HashSet<String> = found.into_iter().map(|h| h.chunk.doc_id).collect();
        docs.extend(mine);
    }
    let distinct: HashSet<&String> = docs.iter().collect();
    assert_eq!(
        distinct.len(),
        docs.len(),
        "a document in two shards: {docs:?}"
    );
    assert_eq!(docs.len(), whole.documents, "{docs:?}");
    assert_eq!(chunks, whole.chunks);
}

#[test]
fn an_ingest_killed_midway_completes_on_the_next_run_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = dir.path().join("corpus");
    for i in 0..24 {
        let path = corpus.join(format!("doc-{i:02}.txt"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, format!("Document {i}. {}", PROSE.repeat(2))).unwrap();
    }
    let (index_dir, kv_dir) = (dir.path().join("index"), dir.path().join("kv"));
    let mut child = Command::new(crate::common::ragcake_binary())
        .arg("ingest")
        .arg(&corpus)
        .args(["--chunk-tokens", "48", "--batch", "4", "--index"])
        .arg(&index_dir)
        .arg("--kv")
        .arg(format!("file://{}", kv_dir.display()))
        .env("RAGCAKE_MODEL", crate::common::model_path())
        .env("RAGCAKE_LOG", "ragcake_retriever=info,ragcake=info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let mut done = 0;
    for line in stderr.lines() {
        if line.unwrap().contains("document ingested") {
            done += 1;
            if done == 3 {
                break;
            }
        }
    }
    assert_eq!(done, 3, "the job ended before it could be killed");
    child.kill().unwrap();
    child.wait().unwrap();

    let resumed = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert_eq!(resumed.documents, 24);
    assert!(
        resumed.chunks_indexed > 0 && resumed.chunks_indexed < resumed.chunks,
        "{resumed:?}"
    );
    let index = edge_index(&index_dir);
    assert_eq!(runtime().block_on(index.count()).unwrap(), resumed.chunks);
    // One handle on an index directory at a time.
    let err = EdgeIndex::open(&index_dir, embedder().dim()).unwrap_err();
    assert!(err.to_string().contains("already open"), "{err}");
    drop(index);
    let after = ingest(&index_dir, &kv_dir, &corpus, Shard::ALL);
    assert!(after.did_no_work(), "{after:?}");
}

#[test]
fn ingest_refuses_a_store_of_another_model() {
    let dir = tempfile::tempdir().unwrap();
    let engine = shared_dense_engine();
    let index = edge_index(&dir.path().join("i"));
    let (store, prefix) = open_url("memory://", Vec::new()).unwrap();
    let foreign = KvStore::new(
        store,
        prefix,
        ragcake::engine::LlmFingerprint([7; 32]),
        engine.kv_shape(),
        ragcake::engine::Device::Cpu,
    );
    let err = Ingest::new(
        engine,
        embedder(),
        index,
        Arc::new(foreign),
        IngestConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("model"), "{err}");
}
