//! Gemma 3 270M, the second real model: a base model with a SentencePiece vocabulary,
//! sliding-window local layers (base 10,000) beside global layers (base 1e6), and weights in
//! Q4_K, Q5_0, Q6_K and Q8_0 — through the paths the default model takes.

use std::ops::ControlFlow;

use std::sync::Arc;

use ragcake::engine::correction::AttentionCalibration;
use ragcake::engine::{Engine, EngineConfig, GenerateParams, ReturnLogits};
use ragcake::ingest::{Ingest, IngestConfig};
use ragcake::pipeline::{AskOptions, AskRequest, Pipeline, PipelineConfig};
use ragcake::retriever::{EdgeIndex, VectorIndex};
use ragcake::scheduler::Mode;

use crate::common::{
    assert_exported_and_imported_kv_continues_alike, assert_prefill_in_pieces_matches_one_pass,
    embedder, gemma3_engine, max_abs, max_abs_diff, model_path, repo_dir, runtime,
    shared_gemma3_engine,
};

fn prose(min_tokens: usize) -> Vec<u32> {
    const TEXT: &str = "The history of the lighthouse is a history of coastal trade. Before \
        electric lamps, keepers trimmed wicks through the night, and a lens the size of a \
        small room gathered the flame into a beam that ships could see twenty miles out. \
        Each light had its own rhythm of flashes so that a navigator could tell one headland \
        from the next. ";
    let tokenizer = gemma3_engine().tokenizer();
    let mut tokens = vec![tokenizer.bos().expect("Gemma has a BOS")];
    while tokens.len() < min_tokens {
        tokens.extend(tokenizer.encode(TEXT, false).unwrap());
    }
    tokens.truncate(min_tokens);
    tokens
}

#[test]
fn gemma3_is_read_with_its_local_and_global_layers() {
    let config = gemma3_engine().config();
    assert_eq!(config.family, "gemma3");
    assert_eq!(
        (
            config.n_layers,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim
        ),
        (18, 4, 1, 256)
    );
    let global: Vec<usize> = (0..18)
        .filter(|&i| config.layers[i].window.is_none())
        .collect();
    assert_eq!(global, [5, 11, 17]);
    assert!(config.layers[0].window == Some(512) && config.layers[0].rope_theta == 10_000.0);
    assert_eq!(config.layers[5].rope_theta, 1_000_000.0);
    assert!(
        gemma3_engine().template().is_completion(),
        "a base model: no chat template"
    );
}

#[test]
fn gemma3_completes_a_prompt_streaming_what_it_generates() {
    // A 270M base model's greedy text is not a fact check (its logits are, in the
    // conformance tests); this checks the generation path end to end.
    let engine = gemma3_engine();
    let mut prompt = vec![engine.tokenizer().bos().unwrap()];
    prompt.extend(
        engine
            .tokenizer()
            .encode("The capital of France is", false)
            .unwrap(),
    );
    let params = GenerateParams {
        max_tokens: 8,
        ..GenerateParams::default()
    };
    let mut streamed = String::new();
    let done = engine
        .complete(&prompt, &params, |piece| {
            streamed += piece;
            ControlFlow::Continue(())
        })
        .unwrap();
    let generation = done.generation;
    assert!(!generation.text.trim().is_empty());
    assert_eq!(streamed, generation.text);
    assert_eq!(
        engine.tokenizer().decode(&generation.tokens, false),
        generation.text
    );
}

#[test]
fn gemma3_prefill_in_chunks_across_the_window_matches_one_shot() {
    // 1,300 tokens: more than two windows, so local layers drop keys the global ones keep.
    assert_prefill_in_pieces_matches_one_pass(gemma3_engine(), &prose(1300), 300);
}

#[test]
fn gemma3_exported_and_imported_kv_continues_with_the_same_logits() {
    let next = prose(710)[700..].to_vec();
    assert_exported_and_imported_kv_continues_alike(gemma3_engine(), &prose(700), 300, &next);
}

#[test]
fn gemma3_chunk_moved_to_p_matches_it_computed_at_p_in_local_and_global_layers() {
    // Local layers rotate with base 10,000, global ones with 1e6: moving a chunk cache
    // re-rotates each layer with its own base, or the keys would not match.
    let engine = gemma3_engine();
    let chunk = prose(96);
    for p in [37usize, 700, 5000] {
        let mut at_zero = engine.model().new_cache(0);
        engine
            .model()
            .forward(&chunk, &mut at_zero, ReturnLogits::None)
            .unwrap();
        let mut at_p = engine.model().new_cache(p);
        engine
            .model()
            .forward(&chunk, &mut at_p, ReturnLogits::None)
            .unwrap();
        let mut moved = engine.model().new_cache(p);
        engine
            .import(&mut moved, &at_zero.export(0..96).unwrap())
            .unwrap();
        for layer in [0, 4, 5, 11, 17] {
            let (k_moved, _) = moved.layer(layer).unwrap();
            let (k_direct, _) = at_p.layer(layer).unwrap();
            let dk = max_abs_diff(&k_moved, &k_direct) / max_abs(&k_direct).max(1.0);
            assert!(dk < 1e-3, "p={p} layer {layer}: relative key error {dk}");
        }
    }
}

