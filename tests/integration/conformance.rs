//! The engine against the reference implementation, llama.cpp: prefill logits at every
//! position of several prompts, on tiny random-weight models of every family and weight type
//! and on both real models.
//!
//! The reference figures come from `scripts/conformance_fixtures.py` (llama.cpp through
//! llama-cpp-python, committed as `tests/fixtures/conformance/reference.json`; the tiny GGUF
//! files are written by the same script, deterministically, into `$RAGCAKE_HOME/conformance`
//! by the test script, and checked here against the sha256 the reference was computed on): per position llama.cpp's 64 highest logits and the log-sum-exp of
//! the whole row, computed with 512-token batches. The yardstick is llama.cpp against
//! itself: the same prompts in 8-token batches with flash attention, whose KL divergence,
//! top-1 agreement and largest logit difference the fixture stores as the model's spread.
//! The engine must stay within that spread (with the margin stated at [`KL_ALLOWED`]).
//! Greedy text is compared only on the tiny models, where near-ties are rare.

use std::path::{Path, PathBuf};

use ragcake::engine::{Engine, EngineConfig, ReturnLogits};
use serde::Deserialize;
use sha2::Digest;

use crate::common::{gemma3_path, model_path, repo_dir};

/// A model's mean KL divergence from llama.cpp may be at most this multiple of llama.cpp's
/// own spread between its two settings, plus [`KL_FLOOR`]: the engine keeps the KV cache and
/// activations in f32 where llama.cpp rounds keys and values to f16 and activations to 8
/// bits before quantized products, so its error is of the same kind and size as the
/// spread, not zero.
const KL_ALLOWED: f64 = 2.0;
/// Absolute slack on the mean KL: on models whose spread is ~0 (f32 weights) float
/// summation order alone differs by this much.
const KL_FLOOR: f64 = 1e-4;
/// Top-1 agreement may be at most this much below llama.cpp's own.
const TOP1_SLACK: f64 = 0.02;

#[derive(Debug, Deserialize)]
struct Reference {
    models: Vec<ModelReference>,
}

#[derive(Debug, Deserialize)]
struct ModelReference {
    name: String,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    sha256: Option<String>,
    #[serde(default)]
    real: Option<String>,
    prompts: Vec<PromptReference>,
    spread: Spread,
}

#[derive(Debug, Deserialize)]
struct PromptReference {
    tokens: Vec<u32>,
    /// Per position: llama.cpp's highest logits as `[id, logit]`, highest first.
    top: Vec<Vec<(u32, f64)>>,
    /// Per position: log-sum-exp of llama.cpp's whole row.
    logsumexp: Vec<f64>,
    /// Tiny models: llama.cpp's greedy continuation.
    #[serde(default)]
    greedy: Vec<u32>,
    /// Its top-1 margin (first logit minus second) at each step.
    #[serde(default)]
    greedy_margin: Vec<f64>,
}

#[derive(Debug, Deserialize)]
struct Spread {
    mean_kl: f64,
    top1_agreement: f64,
    max_abs_diff: f64,
}

fn reference() -> Reference {
    let path = fixtures().join("reference.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference.json parses")
}

/// A greedy step whose top-1 margin in llama.cpp is below this multiple of the model's
/// spread (the largest logit difference between llama.cpp's own two settings) is a
/// near-tie: llama.cpp's f16 KV cache and 8-bit activations alone can flip it, so the
/// comparison of greedy text ends there.
const NEAR_TIE_SPREADS: f64 = 2.0;
/// At least this many greedy tokens must be compared over all tiny models.
const MIN_GREEDY_COMPARED: usize = 300;

fn fixtures() -> PathBuf {
    repo_dir().join("tests/fixtures/conformance")
}

/// The engine's figures for one model against llama.cpp's.
#[derive(Debug, Default)]
struct Agreement {
    positions: usize,
    kl_sum: f64,
    top1: usize,
    max_abs_diff: f64,
}

