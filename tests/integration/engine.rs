//! The engine on the real model: chunked prefill, KV export/import, RoPE shifts,
//! generation and bad input.

use std::io::Write;
use std::ops::ControlFlow;

use ragcake::engine::{
    Blend, ChatMessage, Engine, EngineConfig, EngineError, GenerateParams, GgufFile, KvCache,
    ReturnLogits, Role, Sampling, Selection, Tensor,
};

use crate::common::{
    LOGIT_TOLERANCE, assert_exported_and_imported_kv_continues_alike,
    assert_prefill_in_pieces_matches_one_pass, dense_engine, engine, logits, max_abs, max_abs_diff,
    mean_kl, model_path, prose_tokens,
};

fn one_shot_logits(tokens: &[u32]) -> Tensor {
    let engine = dense_engine();
    let mut cache = engine.new_cache();
    logits(engine, tokens, &mut cache, ReturnLogits::All)
}

#[test]
fn chunked_prefill_gives_the_same_logits_as_one_shot_prefill() {
    let engine = dense_engine();
    let tokens = prose_tokens(300);
    let reference = one_shot_logits(&tokens);
    for chunk in [1, 7, 64, 100, 256] {
        // Chunk size 1 is token-by-token decoding: checked over the last 24 tokens only.
        let (prefix, checked) = if chunk == 1 { (276, 276) } else { (0, 0) };
        let mut cache = engine.new_cache();
        if prefix > 0 {
            engine
                .model()
                .forward(&tokens[..prefix], &mut cache, ReturnLogits::None)
                .unwrap();
        }
        let mut rows = Vec::new();
        for piece in tokens[prefix..].chunks(chunk) {
            rows.push(logits(engine, piece, &mut cache, ReturnLogits::All));
        }
        let chunked = Tensor::cat(&rows, 0).unwrap();
        let diff = max_abs_diff(
            &chunked,
            &reference.narrow(0, checked, 300 - checked).unwrap(),
        );
        assert!(
            diff < LOGIT_TOLERANCE,
            "chunk {chunk}: max |Δlogit| = {diff}"
        );
        assert_eq!(cache.len(), 300);
    }
    // Engine::prefill returns the last position's logits.
    let mut cache = engine.new_cache();
    let last = engine.prefill(&mut cache, &tokens, 128).unwrap();
    let diff = max_abs_diff(&last, &reference.get(299).unwrap());
    assert!(diff < LOGIT_TOLERANCE, "prefill: {diff}");
}

#[test]
fn quantized_decode_steps_stay_close_to_dense_prefill() {
    // Decode steps multiply by the GGUF's own Q4_1 blocks (8-bit blocks for other types)
    // with activations rounded to 8 bits: logits move by that rounding only.
    let engine = engine();
    let tokens = prose_tokens(140);
    let reference = one_shot_logits(&tokens);
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &tokens[..120], 120).unwrap();
    let mut worst = 0f32;
    for (i, &token) in tokens[120..].iter().enumerate() {
        let step = engine.model().decode(&[token], &mut cache).unwrap();
        let expected = reference.get(120 + i).unwrap();
        worst = worst.max(max_abs_diff(&step, &expected));
        assert_eq!(
            argmax(&step),
            argmax(&expected),
            "greedy choice changed at step {i}"
        );
    }
    // Observed at worst over 49k logits spanning about ±30, with the same greedy token at
    // every step: ~0.65 (8-bit activations against the GGUF's Q4_1 blocks; ~0.7–1.04 when
    // the weights were re-rounded to Q8_0); a wrong position or cache would move them by
    // several units. Bound: 5% of the largest logit.
    let bound = 0.05 * max_abs(&reference);
    assert!(
        worst < bound,
        "quantized decode moved logits by {worst} (bound {bound})"
    );
    assert!(
        worst > 0.0,
        "decode steps did not use the quantized weights"
    );
}

#[test]
fn long_context_prefill_in_chunks_matches_one_shot_at_the_end() {
    // Past several attention query blocks, so block boundaries and masks are exercised.
    assert_prefill_in_pieces_matches_one_pass(engine(), &prose_tokens(1100), 333);
}

