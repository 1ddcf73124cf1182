//! Special tokens as llama.cpp treats them: which tokens are cut out of the text before the
//! vocabulary's own algorithm runs, and which tokens end generation.
//!
//! Both follow llama.cpp (`src/llama-vocab.cpp`) rather than the converter's intent, because
//! the same text must give the same ids as the reference implementation: it recognises some
//! roles by token text whatever the file declares, and cuts special tokens out longest first
//! over the whole text, not leftmost first.

use std::collections::BTreeMap;

use aho_corasick::AhoCorasick;

use super::{TokenIds, TokenKind};
use crate::error::{EngineError, Result};

/// Token texts that end generation wherever they appear in a vocabulary; llama.cpp also makes
/// each of them a control token when the file did not.
const END_OF_GENERATION: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
    "[e~[",
];

/// A role llama.cpp looks for by token text when the file does not give its id.
struct Role {
    /// The metadata keys that declare the role's id, the current one first.
    keys: &'static [&'static str],
    /// Texts that identify the role's token.
    texts: &'static [&'static str],
    /// Whether the role's token ends generation.
    ends_generation: bool,
}

/// The roles in the order llama.cpp assigns them (the order matters only for the log there;
/// here every role is independent).
const ROLES: &[Role] = &[
    Role {
        keys: &["tokenizer.ggml.eot_token_id"],
        texts: &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<\u{ff5c}end\u{2581}of\u{2581}sentence\u{ff5c}>",
            "<end_of_utterance>",
        ],
        ends_generation: true,
    },
    Role {
        keys: &["tokenizer.ggml.eom_token_id"],
        texts: &["<|eom_id|>"],
        ends_generation: true,
    },
    Role {
        keys: &[
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
        ],
        texts: &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<\u{ff5c}fim\u{2581}begin\u{ff5c}>",
            "<PRE>",
            "\u{2581}<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
        ends_generation: false,
    },
    Role {
        keys: &[
            "tokenizer.ggml.fim_suf_token_id",
            "tokenizer.ggml.suffix_token_id",
        ],
        texts: &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<\u{ff5c}fim\u{2581}hole\u{ff5c}>",
            "<SUF>",
            "\u{2581}<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
        ends_generation: false,
    },
    Role {
        keys: &[
            "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.middle_token_id",
        ],
        texts: &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<\u{ff5c}fim\u{2581}end\u{ff5c}>",
            "<MID>",
            "\u{2581}<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
        ends_generation: false,
    },
    Role {
        keys: &["tokenizer.ggml.fim_pad_token_id"],
        texts: &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
        ends_generation: true,
    },
    Role {
        keys: &["tokenizer.ggml.fim_rep_token_id"],
        texts: &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
        ends_generation: true,
    },
    Role {
        keys: &["tokenizer.ggml.fim_sep_token_id"],
        texts: &["<|file_sep|>"],
        ends_generation: true,
    },
];

/// Applies llama.cpp's load-time rules by token text to `kinds` and returns the tokens that
/// end generation, sorted.
///
/// `declared` gives the id a metadata key declares (in range), `eos` the end-of-sequence
/// token. A role whose id is not declared is found by text and its token becomes a control
/// token; so does every token in [`END_OF_GENERATION`]. Where several tokens carry texts of
/// one role, llama.cpp takes whichever its hash map yields first; the lowest id is taken here.
pub(super) fn apply_text_rules(
    texts: &[String],
    kinds: &mut [TokenKind],
    token_to_id: &TokenIds,
    declared: impl Fn(&str) -> Option<u32>,
    eos: Option<u32>,
) -> Vec<u32> {
    let mut end_of_generation = Vec::new();
    for role in ROLES {
        let id = match role.keys.iter().find_map(|k| declared(k)) {
            Some(id) => Some(id),
            None => {
                let found = role
                    .texts
                    .iter()
                    .filter_map(|t| token_to_id.get(*t).copied())
                    .min();
                if let Some(id) = found {
                    kinds[id as usize] = TokenKind::Control;
                }
                found
            }
        };
        if role.ends_generation {
            end_of_generation.extend(id);
        }
    }
    for text in END_OF_GENERATION {
        if let Some(&id) = token_to_id.get(*text) {
            end_of_generation.push(id);
            kinds[id as usize] = TokenKind::Control;
        }
    }
    // gpt-oss: these must always be rendered, so llama.cpp makes them user-defined.
    for text in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        if let Some(&id) = token_to_id.get(text) {
            kinds[id as usize] = TokenKind::UserDefined;
        }
    }
    end_of_generation.extend(eos);
    end_of_generation.sort_unstable();
    end_of_generation.dedup();

    let text_of = |id: &u32| texts[*id as usize].as_str();
    let has = |eog: &[u32], wanted: &[&str]| eog.iter().any(|id| wanted.contains(&text_of(id)));
    // o200k_harmony and solar-open end a message with `<|end|>` but not the generation.
    let end = end_of_generation
        .iter()
        .copied()
        .find(|id| text_of(id) == "<|end|>");
    if let Some(end) = end {
        let eog = &end_of_generation;
        let call = has(eog, &["<|call|>", "<|calls|>"]);
        if call && (has(eog, &["<|return|>"]) || has(eog, &["<|flush|>"])) {
            end_of_generation.retain(|&id| id != end);
            kinds[end as usize] = TokenKind::UserDefined;
        }
    }
    // Gemma 4 and PLaMo have an ordinary `</s>`.
    let s = end_of_generation
        .iter()
        .copied()
        .find(|id| text_of(id) == "</s>");
    if let Some(s) = s
        && has(&end_of_generation, &["<|tool_response>", "<|plamo:eos|>"])
    {
        end_of_generation.retain(|&id| id != s);
        kinds[s as usize] = TokenKind::Normal;
    }
    end_of_generation
}