#[test]
fn gemma3_decode_steps_follow_prefill() {
    // Quantized decode (8-bit copies of Q4_K/Q5_0/Q6_K weights) picks the token the dense
    // prefill of the same sequence picks, over a context past the window.
    let engine = gemma3_engine();
    let tokens = prose(600);
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &tokens[..599], 512).unwrap();
    let step = engine.model().decode(&tokens[599..], &mut cache).unwrap();
    let mut dense = engine.new_cache();
    let full = engine.prefill(&mut dense, &tokens, 512).unwrap();
    let argmax = |t: &ragcake::engine::Tensor| t.argmax(0).unwrap().to_scalar::<u32>().unwrap();
    assert_eq!(argmax(&step), argmax(&full));
    let diff = max_abs_diff(&step, &full);
    assert!(diff < 1.0, "decode moved logits by {diff}");
}

/// Gemma's KV store in the local directory `dir`.
fn gemma3_kv(dir: &std::path::Path) -> Arc<ragcake::kvstore::KvStore> {
    let url = format!("file://{}", dir.display());
    Arc::new(
        ragcake::kvstore::KvStore::open_for_engine(&url, Vec::new(), &shared_gemma3_engine())
            .unwrap(),
    )
}

#[test]
fn gemma3_answers_over_its_chunk_caches_and_a_repeat_loads_its_prefix_caches_exactly() {
    // The whole path with the second model: ingest computes Gemma's chunk caches after the
    // completion format's preamble; a new question loads them (bidirectional, blended);
    // in exact mode the computed chunks are written back and a repeat loads them, giving
    // full computation's answer token for token.
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let index: Arc<dyn VectorIndex> =
            Arc::new(EdgeIndex::open(&dir.path().join("index"), embedder().dim()).unwrap());
        let job = Ingest::new(
            shared_gemma3_engine(),
            embedder(),
            index.clone(),
            gemma3_kv(&dir.path().join("kv")),
            IngestConfig::default(),
        )
        .unwrap();
        let summary = job
            .run(&[repo_dir().join("demo/corpus")], &|_| {})
            .await
            .unwrap();
        assert!(summary.kv_computed > 10, "{summary:?}");
        let pipeline = Pipeline::builder()
            .engine(shared_gemma3_engine())
            .embedder(embedder())
            .index(index)
            .kv_store(gemma3_kv(&dir.path().join("kv")))
            .config(PipelineConfig::default())
            .build()
            .await
            .unwrap();
        let question = "What kind of cheese is Varrow Blue and what milk is it made from?";
        let ask = |exact: bool| {
            AskRequest::new(question).with_options(AskOptions {
                mode: Mode::Bidirectional,
                exact,
                max_tokens: 24,
                ..AskOptions::default()
            })
        };
        let blended = pipeline.ask(ask(false)).await.unwrap();
        assert!(
            blended
                .sources
                .iter()
                .any(|s| s.doc_id.ends_with("food.md")),
            "{:?}",
            blended.sources
        );
        let b = &blended.breakdown.prefill;
        assert!(b.chunks_loaded >= 1 && b.tokens_recomputed > 0, "{b:?}");
        assert!(!blended.text.trim().is_empty());

        let computed = pipeline.ask(ask(true)).await.unwrap();
        let written = computed.breakdown.prefill.chunks_computed as u64;
        for _ in 0..300 {
            let stats = pipeline.scheduler_stats();
            if stats.write_backs + stats.write_backs_skipped >= written {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let again = pipeline.ask(ask(true)).await.unwrap();
        let b2 = &again.breakdown;
        assert_eq!(b2.lookups.prefix_hits, b2.prefill.chunks, "{b2:?}");
        assert!(b2.prefill.chunks_loaded >= 1, "{b2:?}");
        assert_eq!(
            again.text, computed.text,
            "exact caches give the computed answer"
        );
    });
}

#[test]
fn both_models_fetched_by_name_have_their_attention_calibration_bundled() {
    // A wrong fingerprint in a bundled file would silently leave the correction off.
    for engine in [crate::common::engine(), gemma3_engine()] {
        let calibration = AttentionCalibration::bundled(engine.fingerprint())
            .unwrap()
            .unwrap_or_else(|| panic!("no bundled calibration for {}", engine.fingerprint()));
        assert!(!calibration.correction.is_identity());
    }
    // A calibration directory without the model's file falls back to the bundled one.
    let empty = std::env::temp_dir().join(format!("ragcake-no-calibration-{}", std::process::id()));
    let mut engine = Engine::load(model_path(), &EngineConfig::default()).unwrap();
    assert!(engine.attention_correction().is_identity());
    let loaded = engine.load_calibration(&empty).unwrap().unwrap();
    assert_eq!(engine.attention_correction(), loaded.correction);
    assert!(!loaded.correction.is_identity());
}