#[test]
fn exported_and_imported_kv_continues_with_the_same_logits() {
    let next = prose_tokens(210)[200..].to_vec();
    assert_exported_and_imported_kv_continues_alike(engine(), &prose_tokens(200), 120, &next);
}

#[test]
fn kv_round_trip_through_f16_stays_close() {
    // Stored caches are f16: continuing from them must stay close to the f32 original.
    // Dense decode isolates the storage rounding from the Q8_0 rounding of decode steps.
    let engine = dense_engine();
    let tokens = prose_tokens(150);
    let mut original = engine.new_cache();
    engine.prefill(&mut original, &tokens, 150).unwrap();
    let stored = original
        .export(0..150)
        .unwrap()
        .to_dtype(ragcake::engine::DType::F16)
        .unwrap();
    let mut rebuilt = engine.new_cache();
    engine.import(&mut rebuilt, &stored).unwrap();
    let q = engine.tokenizer().encode(" The keepers", false).unwrap();
    let a = logits(engine, &q, &mut original, ReturnLogits::Last);
    let b = logits(engine, &q, &mut rebuilt, ReturnLogits::Last);
    let diff = max_abs_diff(&a, &b);
    assert!(diff < 0.15, "f16 storage moved logits by {diff}");
    assert_eq!(argmax(&a), argmax(&b));
}