impl Agreement {
    fn mean_kl(&self) -> f64 {
        self.kl_sum / self.positions as f64
    }

    fn top1_agreement(&self) -> f64 {
        self.top1 as f64 / self.positions as f64
    }

    /// One position: the engine's whole row against llama.cpp's top entries. KL(llama.cpp ‖
    /// engine) over those entries plus one bucket for the rest of the mass, the fixture
    /// script's formula for the spread.
    fn add(&mut self, ours: &[f32], top: &[(u32, f64)], reference_lse: f64) {
        let max = ours.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + ours
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let (mut kl, mut p_top, mut q_top) = (0.0, 0.0, 0.0);
        for &(id, logit) in top {
            let ours_logit = ours[id as usize] as f64;
            let (log_p, log_q) = (logit - reference_lse, ours_logit - lse);
            let p = log_p.exp();
            kl += p * (log_p - log_q);
            p_top += p;
            q_top += log_q.exp();
            self.max_abs_diff = self.max_abs_diff.max((ours_logit - logit).abs());
        }
        let (p_rest, q_rest) = ((1.0 - p_top).max(1e-12), (1.0 - q_top).max(1e-12));
        kl += p_rest * (p_rest.ln() - q_rest.ln());
        self.kl_sum += kl;
        let best = top
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|&(id, _)| id);
        let ours_best = ours
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i as u32);
        self.top1 += usize::from(best == ours_best);
        self.positions += 1;
    }

    /// The figures as a line when they lie outside llama.cpp's spread (with the stated
    /// margins); `None` when they are within it.
    fn outside_spread(&self, model: &ModelReference) -> Option<String> {
        let kl_limit = KL_ALLOWED * model.spread.mean_kl + KL_FLOOR;
        let top1_limit = model.spread.top1_agreement - TOP1_SLACK;
        let line = format!(
            "{}: {} positions, mean KL {:.2e} (llama.cpp's spread {:.2e}, allowed {:.2e}), top-1 \
             {:.3} (spread {:.3}, allowed ≥ {:.3}), max |Δ| {:.4} (spread {:.4})",
            model.name,
            self.positions,
            self.mean_kl(),
            model.spread.mean_kl,
            kl_limit,
            self.top1_agreement(),
            model.spread.top1_agreement,
            top1_limit,
            self.max_abs_diff,
            model.spread.max_abs_diff
        );
        eprintln!("conformance {line}");
        if self.mean_kl() <= kl_limit && self.top1_agreement() >= top1_limit {
            None
        } else {
            Some(line)
        }
    }
}

/// The engine's prefill logits of every prompt of `model` against llama.cpp's.
fn prefill_agreement(engine: &Engine, model: &ModelReference) -> Agreement {
    let mut agreement = Agreement::default();
    for prompt in &model.prompts {
        let mut cache = engine.new_cache();
        let logits = engine
            .model()
            .forward(&prompt.tokens, &mut cache, ReturnLogits::All)
            .unwrap()
            .unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        assert_eq!(
            rows.len(),
            prompt.top.len(),
            "{}: one row per position",
            model.name
        );
        for ((row, top), lse) in rows.iter().zip(&prompt.top).zip(&prompt.logsumexp) {
            agreement.add(row, top, *lse);
        }
    }
    agreement
}

/// Where the test script writes the tiny models (`RAGCAKE_CONFORMANCE_MODELS` overrides it).
fn tiny_model_dir() -> PathBuf {
    match std::env::var_os("RAGCAKE_CONFORMANCE_MODELS") {
        Some(dir) => dir.into(),
        None => ragcake::model_cache::ragcake_home().join("conformance"),
    }
}

