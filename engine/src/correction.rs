//! The attention correction for position-independent chunk caches (APE, arXiv 2502.05431).
//!
//! A chunk cache computed on its own never saw the chunks before it, and a question reading
//! several of them spreads its attention differently than over the same chunks computed in
//! one sequence. APE corrects this where the question and answer read the chunks, at no
//! recomputation cost: their attention scores over the chunks' keys are taken at a
//! temperature `T`, and the attention mass of those keys as a group is scaled by `S`, then
//! merged by log-sum-exp with the attention to the preamble and to the tail. With group
//! normalisers `Z_p`, `Z_c(T)` and `Z_t`, key `j` of a chunk gets the weight
//! `S · exp(s_j / T) / (Z_p + S · Z_c(T) + Z_t)` — the softmax of the scores `s_j / T + ln S`
//! over all keys, which is how the kernels apply it. `T = S = 1` is ordinary attention.
//!
//! Which keys count as the chunks': those of a loaded position-independent chunk cache
//! that still hold their loaded value at that layer. Tokens a blending rule recomputed in
//! context are ordinary keys from the layer they were recomputed at; queries are the
//! tokens after every chunk (the question tail and the answer), never the recomputed
//! chunk tokens, which reproduce full computation.
//!
//! `T` and `S` are properties of a model: `ragcake calibrate` chooses them by minimising
//! the KL divergence from full computation on a calibration split of labelled questions
//! and writes them, with the model's fingerprint, to a file the engine loads. The
//! calibrations of the models ragcake fetches by name ship with it ([`BUNDLED`]), so a
//! fresh installation corrects without calibrating first; a file `ragcake calibrate` wrote
//! takes precedence.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};
use crate::gguf::LlmFingerprint;

/// The temperature and mass scale of attention to position-independent chunk keys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionCorrection {
    /// Divides the attention scores of the chunk keys (below 1 sharpens).
    pub temperature: f32,
    /// Multiplies the chunk keys' total attention mass before normalisation.
    pub scale: f32,
}

impl Default for AttentionCorrection {
    fn default() -> Self {
        Self::IDENTITY
    }
}

impl AttentionCorrection {
    /// Ordinary attention.
    pub const IDENTITY: Self = Self {
        temperature: 1.0,
        scale: 1.0,
    };

    /// A correction; both factors must be finite and within 1/20 to 20.
    pub fn new(temperature: f32, scale: f32) -> Result<Self> {
        let correction = Self { temperature, scale };
        correction.validate()?;
        Ok(correction)
    }

    /// Checks both factors are finite and within 1/20 to 20.
    pub fn validate(&self) -> Result<()> {
        let fine = |x: f32| x.is_finite() && (0.05..=20.0).contains(&x);
        if fine(self.temperature) && fine(self.scale) {
            Ok(())
        } else {
            Err(EngineError::InvalidSetting(format!(
                "attention correction T = {}, S = {}: both must lie in [0.05, 20]",
                self.temperature, self.scale
            )))
        }
    }

    /// Whether this is ordinary attention.
    pub fn is_identity(&self) -> bool {
        self.temperature == 1.0 && self.scale == 1.0
    }

    /// The factor a chunk key's score is multiplied by.
    pub(crate) fn score_factor(&self) -> f32 {
        1.0 / self.temperature
    }

    /// The term added to a chunk key's score after the factor (`ln S`).
    pub(crate) fn score_offset(&self) -> f32 {
        self.scale.ln()
    }
}

/// The chunk keys of a cache that queries correct for, and the correction.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CorrectedKeys {
    pub correction: AttentionCorrection,
    /// Cache index of the first query that corrects: the token after the last chunk.
    pub queries_from: usize,
    /// Per layer, per cache index below `queries_from`: whether the key is a loaded chunk
    /// key there.
    pub layers: Vec<Vec<bool>>,
}

impl CorrectedKeys {
    /// The keys of `layer` a query at `queries_from` or later corrects for, with the factor
    /// and offset of their scores; `None` when there are none.
    pub fn layer(&self, layer: usize) -> Option<LayerCorrection<'_>> {
        let keys = self.layers.get(layer)?;
        keys.contains(&true).then_some(LayerCorrection {
            factor: self.correction.score_factor(),
            offset: self.correction.score_offset(),
            queries_from: self.queries_from,
            keys,
        })
    }
}

/// One layer's view of [`CorrectedKeys`], what the attention kernels read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerCorrection<'a> {
    /// Multiplies a corrected key's score.
    pub factor: f32,
    /// Added to a corrected key's score after the factor.
    pub offset: f32,
    /// Queries at this cache index or later correct.
    pub queries_from: usize,
    /// Whether the key at each cache index (below `queries_from`) is corrected.
    pub keys: &'a [bool],
}

impl LayerCorrection<'_> {
    /// Whether a query at cache index `row` corrects.
    pub fn applies_to(&self, row: usize) -> bool {
        row >= self.queries_from
    }

    /// Whether the key at cache index `key` is corrected.
    pub fn corrects(&self, key: usize) -> bool {
        self.keys.get(key).copied().unwrap_or(false)
    }
}

/// What `ragcake calibrate` found for one model, as written to its file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionCalibration {
    /// The model's fingerprint (hex): the file applies to that model only.
    pub fingerprint: String,
    /// The chosen correction.
    pub correction: AttentionCorrection,
    /// How the correction was chosen (rule, share, questions), for the record.
    pub method: String,
    /// Calibration questions it was chosen on.
    pub questions: usize,
    /// Mean teacher-forced KL divergence from full computation without the correction.
    pub kl_uncorrected: f64,
    /// The same with the chosen correction.
    pub kl_corrected: f64,
}