/// A piece of text after the special tokens are cut out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fragment<'a> {
    /// Text for the vocabulary's own algorithm.
    Text(&'a str),
    /// A special token found whole in the text.
    Token(u32),
}

/// The control, user-defined and unknown tokens, found in text as llama.cpp's
/// `tokenizer_st_partition` finds them.
pub(super) struct SpecialTokens {
    /// All special texts; a pattern's index is its rank: longest first.
    matcher: Option<AhoCorasick>,
    /// Per rank: the token id.
    ids: Vec<u32>,
    /// Per rank: whether it is matched without `parse_special` (user-defined tokens).
    always: Vec<bool>,
    /// Per rank: whether whitespace before it is dropped.
    lstrip: Vec<bool>,
    /// Per rank: whether whitespace after it is dropped.
    rstrip: Vec<bool>,
}

/// A token cut out of the text, with the whitespace it swallowed.
struct Cut {
    /// End of the cut region (the token and any whitespace dropped after it).
    end: usize,
    id: u32,
}

impl SpecialTokens {
    /// The special tokens of a vocabulary; `strip(id)` says whether whitespace before and
    /// after token `id` is dropped.
    pub(super) fn new(
        texts: &[String],
        kinds: &[TokenKind],
        strip: impl Fn(u32) -> (bool, bool),
    ) -> Result<Self> {
        let mut ids: Vec<u32> = kinds
            .iter()
            .enumerate()
            .filter(|(id, kind)| {
                matches!(
                    kind,
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !texts[*id].is_empty()
            })
            .map(|(id, _)| id as u32)
            .collect();
        // llama.cpp's order is by length only (its sort is not stable); among equal
        // lengths the lower id goes first here, so the result does not depend on the sort.
        ids.sort_by(|&a, &b| {
            let (ta, tb) = (&texts[a as usize], &texts[b as usize]);
            tb.len().cmp(&ta.len()).then(a.cmp(&b))
        });
        let matcher = if ids.is_empty() {
            None
        } else {
            let patterns = ids.iter().map(|&id| texts[id as usize].as_str());
            Some(
                AhoCorasick::new(patterns)
                    .map_err(|e| EngineError::Tokenizer(format!("special tokens: {e}")))?,
            )
        };
        let always = ids
            .iter()
            .map(|&id| kinds[id as usize] == TokenKind::UserDefined)
            .collect();
        let (lstrip, rstrip) = ids.iter().map(|&id| strip(id)).unzip();
        Ok(Self {
            matcher,
            ids,
            always,
            lstrip,
            rstrip,
        })
    }

    /// Splits `text` into plain text and special tokens. Without `parse_special` only
    /// user-defined tokens are cut out.
    ///
    /// llama.cpp takes the special tokens one by one, longest first, and cuts every
    /// occurrence of each out of the text left so far, left to right. The same result comes
    /// from all occurrences found in one pass, claimed in that order (rank, then position)
    /// unless they overlap a region claimed before.
    pub(super) fn partition<'a>(&self, text: &'a str, parse_special: bool) -> Vec<Fragment<'a>> {
        if text.is_empty() {
            return Vec::new();
        }
        let Some(matcher) = &self.matcher else {
            return vec![Fragment::Text(text)];
        };
        let mut found: Vec<(usize, usize, usize)> = matcher
            .find_overlapping_iter(text)
            .filter(|m| parse_special || self.always[m.pattern().as_usize()])
            .map(|m| (m.pattern().as_usize(), m.start(), m.end()))
            .collect();
        if found.is_empty() {
            return vec![Fragment::Text(text)];
        }
        found.sort_unstable();
        let bytes = text.as_bytes();
        // Claimed regions by start; they never overlap.
        let mut cuts: BTreeMap<usize, Cut> = BTreeMap::new();
        for (rank, start, end) in found {
            // The claimed region starting last before `end` is the only one that can overlap.
            let before = cuts.range(..end).next_back();
            if before.is_some_and(|(_, cut)| cut.end > start) {
                continue;
            }
            // Stripping stays inside the text fragment the token was found in.
            let low = before.map_or(0, |(_, cut)| cut.end);
            let high = cuts.range(end..).next().map_or(text.len(), |(&s, _)| s);
            let mut cut_start = start;
            if self.lstrip[rank] {
                while cut_start > low && is_c_space(bytes[cut_start - 1]) {
                    cut_start -= 1;
                }
            }
            let mut cut_end = end;
            if self.rstrip[rank] {
                while cut_end < high && is_c_space(bytes[cut_end]) {
                    cut_end += 1;
                }
            }
            cuts.insert(
                cut_start,
                Cut {
                    end: cut_end,
                    id: self.ids[rank],
                },
            );
        }
        let mut fragments = Vec::with_capacity(2 * cuts.len() + 1);
        let mut at = 0;
        for (cut_start, cut) in &cuts {
            if *cut_start > at {
                fragments.push(Fragment::Text(&text[at..*cut_start]));
            }
            fragments.push(Fragment::Token(cut.id));
            at = cut.end;
        }
        if at < text.len() {
            fragments.push(Fragment::Text(&text[at..]));
        }
        fragments
    }
}

/// Whitespace as C's `isspace` sees it (which llama.cpp's stripping uses).
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}