/// The tiny models with their reference, each file checked to be the one the reference was
/// computed on.
fn tiny_models() -> Vec<(ModelReference, PathBuf)> {
    let dir = tiny_model_dir();
    reference()
        .models
        .into_iter()
        .filter(|m| m.real.is_none())
        .map(|m| {
            let path = dir.join(m.file.as_deref().expect("a tiny model names its file"));
            let bytes = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (the test script writes the tiny models: scripts/conformance_fixtures.py --gguf-only)",
                    path.display()
                )
            });
            let digest: String = sha2::Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            assert_eq!(
                Some(digest.as_str()),
                m.sha256.as_deref(),
                "{} is not the file the reference was computed on",
                path.display()
            );
            (m, path)
        })
        .collect()
}

fn load(path: &Path, quantized_decode: bool) -> Engine {
    let config = EngineConfig {
        quantized_decode,
        ..EngineConfig::default()
    };
    Engine::load(path, &config).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_family_and_weight_type_matches_llama_cpp_within_its_own_batch_spread() {
    let models = tiny_models();
    let families: std::collections::BTreeSet<String> = models
        .iter()
        .map(|(_, path)| load(path, false).config().family.clone())
        .collect();
    assert_eq!(
        families.into_iter().collect::<Vec<_>>(),
        ["gemma3", "llama", "phi3", "qwen2", "qwen3"],
        "a tiny model for every family"
    );
    let failures: Vec<String> = models
        .iter()
        .filter_map(|(model, path)| {
            prefill_agreement(&load(path, false), model).outside_spread(model)
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn tiny_models_continue_greedily_as_llama_cpp_does_up_to_a_near_tie() {
    let mut failures = Vec::new();
    let mut compared = 0;
    for (model, path) in tiny_models() {
        // Decode steps on the dense weights: the function prefill computes. (The default
        // quantized decode adds its own 8-bit rounding, checked against dense decode in the
        // engine tests.)
        let engine = load(&path, false);
        let near_tie = NEAR_TIE_SPREADS * model.spread.max_abs_diff;
        for prompt in model.prompts.iter().filter(|p| !p.greedy.is_empty()) {
            // llama.cpp's continuation is compared up to and including its first near-tie.
            let decided = prompt
                .greedy_margin
                .iter()
                .position(|&m| m < near_tie)
                .map_or(prompt.greedy.len(), |i| i + 1);
            let mut cache = engine.new_cache();
            let mut logits = engine
                .model()
                .forward(&prompt.tokens, &mut cache, ReturnLogits::Last)
                .unwrap()
                .unwrap();
            let mut ours = Vec::new();
            for &expected in &prompt.greedy[..decided] {
                let next = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                ours.push(next);
                // Feed llama.cpp's token: a difference at a near-tie must not hide later ones.
                logits = engine.model().decode(&[expected], &mut cache).unwrap();
            }
            compared += decided;
            // Only the last compared step may be a near-tie; the others must agree.
            let must_agree = if decided < prompt.greedy.len() {
                decided - 1
            } else {
                decided
            };
            if ours[..must_agree] != prompt.greedy[..must_agree] {
                failures.push(format!(
                    "{} (near-tie below {near_tie:.3}): llama.cpp {:?}\n  ragcake   {:?}",
                    model.name,
                    &prompt.greedy[..must_agree],
                    &ours[..must_agree]
                ));
            }
        }
    }
    eprintln!("conformance greedy: {compared} tokens compared");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    assert!(
        compared >= MIN_GREEDY_COMPARED,
        "only {compared} greedy tokens compared"
    );
}

/// The real model `name` of the fixture against llama.cpp.
fn check_real_model(name: &str, path: PathBuf) {
    let model = reference()
        .models
        .into_iter()
        .find(|m| m.real.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no reference for {name}"));
    let engine = load(&path, true);
    if let Some(line) = prefill_agreement(&engine, &model).outside_spread(&model) {
        panic!("outside llama.cpp's spread: {line}");
    }
}

#[test]
fn smollm2_prefill_logits_match_llama_cpp_within_its_own_batch_spread() {
    check_real_model("smollm2", model_path());
}

#[test]
fn gemma3_270m_prefill_logits_match_llama_cpp_within_its_own_batch_spread() {
    check_real_model("gemma3-270m", gemma3_path());
}
