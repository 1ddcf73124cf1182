//! Token sampling and the decode loop.

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::kv::KvCache;
use crate::models::Transformer;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// How the next token is picked from the logits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy); higher flattens the distribution.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f64,
    /// Seed of the random generator, so a sampled answer can be reproduced.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Self::greedy()
    }
}

impl Sampling {
    /// Always the most likely token.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(EngineError::InvalidSetting(format!(
                "temperature {} must be a finite number ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::InvalidSetting(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        Ok(())
    }
}

/// Picks tokens from logits according to a [`Sampling`] setting.
#[derive(Debug)]
pub struct Sampler {
    sampling: Sampling,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `sampling.seed`.
    pub fn new(sampling: Sampling) -> Result<Self> {
        sampling.validate()?;
        let rng = StdRng::seed_from_u64(sampling.seed);
        Ok(Self { sampling, rng })
    }

    /// Picks the next token from a `[vocab]` logits tensor.
    pub fn sample(&mut self, logits: &Tensor) -> Result<u32> {
        let logits: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        if logits.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        Ok(self.sample_slice(&logits))
    }

    fn sample_slice(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &l)| {
                    if l > best.1 { (i, l) } else { best }
                })
                .0 as u32
        };
        if self.sampling.temperature == 0.0 {
            return argmax();
        }
        let t = self.sampling.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .filter(|(_, p)| *p > 0.0)
            .collect();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total: f32 = probs.iter().map(|p| p.1).sum();
        // Keep the smallest prefix reaching top_p of the mass (at least one token).
        let target = self.sampling.top_p as f32 * total;
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, (_, p)) in probs.iter().enumerate() {
            kept += p;
            if kept >= target {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut.max(1));
        let mut r = self.rng.random::<f32>() * kept.min(total);
        for (id, p) in &probs {
            if r < *p {
                return *id;
            }
            r -= p;
        }
        probs.last().map(|p| p.0).unwrap_or_else(argmax)
    }
}

/// Settings of one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateParams {
    /// Upper bound on generated tokens.
    pub max_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Extra token ids that end generation, besides the model's own end-of-generation tokens.
    pub stop_tokens: Vec<u32>,
    /// Keep generating past the model's end-of-generation tokens (up to `max_tokens`): for
    /// benchmarks that need every contender to produce the same number of tokens.
    #[serde(default)]
    pub ignore_eos: bool,
}

impl GenerateParams {
    /// Whether `token` ends the generation; `end_of_generation` says whether the model
    /// treats it as its own end token.
    pub fn stops_at(&self, token: u32, end_of_generation: bool) -> bool {
        (end_of_generation && !self.ignore_eos) || self.stop_tokens.contains(&token)
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            sampling: Sampling::greedy(),
            stop_tokens: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token was produced.
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The model's context window is full.
    ContextFull,
    /// The streaming callback asked to stop.
    Cancelled,
}

/// What a generation produced.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// Generated token ids (the stop token excluded).
    pub tokens: Vec<u32>,
    /// Their text.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time spent decoding (after the first token).
    pub decode_time: Duration,
}

/// Generates from `first_logits` (the logits after the prompt, already in `cache`): samples a
/// token, feeds it back, and so on. `on_text` receives each piece of text as it becomes
/// complete and can stop generation by returning `ControlFlow::Break`.
pub fn generate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    cache: &mut KvCache,
    first_logits: &Tensor,
    params: &GenerateParams,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Generation> {
    let mut sampler = Sampler::new(params.sampling.clone())?;
    let mut decoder = StreamDecoder::new();
    let mut tokens = Vec::new();
    let mut text = String::new();
    let started = Instant::now();
    let mut logits = first_logits.clone();
    let context = model.config().context_length;
    let finish_reason = loop {
        if tokens.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        let next = sampler.sample(&logits)?;
        if params.stops_at(next, tokenizer.is_end_of_generation(next)) {
            break FinishReason::Stop;
        }
        tokens.push(next);
        let piece = decoder.push(tokenizer, next);
        if !piece.is_empty() {
            text += &piece;
            if on_text(&piece).is_break() {
                break FinishReason::Cancelled;
            }
        }
        if tokens.len() >= params.max_tokens {
            break FinishReason::Length;
        }
        if cache.next_position() >= context {
            break FinishReason::ContextFull;
        }
        logits = model.decode(&[next], cache)?;
    };
    let rest = decoder.finish();
    if !rest.is_empty() {
        text += &rest;
        // The caller has asked to stop already when cancelled; otherwise it gets the tail.
        if finish_reason != FinishReason::Cancelled {
            let _ = on_text(&rest);
        }
    }
    Ok(Generation {
        tokens,
        text,
        finish_reason,
        decode_time: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(Sampling::greedy()).unwrap();
        assert_eq!(s.sample_slice(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn same_seed_gives_same_samples() {
        let sampling = Sampling {
            temperature: 1.0,
            top_p: 0.95,
            seed: 7,
        };
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |s: Sampling| {
            let mut sampler = Sampler::new(s).unwrap();
            (0..20)
                .map(|_| sampler.sample_slice(&logits))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(sampling.clone()), draw(sampling.clone()));
        assert_ne!(
            draw(sampling.clone()),
            draw(Sampling {
                seed: 8,
                ..sampling
            })
        );
    }

    #[test]
    fn tiny_top_p_keeps_only_the_most_likely_token() {
        let mut s = Sampler::new(Sampling {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 1,
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample_slice(&[0.0, 5.0, 4.9]), 1);
        }
    }

    #[test]
    fn invalid_settings_are_rejected() {
        for (t, p) in [(-1.0, 1.0), (f64::NAN, 1.0), (1.0, 0.0), (1.0, 1.5)] {
            let r = Sampler::new(Sampling {
                temperature: t,
                top_p: p,
                seed: 0,
            });
            assert!(matches!(r, Err(EngineError::InvalidSetting(_))), "{t} {p}");
        }
    }
}
