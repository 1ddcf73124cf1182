//! A tokenizer built from a GGUF file's own vocabulary, scores or merges, and token types.
//!
//! Two vocabulary models are supported, each encoded as llama.cpp encodes it so the same
//! text gives the same ids: byte-level BPE (`tokenizer.ggml.model = "gpt2"`: SmolLM2,
//! Llama 3, Qwen) and SentencePiece (`"llama"`: Llama 2, Mistral, Gemma). Before either
//! runs, special tokens are cut out of the text, and end-of-generation tokens are found,
//! by llama.cpp's rules for both.

mod bpe;
mod special;
mod spm;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::Tokenizer as HfTokenizer;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use special::{Fragment, SpecialTokens};
use spm::Spm;

/// What a piece of a prompt follows, for the SentencePiece space prefix: a vocabulary with
/// `add_space_prefix` adds it at the prompt's start and after a special token, never after
/// ordinary text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follows {
    /// Nothing: the piece opens the prompt.
    Start,
    /// A special token.
    Special,
    /// Ordinary text.
    Text,
}

/// How a vocabulary entry behaves, from `tokenizer.ggml.token_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Ordinary text.
    Normal,
    /// The unknown-token placeholder.
    Unknown,
    /// A control token (`<|im_start|>`, `</s>`): never produced from plain text.
    Control,
    /// A user-defined token: always matched as a whole in text.
    UserDefined,
    /// An unused slot, or one whose type the file leaves undefined: it decodes to nothing.
    Unused,
    /// A raw byte (`<0x0A>`).
    Byte,
}

impl TokenKind {
    fn from_gguf(v: i32) -> Self {
        match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            6 => Self::Byte,
            // 5 is unused; 0 (undefined) and unknown values behave the same in llama.cpp:
            // not special, and decoded to nothing.
            _ => Self::Unused,
        }
    }
}

/// Vocabulary entries by text.
type TokenIds = HashMap<String, u32>;

/// The vocabulary's own algorithm, run on the text between special tokens.
enum Model {
    Bpe(Box<HfTokenizer>),
    Spm(Spm),
}

/// A GGUF model's tokenizer: text to token ids and back.
pub struct Tokenizer {
    model: Model,
    kinds: Vec<TokenKind>,
    /// The bytes each token stands for (control tokens: their text).
    pieces: Vec<Vec<u8>>,
    specials: SpecialTokens,
    token_to_id: TokenIds,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_eos: bool,
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let model = match self.model {
            Model::Bpe(_) => "bpe",
            Model::Spm(_) => "spm",
        };
        f.debug_struct("Tokenizer")
            .field("model", &model)
            .field("vocab_size", &self.kinds.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

/// The vocabulary models this tokenizer implements, by `tokenizer.ggml.model`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ModelType {
    Bpe,
    Spm,
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model_type = match gguf.string("tokenizer.ggml.model")? {
            "gpt2" => ModelType::Bpe,
            "llama" => ModelType::Spm,
            other => {
                return Err(EngineError::UnsupportedFeature(format!(
                    "tokenizer model {other:?} (supported: gpt2 byte-level BPE, llama \
                     SentencePiece)"
                )));
            }
        };
        let texts = read_tokens(gguf)?;
        let n = texts.len();
        if n == 0 {
            return Err(EngineError::Tokenizer(
                "tokenizer.ggml.tokens is empty: a vocabulary of no tokens".into(),
            ));
        }
        let mut kinds = read_kinds(gguf, n)?;
        let mut token_to_id = TokenIds::with_capacity(n);
        for (id, t) in texts.iter().enumerate() {
            // llama.cpp refuses a vocabulary with a repeated entry; the first one is kept.
            token_to_id.entry(t.clone()).or_insert(id as u32);
        }

        let in_range = |id: usize| (id < n).then_some(id as u32);
        let declared = |key: &str| gguf.opt_usize(key).and_then(in_range);
        // llama.cpp's defaults for SentencePiece vocabularies, used when a key is absent
        // (or out of range): Llama's own ids.
        let default = |id: usize| match model_type {
            ModelType::Spm => in_range(id),
            ModelType::Bpe => None,
        };
        let bos = declared("tokenizer.ggml.bos_token_id").or_else(|| default(1));
        let eos = declared("tokenizer.ggml.eos_token_id").or_else(|| default(2));
        let unknown = declared("tokenizer.ggml.unknown_token_id").or_else(|| default(0));
        let end_of_generation =
            special::apply_text_rules(&texts, &mut kinds, &token_to_id, declared, eos);

        // llama.cpp's per-model attributes: for Phi-3 every special token but a few drops
        // the whitespace after it.
        let name = gguf.opt_string("general.name").unwrap_or("").to_lowercase();
        let phi3 = name.contains("phi-3") || name.contains("phi3");
        let strip = |id: u32| {
            let keeps = matches!(
                texts[id as usize].as_str(),
                "<unk>" | "<s>" | "<|endoftext|>"
            );
            (false, phi3 && !keeps)
        };
        let specials = SpecialTokens::new(&texts, &kinds, strip)?;

        let add_eos = gguf
            .opt_bool("tokenizer.ggml.add_eos_token")
            .unwrap_or(false);
        let (model, pieces, add_bos) = match model_type {
            ModelType::Bpe => {
                let (hf, ignore_merges) = bpe::build(gguf, &token_to_id)?;
                let add_bos = gguf
                    .opt_bool("tokenizer.ggml.add_bos_token")
                    .unwrap_or(ignore_merges);
                (
                    Model::Bpe(Box::new(hf)),
                    bpe::pieces(&texts, &kinds),
                    add_bos,
                )
            }
            ModelType::Spm => {
                let scores = read_scores(gguf, n)?;
                let add_space_prefix = gguf
                    .opt_bool("tokenizer.ggml.add_space_prefix")
                    .unwrap_or(true);
                let add_bos = gguf
                    .opt_bool("tokenizer.ggml.add_bos_token")
                    .unwrap_or(true);
                (
                    Model::Spm(Spm::new(scores, &token_to_id, unknown, add_space_prefix)),
                    spm::pieces(&texts, &kinds),
                    add_bos,
                )
            }
        };

        Ok(Self {
            model,
            kinds,
            pieces,
            specials,
            token_to_id,
            bos,
            eos,
            add_bos,
            add_eos,
            end_of_generation,
        })
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.kinds.len()
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts should start with the BOS token.
    pub fn add_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// Whether a whole sequence should end with the EOS token (`tokenizer.ggml.add_eos_token`,
    /// set for some embedding models; chat prompts never end with it).
    pub fn add_eos(&self) -> bool {
        self.add_eos && self.eos.is_some()
    }

    /// Tokens that end generation (EOS, end of turn, …).
    pub fn end_of_generation(&self) -> &[u32] {
        &self.end_of_generation
    }

    /// Whether `id` ends generation.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.end_of_generation.binary_search(&id).is_ok()
    }

