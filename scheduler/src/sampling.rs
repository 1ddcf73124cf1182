//! How a decoding sequence picks its tokens and when it ends: sampling settings, the
//! sampler over a logits row, and the reasons a generation ends.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SchedulerError};

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

    /// Refuses a temperature below 0 or not finite, and a `top_p` outside (0, 1].
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(SchedulerError::InvalidSetting(format!(
                "temperature {} must be a finite number ≥ 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SchedulerError::InvalidSetting(format!(
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

    /// Picks the next token from one row of logits (the vocabulary's scores); an empty
    /// row is an error.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(SchedulerError::EmptyInput);
        }
        Ok(self.pick(logits))
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_the_largest_logit() {
        let mut s = Sampler::new(Sampling::greedy()).unwrap();
        assert_eq!(s.pick(&[0.1, 3.0, -1.0, 2.9]), 1);
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
            (0..20).map(|_| sampler.pick(&logits)).collect::<Vec<_>>()
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
            assert_eq!(s.pick(&[0.0, 5.0, 4.9]), 1);
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
            assert!(
                matches!(r, Err(SchedulerError::InvalidSetting(_))),
                "{t} {p}"
            );
        }
    }
}
