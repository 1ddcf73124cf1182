//! Labelled questions and retrieval quality: which document answers each question, and
//! recall@k of a retriever over them.

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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn the_bundled_demo_questions_parse() {
        let path = package_dir().join("../demo/questions.toml");
        let set = QuestionSet::load(&path).unwrap();
        assert!(set.questions.len() >= 20);
        for q in &set.questions {
            let doc = package_dir().join("../demo/corpus").join(&q.doc);
            let text = std::fs::read_to_string(&doc).unwrap();
            assert!(
                text.contains(&q.answer),
                "{}: answer {:?} not in {}",
                q.text,
                q.answer,
                q.doc
            );
        }
    }
}
