//! Labelled questions and what is measured on them: which document answers each question
//! and recall@k of a retriever over them; the split of a set into a calibration part and an
//! evaluation part; and answer metrics (SQuAD-style normalised exact match and token F1, and
//! whether an answer states the labelled fact).

use std::path::Path;

use serde::Deserialize;

use crate::error::{Result, RetrieverError};
use crate::retrieve::RetrievedChunk;

/// A question with the document that answers it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct LabelledQuestion {
    /// The question.
    pub text: String,
    /// The answering document: its file name, or its path relative to the ingested
    /// directory's parent (matched against the end of the chunk's doc id).
    pub doc: String,
    /// A short string a correct answer contains.
    pub answer: String,
    /// Whether the demo job asks it.
    #[serde(default)]
    pub demo: bool,
}

/// The part of a question set a question belongs to. Anything a benchmark chooses (a rule,
/// a share, a temperature) is chosen on the calibration part and reported on the
/// evaluation part, so no reported figure was tuned on the questions it is measured on.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
)]
#[serde(rename_all = "lowercase")]
#[strum(serialize_all = "lowercase")]
pub enum Split {
    /// Questions parameters are chosen on.
    Calibration,
    /// Questions results are reported on.
    Evaluation,
}

impl Split {
    /// Both parts, calibration first.
    pub const ALL: [Split; 2] = [Split::Calibration, Split::Evaluation];
}

/// Share of questions in the calibration part, by [`LabelledQuestion::split`].
pub const CALIBRATION_SHARE: f64 = 0.4;

impl LabelledQuestion {
    /// The part this question belongs to: from a hash of its text, so a question keeps its
    /// part when others are added or reordered, and about [`CALIBRATION_SHARE`] of a set
    /// lands in calibration.
    pub fn split(&self) -> Split {
        let hash = blake3::hash(self.text.as_bytes());
        let bytes = hash.as_bytes();
        let draw = u16::from_le_bytes([bytes[0], bytes[1]]) as f64 / 65536.0;
        if draw < CALIBRATION_SHARE {
            Split::Calibration
        } else {
            Split::Evaluation
        }
    }
}

/// A set of labelled questions, read from TOML (`[[question]]` tables).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct QuestionSet {
    /// The questions, in file order.
    #[serde(rename = "question")]
    pub questions: Vec<LabelledQuestion>,
}

impl QuestionSet {
    /// Reads a question set from a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| RetrieverError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            RetrieverError::QuestionSet(msg) => {
                RetrieverError::QuestionSet(format!("{}: {msg}", path.display()))
            }
            other => other,
        })
    }

    /// Parses a question set from TOML text.
    pub fn parse(text: &str) -> Result<Self> {
        let set: Self =
            toml::from_str(text).map_err(|e| RetrieverError::QuestionSet(e.to_string()))?;
        if set.questions.is_empty() {
            return Err(RetrieverError::QuestionSet(
                "no [[question]] in the set".into(),
            ));
        }
        Ok(set)
    }
}

/// Whether the chunk with doc id `doc_id` comes from the labelled document `doc`.
pub fn is_from(doc_id: &str, doc: &str) -> bool {
    doc_id == doc
        || doc_id
            .strip_suffix(doc)
            .is_some_and(|head| head.ends_with('/'))
}

/// The 1-based rank of the first chunk of `doc` among `chunks` (in retrieval order).
pub fn first_hit(chunks: &[RetrievedChunk], doc: &str) -> Option<usize> {
    chunks
        .iter()
        .position(|c| is_from(&c.chunk.doc_id, doc))
        .map(|i| i + 1)
}

/// recall@k for each `k`: the share of questions whose document is among the first k
/// chunks, from each question's first-hit rank.
pub fn recall_at(first_hits: &[Option<usize>], ks: &[usize]) -> Vec<(usize, f64)> {
    let n = first_hits.len().max(1) as f64;
    ks.iter()
        .map(|&k| {
            let hits = first_hits
                .iter()
                .filter(|rank| rank.is_some_and(|r| r <= k))
                .count();
            (k, hits as f64 / n)
        })
        .collect()
}