/// The calibrations that ship with ragcake, one per model it fetches by name (SmolLM2-135M
/// Instruct, Gemma 3 270M), as `ragcake calibrate` wrote them on the calibration part of
/// the demo questions (each file's `method` and `questions` say how).
pub const BUNDLED: &[&str] = &[
    include_str!("../calibrations/smollm2-135m-instruct.toml"),
    include_str!("../calibrations/gemma3-270m.toml"),
];

impl AttentionCalibration {
    /// The bundled calibration ([`BUNDLED`]) of `fingerprint`, if one ships.
    pub fn bundled(fingerprint: LlmFingerprint) -> Result<Option<Self>> {
        let hex = fingerprint.to_hex();
        for text in BUNDLED {
            let calibration = Self::parse(text, &"(bundled)")?;
            if calibration.fingerprint == hex {
                return Ok(Some(calibration));
            }
        }
        Ok(None)
    }

    /// Parses a calibration file's text and checks its correction is in range; `source`
    /// names where the text came from in an error.
    fn parse(text: &str, source: &dyn std::fmt::Display) -> Result<Self> {
        let calibration: Self =
            toml::from_str(text).map_err(|e| calibration_error(source, e.to_string()))?;
        calibration
            .correction
            .validate()
            .map_err(|e| calibration_error(source, e.to_string()))?;
        Ok(calibration)
    }

    /// The file of `fingerprint`'s calibration in `dir`.
    pub fn path(dir: &Path, fingerprint: LlmFingerprint) -> PathBuf {
        dir.join(format!("{}.toml", fingerprint.to_hex()))
    }

    /// Reads the calibration of `fingerprint` from `dir`: `None` when there is no file;
    /// an error when the file is unreadable, malformed, for another model or out of range.
    pub fn load(dir: &Path, fingerprint: LlmFingerprint) -> Result<Option<Self>> {
        let path = Self::path(dir, fingerprint);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(calibration_error(&path.display(), e.to_string())),
        };
        let calibration = Self::parse(&text, &path.display())?;
        if calibration.fingerprint != fingerprint.to_hex() {
            return Err(calibration_error(
                &path.display(),
                format!("written for model {}", calibration.fingerprint),
            ));
        }
        Ok(Some(calibration))
    }

    /// Writes this calibration to its file in `dir` (created if missing), replacing the
    /// file whole so a reader never sees half of it. Returns the file's path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf> {
        let fingerprint = LlmFingerprint::from_hex(&self.fingerprint)
            .ok_or_else(|| EngineError::InvalidSetting("a malformed fingerprint".into()))?;
        let path = Self::path(dir, fingerprint);
        let text = toml::to_string_pretty(self)
            .map_err(|e| calibration_error(&path.display(), e.to_string()))?;
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(dir)?;
            let temporary = path.with_extension("toml.partial");
            std::fs::write(&temporary, text)?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|e| calibration_error(&path.display(), e.to_string()))?;
        Ok(path)
    }
}

/// An error about the calibration from `source` (a file's path, or the bundled ones).
fn calibration_error(source: &dyn std::fmt::Display, message: String) -> EngineError {
    EngineError::InvalidSetting(format!("attention calibration {source}: {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_outside_the_range_are_refused() {
        assert!(AttentionCorrection::new(0.8, 0.9).is_ok());
        assert!(AttentionCorrection::new(0.0, 1.0).is_err());
        assert!(AttentionCorrection::new(1.0, f32::NAN).is_err());
        assert!(AttentionCorrection::new(1.0, 50.0).is_err());
        assert!(AttentionCorrection::IDENTITY.is_identity());
        assert_eq!(AttentionCorrection::IDENTITY.score_factor(), 1.0);
        assert_eq!(AttentionCorrection::IDENTITY.score_offset(), 0.0);
    }

    #[test]
    fn a_calibration_file_round_trips_and_is_refused_for_another_model() {
        let dir = std::env::temp_dir().join(format!("ragcake-calibration-{}", std::process::id()));
        let model = LlmFingerprint([7; 32]);
        let calibration = AttentionCalibration {
            fingerprint: model.to_hex(),
            correction: AttentionCorrection::new(0.85, 0.9).unwrap(),
            method: "test".into(),
            questions: 3,
            kl_uncorrected: 0.5,
            kl_corrected: 0.25,
        };
        let path = calibration.save(&dir).unwrap();
        assert_eq!(
            AttentionCalibration::load(&dir, model).unwrap(),
            Some(calibration)
        );
        assert_eq!(
            AttentionCalibration::load(&dir, LlmFingerprint([8; 32])).unwrap(),
            None
        );
        // A file renamed onto another model's name is refused, not applied.
        let other = LlmFingerprint([9; 32]);
        std::fs::copy(&path, AttentionCalibration::path(&dir, other)).unwrap();
        assert!(AttentionCalibration::load(&dir, other).is_err());
        std::fs::write(&path, "correction = 3").unwrap();
        assert!(AttentionCalibration::load(&dir, model).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn every_bundled_calibration_parses_is_in_range_and_names_one_model() {
        let mut models = std::collections::HashSet::new();
        for text in BUNDLED {
            let calibration: AttentionCalibration = toml::from_str(text).unwrap();
            calibration.correction.validate().unwrap();
            let model = LlmFingerprint::from_hex(&calibration.fingerprint).unwrap();
            assert!(
                models.insert(model),
                "two bundled calibrations for one model"
            );
            assert_eq!(
                AttentionCalibration::bundled(model).unwrap(),
                Some(calibration)
            );
        }
        assert_eq!(
            AttentionCalibration::bundled(LlmFingerprint([8; 32])).unwrap(),
            None
        );
    }
}