fn argmax(t: &Tensor) -> u32 {
    t.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

#[test]
fn chunk_computed_at_zero_and_moved_to_p_has_the_keys_of_the_chunk_computed_at_p() {
    let engine = engine();
    let chunk = prose_tokens(96);
    for p in [1usize, 37, 500, 4000] {
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
        for layer in [0, 14, 29] {
            let (k_moved, v_moved) = moved.layer(layer).unwrap();
            let (k_direct, v_direct) = at_p.layer(layer).unwrap();
            let scale = max_abs(&k_direct).max(1.0);
            let dk = max_abs_diff(&k_moved, &k_direct) / scale;
            let dv = max_abs_diff(&v_moved, &v_direct) / max_abs(&v_direct).max(1.0);
            assert!(dk < 1e-3, "p={p} layer {layer}: relative key error {dk}");
            assert!(dv < 1e-3, "p={p} layer {layer}: relative value error {dv}");
        }
    }
    // And the moved cache is not simply the unmoved one: the rotation did something.
    let mut at_zero = engine.model().new_cache(0);
    engine
        .model()
        .forward(&chunk, &mut at_zero, ReturnLogits::None)
        .unwrap();
    let mut at_p = engine.model().new_cache(500);
    engine
        .model()
        .forward(&chunk, &mut at_p, ReturnLogits::None)
        .unwrap();
    let d = max_abs_diff(&at_zero.layer(0).unwrap().0, &at_p.layer(0).unwrap().0);
    assert!(d > 0.1, "keys at 0 and 500 should differ, max diff {d}");
}

#[test]
fn greedy_generation_answers_a_factual_question() {
    let engine = engine();
    let prompt = engine
        .chat_tokens(&[ChatMessage::new(
            Role::User,
            "What is the capital of France?",
        )])
        .unwrap();
    let mut streamed = String::new();
    let done = engine
        .complete(&prompt, &GenerateParams::default(), |piece| {
            streamed += piece;
            ControlFlow::Continue(())
        })
        .unwrap();
    assert!(
        done.generation.text.contains("Paris"),
        "{:?}",
        done.generation.text
    );
    assert_eq!(streamed, done.generation.text);
    assert_eq!(
        done.generation.finish_reason,
        ragcake::engine::FinishReason::Stop
    );
}

#[test]
fn seeded_sampling_is_reproducible_and_max_tokens_is_honoured() {
    let engine = engine();
    let prompt = engine
        .chat_tokens(&[ChatMessage::new(
            Role::User,
            "Write a sentence about the sea.",
        )])
        .unwrap();
    let params = |seed| GenerateParams {
        max_tokens: 12,
        sampling: Sampling {
            temperature: 0.9,
            top_p: 0.9,
            seed,
        },
        ..GenerateParams::default()
    };
    let run = |seed| {
        engine
            .complete(&prompt, &params(seed), |_| ControlFlow::Continue(()))
            .unwrap()
            .generation
    };
    let a = run(42);
    let b = run(42);
    assert_eq!(a.tokens, b.tokens);
    assert!(a.tokens.len() <= 12);
    let others: Vec<_> = (0..4).map(|s| run(1000 + s).tokens).collect();
    assert!(
        others.iter().any(|t| *t != a.tokens),
        "different seeds all gave {:?}",
        a.text
    );
}

#[test]
fn streaming_callback_can_stop_generation() {
    let engine = engine();
    let prompt = engine
        .chat_tokens(&[ChatMessage::new(Role::User, "Count from one to twenty.")])
        .unwrap();
    let mut pieces = 0;
    let done = engine
        .complete(&prompt, &GenerateParams::default(), |_| {
            pieces += 1;
            if pieces == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
        .unwrap();
    assert_eq!(
        done.generation.finish_reason,
        ragcake::engine::FinishReason::Cancelled
    );
    assert_eq!(pieces, 3);
}

#[test]
fn empty_prompt_is_a_typed_error() {
    let engine = engine();
    let mut cache = engine.new_cache();
    assert!(matches!(
        engine.prefill(&mut cache, &[], 64),
        Err(EngineError::EmptyInput)
    ));
    assert!(matches!(
        engine.model().forward(&[], &mut cache, ReturnLogits::Last),
        Err(EngineError::EmptyInput)
    ));
    assert!(cache.is_empty());
}

#[test]
fn prompt_longer_than_the_context_is_a_typed_error_and_leaves_the_cache_alone() {
    let engine = engine();
    let context = engine.context_length();
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &prose_tokens(10), 10).unwrap();
    let too_long = vec![100u32; context];
    match engine.prefill(&mut cache, &too_long, 512) {
        Err(EngineError::ContextOverflow { needed, max }) => {
            assert_eq!((needed, max), (context + 10, context))
        }
        other => panic!("expected ContextOverflow, got {other:?}"),
    }
    assert_eq!(cache.len(), 10);
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    let engine = engine();
    let mut cache = engine.new_cache();
    let vocab = engine.config().vocab_size as u32;
    assert!(matches!(
        engine.model().forward(&[5, vocab + 3], &mut cache, ReturnLogits::Last),
        Err(EngineError::TokenOutOfRange { id, .. }) if id == vocab + 3
    ));
}

#[test]
fn truncated_gguf_is_a_typed_error() {
    let bytes = std::fs::read(model_path()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keep in [bytes.len() - 1, bytes.len() / 2, 4096, 10] {
        let path = dir.path().join(format!("cut-{keep}.gguf"));
        std::fs::write(&path, &bytes[..keep]).unwrap();
        match Engine::load(&path, &EngineConfig::default()) {
            Err(EngineError::Truncated { .. }) | Err(EngineError::InvalidGguf { .. }) => {}
            other => panic!("{keep} bytes: expected a truncation error, got {other:?}"),
        }
    }
    let path = dir.path().join("cut-half.gguf");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(
        Engine::load(&path, &EngineConfig::default()),
        Err(EngineError::Truncated { .. })
    ));
}

#[test]
fn files_that_are_not_gguf_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.gguf");
    std::fs::write(&text, "this is not a model\n".repeat(100)).unwrap();
    assert!(matches!(
        Engine::load(&text, &EngineConfig::default()),
        Err(EngineError::InvalidGguf { .. })
    ));
    assert!(matches!(
        Engine::load(dir.path().join("missing.gguf"), &EngineConfig::default()),
        Err(EngineError::Io { .. })
    ));
}

#[test]
fn gguf_of_an_unsupported_architecture_is_a_typed_error() {
    use candle_core::quantized::{QTensor, gguf_file};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let weight = Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    let qweight = QTensor::quantize(&weight, candle_core::quantized::GgmlDType::F32).unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &qweight)],
    )
    .unwrap();
    file.flush().unwrap();
    match Engine::load(&path, &EngineConfig::default()) {
        Err(EngineError::UnsupportedArchitecture(arch)) => assert_eq!(arch, "gpt2"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

#[test]
fn fingerprint_is_stable_and_changes_with_the_weights() {
    let path = model_path();
    let a = GgufFile::open(&path).unwrap().fingerprint().unwrap();
    let b = GgufFile::open(&path).unwrap().fingerprint().unwrap();
    assert_eq!(a, b);
    assert_eq!(a, engine().fingerprint());

    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 100; // inside the last tensor's data
    bytes[last] ^= 0x01;
    let dir = tempfile::tempdir().unwrap();
    let changed = dir.path().join("changed.gguf");
    std::fs::write(&changed, &bytes).unwrap();
    let c = GgufFile::open(&changed).unwrap().fingerprint().unwrap();
    assert_ne!(a, c);
}

#[test]
fn kv_import_rejects_a_range_of_another_shape() {
    let engine = engine();
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &prose_tokens(8), 8).unwrap();
    let range = cache.export(0..8).unwrap();
    let layers: Vec<_> = range.layers()[..10].to_vec();
    let short = ragcake::engine::KvRange::new(0, layers).unwrap();
    let mut fresh = engine.new_cache();
    assert!(matches!(
        engine.import(&mut fresh, &short),
        Err(EngineError::KvMismatch(_))
    ));
    assert!(matches!(
        cache.export(5..20),
        Err(EngineError::KvMismatch(_))
    ));
    assert!(fresh.is_empty());
}

/// A chat preamble, two retrieved chunks and a question about the first: the second chunk's
/// position-independent cache (computed after the preamble alone) never saw the first.
struct BlendCase {
    preamble: Vec<u32>,
    first: Vec<u32>,
    second: Vec<u32>,
    tail: Vec<u32>,
}

impl BlendCase {
    /// Cache indices of the first and second chunk after the preamble.
    fn chunk_offsets(&self) -> [usize; 2] {
        let first = self.preamble.len();
        [first, first + self.first.len()]
    }
}

fn blend_case() -> BlendCase {
    let tokenizer = dense_engine().tokenizer();
    let control = |s: &str| tokenizer.encode(s, true).unwrap();
    let text = |s: &str| tokenizer.encode(s, false).unwrap();
    BlendCase {
        preamble: control(
            "<|im_start|>system\nAnswer using only the context.<|im_end|>\n<|im_start|>user\nContext:\n",
        ),
        first: text(
            "The Varden lighthouse stands on the northern cape of Ilsa island. Its keeper from \
             1902 to 1931 was Margit Olsen, who kept a logbook of every ship that passed.",
        ),
        second: text(
            " The logbook she kept was found in 1987 in the attic of the keeper's cottage. It \
             records four thousand ships, eleven wrecks and one visit by the king, and it is now \
             shown in the harbour museum next to the old lens.",
        ),
        tail: control(
            "\n\nQuestion: Who kept the logbook, and where is it shown?<|im_end|>\n<|im_start|>assistant\n",
        ),
    }
}

/// The tail's logits after `preamble + first` computed and `second` loaded from its chunk
/// cache, optionally blended with `selection`, on `engine`.
fn tail_logits_over_chunk_cache(
    engine: &Engine,
    case: &BlendCase,
    selection: Option<Selection>,
) -> (Tensor, usize) {
    // The chunk cache: computed after the preamble alone, only its own tokens kept.
    let mut alone = engine.new_cache();
    engine.prefill(&mut alone, &case.preamble, 512).unwrap();
    engine.append(&mut alone, &case.second, 512, false).unwrap();
    let chunk_cache = alone
        .export(case.preamble.len()..alone.len())
        .unwrap()
        .to_dtype(ragcake::engine::DType::F16)
        .unwrap();
    let mut cache = engine.new_cache();
    let context: Vec<u32> = [case.preamble.as_slice(), &case.first].concat();
    engine.append(&mut cache, &context, 512, false).unwrap();
    engine.import(&mut cache, &chunk_cache).unwrap();
    match selection {
        // Blended in the question's pass, as a request's prefill does.
        Some(selection) => {
            let blend = Blend {
                tokens: &case.second,
                offset: context.len(),
                selection,
            };
            let (logits, recomputed) = engine
                .model()
                .forward_blended(&case.tail, &mut cache, &[blend], ReturnLogits::All)
                .unwrap();
            (logits.unwrap(), recomputed)
        }
        None => (logits(engine, &case.tail, &mut cache, ReturnLogits::All), 0),
    }
}

#[test]
fn blending_a_loaded_chunk_cache_brings_the_next_token_distribution_closer_to_full_computation() {
    let engine = dense_engine();
    let case = blend_case();
    let whole: Vec<u32> = [case.preamble.as_slice(), &case.first, &case.second].concat();
    let mut full_cache = engine.new_cache();
    engine.append(&mut full_cache, &whole, 512, false).unwrap();
    let full = logits(engine, &case.tail, &mut full_cache, ReturnLogits::All);

    let n = case.second.len();
    let (naive, none) = tail_logits_over_chunk_cache(engine, &case, None);
    assert_eq!(none, 0);
    let naive_kl = mean_kl(&full, &naive);
    assert!(
        naive_kl > 1e-3,
        "the naive cache should differ: KL {naive_kl}"
    );
    let share = n.div_ceil(5); // 20% of the chunk
    for selection in [
        Selection::Deviation(share),
        Selection::Leading(share),
        Selection::Query(share),
        Selection::QueryEarly(share),
    ] {
        let (blended, recomputed) = tail_logits_over_chunk_cache(engine, &case, Some(selection));
        assert_eq!(recomputed, share, "{selection:?}");
        let kl = mean_kl(&full, &blended);
        assert!(
            kl < naive_kl,
            "{selection:?}: KL {kl} is not below the naive cache's {naive_kl}"
        );
    }
    // Recomputing every token is full computation (up to the order of float sums).
    for selection in [
        Selection::Deviation(n),
        Selection::Leading(n),
        Selection::Query(n),
        Selection::QueryEarly(n),
    ] {
        let (all, recomputed) = tail_logits_over_chunk_cache(engine, &case, Some(selection));
        assert_eq!(recomputed, n);
        let diff = max_abs_diff(&all, &full);
        assert!(
            diff < LOGIT_TOLERANCE,
            "{selection:?}: max |Δlogit| = {diff}"
        );
    }
}

#[test]
fn the_question_probe_on_the_quantized_decode_weights_keeps_the_dense_probes_fidelity() {
    // The default engine keeps quantized decode weights and runs the question's probe on
    // them (on CPUs with the VNNI kernels); the dense engine probes on the f32 weights. Both blend on the same f32 weights, so
    // only the choice of tokens can differ, and it must keep what the dense choice keeps.
    let case = blend_case();
    let whole: Vec<u32> = [case.preamble.as_slice(), &case.first, &case.second].concat();
    let mut full_cache = dense_engine().new_cache();
    dense_engine()
        .append(&mut full_cache, &whole, 512, false)
        .unwrap();
    let full = logits(
        dense_engine(),
        &case.tail,
        &mut full_cache,
        ReturnLogits::All,
    );
    let (naive, _) = tail_logits_over_chunk_cache(dense_engine(), &case, None);
    let naive_kl = mean_kl(&full, &naive);
    let share = case.second.len().div_ceil(5);
    for selection in [Selection::Query(share), Selection::QueryEarly(share)] {
        let (dense, _) = tail_logits_over_chunk_cache(dense_engine(), &case, Some(selection));
        let (quantized, recomputed) =
            tail_logits_over_chunk_cache(engine(), &case, Some(selection));
        assert_eq!(recomputed, share, "{selection:?}");
        let (dense_kl, quantized_kl) = (mean_kl(&full, &dense), mean_kl(&full, &quantized));
        assert!(
            quantized_kl < naive_kl && quantized_kl <= 1.25 * dense_kl + 1e-4,
            "{selection:?}: KL {quantized_kl} with the quantized probe, {dense_kl} with \
             the dense one, {naive_kl} naive"
        );
    }
}

#[test]
fn blending_in_the_tail_pass_equals_blending_chunk_by_chunk_then_the_tail() {
    // Two loaded chunk caches blended with the tail in one pass over the weights give the
    // logits of recomputing each chunk's selection in turn, then computing the tail.
    let engine = dense_engine();
    let case = blend_case();
    let filled = || two_chunk_caches(engine, &case);
    let offsets = case.chunk_offsets();
    for rule in [
        Selection::Deviation as fn(usize) -> Selection,
        Selection::Leading,
    ] {
        let mut fused = filled();
        let blends: Vec<Blend> = [&case.first, &case.second]
            .iter()
            .zip(offsets)
            .map(|(tokens, offset)| Blend {
                tokens,
                offset,
                selection: rule(tokens.len() / 5),
            })
            .collect();
        let (fused_logits, recomputed) = engine
            .model()
            .forward_blended(&case.tail, &mut fused, &blends, ReturnLogits::All)
            .unwrap();
        let mut stepwise = filled();
        let mut expected = 0;
        for blend in &blends {
            expected += engine
                .model()
                .recompute(blend.tokens, &mut stepwise, blend.offset, blend.selection)
                .unwrap();
        }
        let stepwise_logits = logits(engine, &case.tail, &mut stepwise, ReturnLogits::All);
        assert_eq!(recomputed, expected);
        assert_eq!(fused.len(), stepwise.len());
        let diff = max_abs_diff(&fused_logits.unwrap(), &stepwise_logits);
        assert!(
            diff < LOGIT_TOLERANCE,
            "{:?}: max |Δlogit| = {diff}",
            blends[0].selection
        );
    }
}

/// The preamble, then both chunks of `case` loaded from caches computed after the preamble
/// alone.
fn two_chunk_caches(engine: &Engine, case: &BlendCase) -> KvCache {
    let mut alone = engine.new_cache();
    let mut cache = engine.new_cache();
    engine
        .append(&mut cache, &case.preamble, 512, false)
        .unwrap();
    for chunk in [&case.first, &case.second] {
        alone.truncate(0);
        engine
            .append(&mut alone, &case.preamble, 512, false)
            .unwrap();
        engine.append(&mut alone, chunk, 512, false).unwrap();
        let kv = alone.export(case.preamble.len()..alone.len()).unwrap();
        engine.import(&mut cache, &kv).unwrap();
    }
    cache
}

#[test]
fn question_aware_selection_pools_the_budget_across_chunks_and_needs_the_question() {
    let engine = dense_engine();
    let case = blend_case();
    let offsets = case.chunk_offsets();
    let k = case.second.len() / 5;
    let blended = |budgets: [usize; 2]| {
        let mut cache = two_chunk_caches(engine, &case);
        let blends: Vec<Blend> = [&case.first, &case.second]
            .iter()
            .zip(offsets)
            .zip(budgets)
            .map(|((tokens, offset), n)| Blend {
                tokens,
                offset,
                selection: Selection::Query(n),
            })
            .collect();
        let (logits, recomputed) = engine
            .model()
            .forward_blended(&case.tail, &mut cache, &blends, ReturnLogits::All)
            .unwrap();
        (logits.unwrap(), recomputed)
    };
    // One pool of 2k tokens over both chunks, however the budget is split between them.
    let (even, recomputed) = blended([k, k]);
    assert_eq!(recomputed, 2 * k);
    let (lopsided, recomputed) = blended([0, 2 * k]);
    assert_eq!(recomputed, 2 * k);
    assert_eq!(max_abs_diff(&even, &lopsided), 0.0);

    // Without the question there is nothing to select by: a typed error, nothing written.
    let mut cache = two_chunk_caches(engine, &case);
    let before = cache.export(0..cache.len()).unwrap();
    let result =
        engine
            .model()
            .recompute(&case.second, &mut cache, offsets[1], Selection::Query(k));
    assert!(
        matches!(result, Err(EngineError::InvalidSetting(_))),
        "{result:?}"
    );
    let after = cache.export(0..cache.len()).unwrap();
    for ((k0, v0), (k1, v1)) in before.layers().iter().zip(after.layers()) {
        assert_eq!(max_abs_diff(k0, k1), 0.0);
        assert_eq!(max_abs_diff(v0, v1), 0.0);
    }
}

#[test]
fn recomputing_tokens_outside_the_cache_is_a_typed_error_and_changes_nothing() {
    let engine = dense_engine();
    let tokens = prose_tokens(40);
    let mut cache = engine.new_cache();
    engine.prefill(&mut cache, &tokens, 64).unwrap();
    let before = cache.export(0..40).unwrap();
    let result = engine
        .model()
        .recompute(&tokens[..20], &mut cache, 30, Selection::Leading(5));
    assert!(
        matches!(result, Err(EngineError::KvMismatch(_))),
        "{result:?}"
    );
    let after = cache.export(0..40).unwrap();
    for ((k0, v0), (k1, v1)) in before.layers().iter().zip(after.layers()) {
        assert_eq!(max_abs_diff(k0, k1), 0.0);
        assert_eq!(max_abs_diff(v0, v1), 0.0);
    }
}

#[test]
fn a_batched_decode_step_gives_each_sequence_the_greedy_tokens_it_gets_alone() {
    // Three sequences of different lengths, decoded 8 steps alone and then as one batch
    // per step, on the quantized decode path that serves answers. Every row of a batch goes
    // through the same operations as alone, so the logits are the same bits.
    let engine = engine();
    let prose = prose_tokens(120);
    let prompts = [&prose[..13], &prose[..57], &prose[40..120]];
    let prefilled = || -> Vec<(KvCache, u32)> {
        prompts
            .iter()
            .map(|prompt| {
                let mut cache = engine.new_cache();
                let last = logits(engine, prompt, &mut cache, ReturnLogits::Last);
                (cache, argmax(&last))
            })
            .collect()
    };
    const STEPS: usize = 8;
    let mut alone = Vec::new();
    for (mut cache, mut token) in prefilled() {
        let mut steps = Vec::new();
        for _ in 0..STEPS {
            let next = engine.model().decode(&[token], &mut cache).unwrap();
            steps.push(next.clone());
            token = argmax(&next);
        }
        alone.push(steps);
    }
    let (mut caches, mut tokens): (Vec<KvCache>, Vec<u32>) = prefilled().into_iter().unzip();
    for step in 0..STEPS {
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let batch = engine.model().decode_batch(&tokens, &mut refs).unwrap();
        for (i, (token, steps)) in tokens.iter_mut().zip(&alone).enumerate() {
            let row = batch.get(i).unwrap();
            let diff = max_abs_diff(&row, &steps[step]);
            assert_eq!(
                diff, 0.0,
                "sequence {i}, step {step}: max |Δlogit| = {diff}"
            );
            *token = argmax(&row);
            assert_eq!(*token, argmax(&steps[step]), "sequence {i}, step {step}");
        }
    }
    for (cache, prompt) in caches.iter().zip(prompts) {
        assert_eq!(cache.len(), prompt.len() + STEPS);
    }
}

#[test]
fn a_decode_batch_that_cannot_run_is_a_typed_error_and_changes_no_cache() {
    let engine = engine();
    let tokens = prose_tokens(20);
    let mut a = engine.new_cache();
    let mut b = engine.new_cache();
    engine.prefill(&mut a, &tokens[..10], 64).unwrap();
    engine.prefill(&mut b, &tokens[..20], 64).unwrap();
    let mut caches = [&mut a, &mut b];
    let too_few = engine.model().decode_batch(&[1], &mut caches);
    assert!(
        matches!(too_few, Err(EngineError::KvMismatch(_))),
        "{too_few:?}"
    );
    let vocab = engine.config().vocab_size as u32;
    let out_of_range = engine.model().decode_batch(&[1, vocab], &mut caches);
    assert!(
        matches!(out_of_range, Err(EngineError::TokenOutOfRange { .. })),
        "{out_of_range:?}"
    );
    assert_eq!((a.len(), b.len()), (10, 20));
}