    /// The id of a vocabulary entry given by its exact text (`"<|im_start|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }

    /// The kind of token `id`.
    pub fn kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Tokenizes `text` without adding BOS. With `parse_special`, control and unknown tokens
    /// written in the text (`<|im_start|>`) become their ids; without it they are tokenized as
    /// text. User-defined tokens are always matched whole.
    ///
    /// A SentencePiece vocabulary with `tokenizer.ggml.add_space_prefix` gets a space before
    /// the text and after every special token in it, as in llama.cpp; so pieces encoded one
    /// by one differ from the same pieces encoded joined.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        self.encode_after(Follows::Start, text, parse_special)
    }

    /// [`Tokenizer::encode`] of `text` where it stands in a prompt (`follows`). Pieces of one
    /// prompt encoded one by one this way get a SentencePiece space prefix only where the
    /// joined text would (at the start and after a special token), not at every piece.
    pub fn encode_after(
        &self,
        follows: Follows,
        text: &str,
        parse_special: bool,
    ) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 1);
        let mut after_special = follows != Follows::Text;
        for fragment in self.specials.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    ids.push(id);
                    after_special = true;
                }
                Fragment::Text(text) => {
                    match &self.model {
                        Model::Bpe(hf) => bpe::encode(hf, text, &mut ids)?,
                        Model::Spm(spm) => {
                            spm.encode(text, after_special, &self.token_to_id, &mut ids)?
                        }
                    }
                    after_special = false;
                }
            }
        }
        Ok(ids)
    }

    /// What text after the tokens `ids` follows: their last token's kind, or `empty` when
    /// there are none.
    pub fn after(&self, ids: &[u32], empty: Follows) -> Follows {
        match ids.last().map(|&id| self.kind(id)) {
            None => empty,
            Some(Some(TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown)) => {
                Follows::Special
            }
            Some(_) => Follows::Text,
        }
    }

    /// The bytes token `id` stands for; control tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Whether token `id` is left out of decoded text unless special tokens are asked for
    /// (control and unknown tokens, as in llama.cpp).
    pub(crate) fn is_hidden(&self, id: u32) -> bool {
        matches!(self.kind(id), Some(TokenKind::Control | TokenKind::Unknown))
    }

    /// Decodes ids to text. Control and unknown tokens are skipped unless `with_special`;
    /// invalid UTF-8 (a character cut between tokens) becomes U+FFFD. A SentencePiece
    /// vocabulary that adds a leading space when encoding loses one leading space of the
    /// first token's text here, as in llama.cpp (so `[BOS, "▁Hi"]` still decodes to `" Hi"`).
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        let strip_space = matches!(&self.model, Model::Spm(spm) if spm.add_space_prefix());
        let mut bytes = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if !with_special && self.is_hidden(id) {
                continue;
            }
            let Some(mut piece) = self.token_bytes(id) else {
                continue;
            };
            if i == 0 && strip_space {
                piece = piece.strip_prefix(b" ").unwrap_or(piece);
            }
            bytes.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Checks that every id is inside the vocabulary.
    pub fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&id| id as usize >= self.kinds.len()) {
            Some(&id) => Err(EngineError::TokenOutOfRange {
                id,
                vocab_size: self.kinds.len(),
            }),
            None => Ok(()),
        }
    }
}

