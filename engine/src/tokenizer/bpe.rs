//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) on the `tokenizers` crate.
//!
//! The pre-tokenizer (how text is split before BPE) is chosen from `tokenizer.ggml.pre` the
//! same way llama.cpp chooses it, so the same text gives the same ids.

use std::collections::HashMap;

use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer};

use super::{TokenIds, TokenKind, spm};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

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

/// The BPE model over the vocabulary `token_to_id` and the file's merges, and whether
/// prompts start with BOS when the file does not say (llama 3 style vocabularies do).
pub(super) fn build(gguf: &GgufFile, token_to_id: &TokenIds) -> Result<(HfTokenizer, bool)> {
    let pre = gguf.opt_string("tokenizer.ggml.pre").unwrap_or("default");
    let (regexes, ignore_merges) = pre_tokenizer_regexes(pre)
        .ok_or_else(|| EngineError::UnsupportedFeature(format!("pre-tokenizer {pre:?}")))?;
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
    Ok((hf, ignore_merges))
}

/// Appends the ids of one text fragment to `out`.
pub(super) fn encode(hf: &HfTokenizer, text: &str, out: &mut Vec<u32>) -> Result<()> {
    let encoding = hf
        .encode(text, false)
        .map_err(|e| EngineError::Tokenizer(e.to_string()))?;
    out.extend_from_slice(encoding.get_ids());
    Ok(())
}

/// The bytes each token stands for, as llama.cpp's `token_to_piece` gives them: ordinary
/// tokens through the byte-level table, the text itself for control, user-defined and
/// unknown tokens, one byte for `<0xNN>` byte tokens, nothing for unused ones.
pub(super) fn pieces(texts: &[String], kinds: &[TokenKind]) -> Vec<Vec<u8>> {
    let byte_of = unicode_to_byte();
    texts
        .iter()
        .zip(kinds)
        .map(|(t, kind)| match (kind, spm::byte_of(t)) {
            (TokenKind::Byte, Some(b)) => vec![b],
            (TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown, _) => {
                t.as_bytes().to_vec()
            }
            (TokenKind::Unused, _) => Vec::new(),
            (TokenKind::Normal | TokenKind::Byte, _) => t
                .chars()
                .map(|c| byte_of.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .unwrap_or_else(|| t.as_bytes().to_vec()),
        })
        .collect()
}
