//! A tokenizer built from a GGUF file's own vocabulary, merges and token types.
//!
//! GGUF llama-family models with a byte-level BPE vocabulary (`tokenizer.ggml.model = "gpt2"`)
//! are supported; the pre-tokenizer (how text is split before BPE) is chosen from
//! `tokenizer.ggml.pre` the same way the reference implementation (llama.cpp) chooses it, so
//! the same text gives the same ids.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

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
    /// An unused slot.
    Unused,
    /// A raw byte (`<0x0A>`).
    Byte,
}

impl TokenKind {
    fn from_gguf(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

/// Text splitting rules before BPE, by `tokenizer.ggml.pre` name.
fn pre_tokenizer_regexes(pre: &str) -> Option<(&'static [&'static str], bool)> {
    const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
    const LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    // (regexes, ignore_merges): the second says whether a word found whole in the vocabulary
    // is taken as is, without running merges (llama 3 style).
    Some(match pre {
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
            (&[r"\p{N}", GPT2], false)
        }
        "gpt-2" | "phi-2" | "mpt" | "olmo" | "jina-es" | "jina-de" | "jina-v2-es"
        | "jina-v2-de" => (&[GPT2], false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => (&[LLAMA3], true),
        "qwen2" | "stablelm2" => (&[QWEN2], false),
        "default" => (
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
        ),
        _ => return None,
    })
}

/// The GPT-2 byte-to-unicode table, inverted: the byte each vocabulary character stands for.
fn unicode_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut extra = 0u32;
    for b in 0u32..256 {
        let printable =
            (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
        let c = if printable {
            b
        } else {
            extra += 1;
            255 + extra
        };
        map.insert(char::from_u32(c).expect("valid scalar"), b as u8);
    }
    map
}

/// A GGUF model's tokenizer: text to token ids and back.
pub struct Tokenizer {
    bpe: HfTokenizer,
    kinds: Vec<TokenKind>,
    /// The bytes each token stands for (control tokens: their text).
    pieces: Vec<Vec<u8>>,
    /// Control and user-defined tokens, longest first, for splitting them out of text.
    specials: Vec<(String, u32, TokenKind)>,
    token_to_id: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    end_of_generation: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.kinds.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = gguf.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(EngineError::UnsupportedFeature(format!(
                "tokenizer model {model:?} (supported: gpt2 byte-level BPE)"
            )));
        }
        let pre = gguf.opt_string("tokenizer.ggml.pre").unwrap_or("default");
        let (regexes, ignore_merges) = pre_tokenizer_regexes(pre)
            .ok_or_else(|| EngineError::UnsupportedFeature(format!("pre-tokenizer {pre:?}")))?;
        let tokens: Vec<String> = gguf
            .array("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()
            .map_err(|e| EngineError::Tokenizer(format!("tokens: {e}")))?;
        let kinds: Vec<TokenKind> = match gguf.metadata("tokenizer.ggml.token_type") {
            Some(Value::Array(types)) => types
                .iter()
                .map(|v| TokenKind::from_gguf(v.to_i32().map(i64::from).unwrap_or(1)))
                .collect(),
            _ => vec![TokenKind::Normal; tokens.len()],
        };
        if kinds.len() != tokens.len() {
            return Err(EngineError::Tokenizer(format!(
                "{} token types for {} tokens",
                kinds.len(),
                tokens.len()
            )));
        }
        let merges: Vec<(String, String)> = gguf
            .array("tokenizer.ggml.merges")?
            .iter()
            .map(|v| {
                let s = v
                    .to_string()
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                s.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| EngineError::Tokenizer(format!("malformed merge {s:?}")))
            })
            .collect::<Result<_>>()?;

        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            token_to_id.entry(t.clone()).or_insert(id as u32);
        }
        let vocab: Vocab = token_to_id.iter().map(|(t, id)| (t.clone(), *id)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| EngineError::Tokenizer(format!("BPE: {e}")))?;
        let mut steps: Vec<PreTokenizerWrapper> = Vec::new();
        for re in regexes {
            let split = Split::new(
                SplitPattern::Regex(re.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| EngineError::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
            steps.push(split.into());
        }
        steps.push(ByteLevel::new(false, false, false).into());
        let mut hf = HfTokenizer::new(bpe);
        hf.with_pre_tokenizer(Some(Sequence::new(steps)));

        let byte_of = unicode_to_byte();
        let pieces = tokens
            .iter()
            .zip(&kinds)
            .map(|(t, kind)| match kind {
                TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown => {
                    t.as_bytes().to_vec()
                }
                _ => t
                    .chars()
                    .map(|c| byte_of.get(&c).copied())
                    .collect::<Option<Vec<u8>>>()
                    .unwrap_or_else(|| t.as_bytes().to_vec()),
            })
            .collect();
        let mut specials: Vec<(String, u32, TokenKind)> = tokens
            .iter()
            .zip(&kinds)
            .enumerate()
            .filter(|(_, (t, k))| {
                !t.is_empty() && matches!(k, TokenKind::Control | TokenKind::UserDefined)
            })
            .map(|(id, (t, k))| (t.clone(), id as u32, *k))
            .collect();
        specials.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let id_key = |key: &str| {
            gguf.opt_usize(key)
                .map(|v| v as u32)
                .filter(|&v| (v as usize) < tokens.len())
        };
        let bos = id_key("tokenizer.ggml.bos_token_id");
        let eos = id_key("tokenizer.ggml.eos_token_id");
        let add_bos = gguf
            .opt_bool("tokenizer.ggml.add_bos_token")
            .unwrap_or(ignore_merges);
        // End-of-generation tokens: the declared ones plus the conventional turn enders
        // (the reference implementation recognises them by text too).
        let mut end_of_generation: Vec<u32> = [
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        ]
        .iter()
        .filter_map(|k| id_key(k))
        .collect();
        for text in [
            "<|im_end|>",
            "<|eot_id|>",
            "<|endoftext|>",
            "<|end|>",
            "<end_of_turn>",
            "<|eom_id|>",
        ] {
            if let Some(&id) = token_to_id.get(text)
                && kinds[id as usize] == TokenKind::Control
            {
                end_of_generation.push(id);
            }
        }
        end_of_generation.sort_unstable();
        end_of_generation.dedup();

        Ok(Self {
            bpe: hf,
            kinds,
            pieces,
            specials,
            token_to_id,
            bos,
            eos,
            add_bos,
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

    /// Tokenizes `text` without adding BOS. With `parse_special`, control tokens written in
    /// the text (`<|im_start|>`) become their ids; without it they are tokenized as text.
    /// User-defined tokens are always matched whole.
    pub fn encode(&self, text: &str, parse_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            // The earliest special token in `rest` (the longest one at that place).
            let found = self
                .specials
                .iter()
                .filter(|(_, _, kind)| parse_special || *kind == TokenKind::UserDefined)
                .filter_map(|(t, id, _)| rest.find(t.as_str()).map(|at| (at, t.len(), *id)))
                .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
            let (plain, special) = match found {
                Some((at, len, id)) => (&rest[..at], Some((id, at + len))),
                None => (rest, None),
            };
            if !plain.is_empty() {
                let encoding = self
                    .bpe
                    .encode(plain, false)
                    .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            match special {
                Some((id, end)) => {
                    ids.push(id);
                    rest = &rest[end..];
                }
                None => break,
            }
        }
        Ok(ids)
    }

    /// The bytes token `id` stands for; control tokens give their text.
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// Decodes ids to text. Control tokens are skipped unless `with_special`; invalid UTF-8
    /// (a character cut between tokens) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32], with_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if !with_special && self.kind(id) == Some(TokenKind::Control) {
                continue;
            }
            if let Some(piece) = self.token_bytes(id) {
                bytes.extend_from_slice(piece);
            }
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
        if tokenizer.kind(id) == Some(TokenKind::Control) {
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