fn metadata_error(key: &str, reason: impl std::fmt::Display) -> EngineError {
    EngineError::Metadata {
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// The vocabulary's texts. An empty entry is named `[EMPTY_<id>]`, as llama.cpp names it, so
/// that it cannot match empty text.
fn read_tokens(gguf: &GgufFile) -> Result<Vec<String>> {
    const KEY: &str = "tokenizer.ggml.tokens";
    gguf.array(KEY)?
        .iter()
        .enumerate()
        .map(|(id, v)| match v.to_string() {
            Ok(t) if t.is_empty() => Ok(format!("[EMPTY_{id}]")),
            Ok(t) => Ok(t.clone()),
            Err(e) => Err(metadata_error(KEY, e)),
        })
        .collect()
}

/// The token types. A file without them is read as llama.cpp reads it: every token is
/// ordinary text, except those its load-time rules recognise by text (the end-of-generation
/// tokens and the undeclared special roles, [`special::apply_text_rules`]); other control
/// tokens (`<s>`, `<|im_start|>`) and SentencePiece byte tokens are then encoded and decoded
/// as their literal text, as llama.cpp does, and a warning says so.
fn read_kinds(gguf: &GgufFile, n: usize) -> Result<Vec<TokenKind>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(value) = gguf.metadata(KEY) else {
        tracing::warn!(
            "the GGUF has no {KEY}: every token is read as text except the end-of-generation \
             ones (as llama.cpp reads it); control tokens in prompts are not recognised"
        );
        return Ok(vec![TokenKind::Normal; n]);
    };
    let Value::Array(types) = value else {
        return Err(metadata_error(KEY, "not an array"));
    };
    if types.len() < n {
        return Err(metadata_error(
            KEY,
            format!("{} token types for {n} tokens", types.len()),
        ));
    }
    types[..n]
        .iter()
        .map(|v| match v {
            Value::I32(t) => Ok(TokenKind::from_gguf(*t)),
            other => Err(metadata_error(
                KEY,
                format!("token type {other:?} is not an i32"),
            )),
        })
        .collect()
}

/// The SentencePiece scores (f32, or i32 in some old files); all 0 when absent, as in
/// llama.cpp.
fn read_scores(gguf: &GgufFile, n: usize) -> Result<Vec<f32>> {
    const KEY: &str = "tokenizer.ggml.scores";
    let Some(value) = gguf.metadata(KEY) else {
        return Ok(vec![0.0; n]);
    };
    let Value::Array(scores) = value else {
        return Err(metadata_error(KEY, "not an array"));
    };
    if scores.len() < n {
        return Err(metadata_error(
            KEY,
            format!("{} scores for {n} tokens", scores.len()),
        ));
    }
    scores[..n]
        .iter()
        .map(|v| match v {
            Value::F32(s) => Ok(*s),
            Value::I32(s) => Ok(*s as f32),
            other => Err(metadata_error(
                KEY,
                format!("score {other:?} is not an f32"),
            )),
        })
        .collect()
}

/// Turns generated token ids into text piece by piece, holding back bytes until they form
/// complete UTF-8 characters so a streamed answer never shows half a character.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// A decoder with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds token `id` and returns the text that became complete, possibly empty.
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        if tokenizer.is_hidden(id) {
            return String::new();
        }
        if let Some(piece) = tokenizer.token_bytes(id) {
            self.pending.extend_from_slice(piece);
        }
        let valid_up_to = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An incomplete character at the end waits for the next token; invalid bytes
            // elsewhere are emitted (as U+FFFD) so the stream never stalls.
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(),
        };
        let out = String::from_utf8_lossy(&self.pending[..valid_up_to]).into_owned();
        self.pending.drain(..valid_up_to);
        out
    }

    /// Whatever is still pending, flushed at the end of generation.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