/// An answer normalised as SQuAD's evaluation does: lower case, punctuation removed,
/// the articles "a", "an" and "the" dropped, whitespace collapsed; returned as its words.
pub fn normalized_words(text: &str) -> Vec<String> {
    let lower: String = text
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !is_typographic_punctuation(*c))
        .collect();
    lower
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .map(str::to_owned)
        .collect()
}

/// Quotes, dashes and ellipses a model writes in place of their ASCII forms.
fn is_typographic_punctuation(c: char) -> bool {
    matches!(
        c,
        '\u{2018}' | '\u{2019}' | '\u{201C}' | '\u{201D}' | '\u{2013}' | '\u{2014}' | '\u{2026}'
    )
}

/// Whether `prediction` equals `label` after [`normalized_words`].
pub fn exact_match(prediction: &str, label: &str) -> bool {
    normalized_words(prediction) == normalized_words(label)
}

/// SQuAD's token F1 of `prediction` against `label`: the harmonic mean of the share of the
/// prediction's words found in the label and of the label's words found in the prediction,
/// each word counted as often as it occurs in both. 1 when both normalise to nothing.
pub fn token_f1(prediction: &str, label: &str) -> f64 {
    let (predicted, expected) = (normalized_words(prediction), normalized_words(label));
    if predicted.is_empty() || expected.is_empty() {
        return f64::from(u8::from(predicted.is_empty() && expected.is_empty()));
    }
    let mut remaining: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for word in &expected {
        *remaining.entry(word).or_default() += 1;
    }
    let mut common = 0usize;
    for word in &predicted {
        if let Some(n) = remaining.get_mut(word.as_str()).filter(|n| **n > 0) {
            *n -= 1;
            common += 1;
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / predicted.len() as f64;
    let recall = common as f64 / expected.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Whether `answer` states `fact`: the fact's normalised words appear in the answer's as a
/// run of whole words, so "24" is not found in "240" nor "wind" in "windows".
pub fn states_fact(answer: &str, fact: &str) -> bool {
    let (words, fact) = (normalized_words(answer), normalized_words(fact));
    !fact.is_empty() && words.windows(fact.len()).any(|w| w == fact.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ops::RangeInclusive;

    #[test]
    fn a_doc_matches_whole_path_segments_only() {
        assert!(is_from("corpus/ferry.md", "ferry.md"));
        assert!(is_from("ferry.md", "ferry.md"));
        assert!(is_from("demo/corpus/ferry.md", "corpus/ferry.md"));
        assert!(!is_from("corpus/xferry.md", "ferry.md"));
        assert!(!is_from("corpus/ferry.md.bak", "ferry.md"));
    }

    #[test]
    fn recall_counts_hits_within_k() {
        let ranks = [Some(1), Some(3), None, Some(2)];
        assert_eq!(
            recall_at(&ranks, &[1, 2, 5]),
            vec![(1, 0.25), (2, 0.5), (5, 0.75)]
        );
    }

    #[test]
    fn a_question_set_needs_questions_and_their_fields() {
        let set = QuestionSet::parse(
            "[[question]]\ntext = \"Q?\"\ndoc = \"a.md\"\nanswer = \"x\"\ndemo = true\n",
        )
        .unwrap();
        assert_eq!(set.questions.len(), 1);
        assert!(set.questions[0].demo);
        assert!(QuestionSet::parse("").is_err());
        assert!(QuestionSet::parse("[[question]]\ntext = \"Q?\"\n").is_err());
    }

    /// The package directory, read when the test runs (cargo sets it): a test binary that a
    /// checkout elsewhere built into the shared target directory must not read that checkout.
    fn package_dir() -> std::path::PathBuf {
        std::env::var_os("CARGO_MANIFEST_DIR")
            .expect("cargo sets CARGO_MANIFEST_DIR")
            .into()
    }

    /// Checks a bundled question set: at least `min` questions, none asked twice, both
    /// parts large enough to choose on and to report on (`calibration` questions in the
    /// first), and every label a span of its document (the span may cross a line break).
    fn check_bundled_set(
        questions: &str,
        corpus: &str,
        min: usize,
        calibration: RangeInclusive<usize>,
    ) {
        let path = package_dir().join(questions);
        let set = QuestionSet::load(&path).unwrap();
        assert!(
            set.questions.len() >= min,
            "{} questions",
            set.questions.len()
        );
        let texts: std::collections::HashSet<_> = set.questions.iter().map(|q| &q.text).collect();
        assert_eq!(texts.len(), set.questions.len(), "a question asked twice");
        let in_calibration = set
            .questions
            .iter()
            .filter(|q| q.split() == Split::Calibration)
            .count();
        assert!(
            calibration.contains(&in_calibration),
            "{in_calibration} in calibration"
        );
        for q in &set.questions {
            let doc = package_dir().join(corpus).join(&q.doc);
            let text = std::fs::read_to_string(&doc).unwrap();
            let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
            assert!(
                text.contains(&q.answer),
                "{}: answer {:?} not in {}",
                q.text,
                q.answer,
                q.doc
            );
        }
    }

    #[test]
    fn the_bundled_demo_questions_parse() {
        check_bundled_set("../demo/questions.toml", "../demo/corpus", 100, 30..=70);
    }

    #[test]
    fn the_bundled_licence_questions_parse_and_quote_their_licences() {
        check_bundled_set(
            "../demo/licences/questions.toml",
            "../demo/licences/corpus",
            60,
            20..=45,
        );
    }

    #[test]
    fn normalisation_drops_case_punctuation_and_articles() {
        assert_eq!(
            normalized_words("The  Sula Grey, an old ferry!"),
            ["sula", "grey", "old", "ferry"]
        );
        assert_eq!(normalized_words("It\u{2019}s 12,000."), ["its", "12000"]);
        assert!(normalized_words("a the .").is_empty());
    }

    #[test]
    fn exact_match_is_equality_after_normalisation() {
        assert!(exact_match("The Sula Grey.", "Sula Grey"));
        assert!(!exact_match("It is the Sula Grey.", "Sula Grey"));
    }

    #[test]
    fn token_f1_counts_shared_words_once_per_occurrence() {
        assert_eq!(token_f1("Sula Grey", "the Sula Grey"), 1.0);
        assert_eq!(token_f1("ferry", "Sula Grey"), 0.0);
        // 2 of 4 predicted words are labelled; 2 of 2 labelled words predicted.
        let f1 = token_f1("it is Sula Grey", "Sula Grey");
        assert!((f1 - 2.0 * 0.5 * 1.0 / 1.5).abs() < 1e-12, "{f1}");
        // A repeated word matches only as often as the label has it.
        let f1 = token_f1("grey grey", "grey");
        assert!((f1 - 2.0 * 0.5 * 1.0 / 1.5).abs() < 1e-12, "{f1}");
        assert_eq!(token_f1("", ""), 1.0);
        assert_eq!(token_f1("", "x"), 0.0);
    }

    #[test]
    fn a_fact_is_found_on_word_boundaries_only() {
        assert!(states_fact("It costs 24 pounds.", "24 pounds"));
        assert!(states_fact("The ticket is 24 Pounds", "24 pounds"));
        assert!(!states_fact("It costs 240 pounds.", "24 pounds"));
        assert!(!states_fact("The windows rattle.", "wind"));
        assert!(!states_fact("pounds 24", "24 pounds"));
        assert!(!states_fact("anything", ""));
    }

    #[test]
    fn a_question_keeps_its_split_and_both_splits_occur() {
        let question = |text: &str| LabelledQuestion {
            text: text.into(),
            doc: "a.md".into(),
            answer: "x".into(),
            demo: false,
        };
        let splits: Vec<Split> = (0..200)
            .map(|i| question(&format!("question {i}?")).split())
            .collect();
        let calibration = splits.iter().filter(|s| **s == Split::Calibration).count();
        assert!((50..=110).contains(&calibration), "{calibration} of 200");
        assert_eq!(question("question 3?").split(), splits[3]);
    }
}
