//! The job: discover the documents, chunk, embed and index them, compute and store each
//! chunk's position-independent KV cache — computed after the prompt template's standard
//! preamble, at the positions that follow it, storing only the chunk's own tokens.
//!
//! Idempotent (a chunk whose point and cache exist costs two lookups, nothing more),
//! resumable (work is durable as it is done, in an order that never indexes a chunk
//! before its cache is stored), and shardable (`--shard i/N` takes the documents whose id
//! hashes to `i`, the same split on every machine).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use ragcake_engine::PromptTemplate;
use ragcake_engine::{Engine, KvRange};
use ragcake_kvstore::{CacheKey, KvStore};
use ragcake_retriever::{
    ChunkId, Chunker, DEFAULT_CHUNK_TOKENS, Embedder, IndexPoint, IndexedChunk, TextChunk,
    TokenizeError, VectorIndex,
};
use ragcake_scheduler::LoadBackend;
use serde::Serialize;

use crate::error::{BadShard, IngestError, NotADocument, Result};

/// File extensions read from directories (a file named on the command line is read
/// whatever its extension).
pub const TEXT_EXTENSIONS: [&str; 4] = ["txt", "md", "markdown", "text"];

/// Bytes looked at for a NUL to call a file binary.
const BINARY_SNIFF_BYTES: usize = 8192;

/// One of `count` disjoint parts of a corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    /// This part, from 0.
    pub index: u32,
    /// How many parts.
    pub count: u32,
}

impl Shard {
    /// The whole corpus.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether the document `doc_id` belongs to this part.
    pub fn owns(&self, doc_id: &str) -> bool {
        let hash = blake3::hash(doc_id.as_bytes());
        let bytes: [u8; 8] = hash.as_bytes()[..8].try_into().expect("8 bytes");
        u64::from_le_bytes(bytes) % u64::from(self.count) == u64::from(self.index)
    }
}

impl FromStr for Shard {
    type Err = BadShard;
    fn from_str(s: &str) -> std::result::Result<Self, BadShard> {
        let err = || BadShard(s.to_string());
        let (i, n) = s.split_once('/').ok_or_else(err)?;
        let (index, count): (u32, u32) = (
            i.trim().parse().map_err(|_| err())?,
            n.trim().parse().map_err(|_| err())?,
        );
        if count == 0 || index >= count {
            return Err(err());
        }
        Ok(Self { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// Settings of the job.
#[derive(Debug, Clone)]
pub struct IngestConfig {
    /// Chunk size in LLM tokens.
    pub chunk_tokens: usize,
    /// The part of the corpus this run takes.
    pub shard: Shard,
    /// Chunks embedded and upserted together.
    pub batch: usize,
    /// Compute and store each chunk's KV cache (off: index only).
    pub precompute_kv: bool,
    /// The prompt template of the service that will use the caches: chunk caches are
    /// computed after its standard preamble ([`PromptTemplate::chunk_context`]), which is
    /// part of their key, so the service finds them only with the same template.
    pub template: PromptTemplate,
    /// A document indexed from another file (the corpus moved) is replaced; off, such a
    /// document stops the run with [`IngestError::OtherSource`] before anything of it is
    /// deleted.
    pub allow_moved: bool,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            chunk_tokens: DEFAULT_CHUNK_TOKENS,
            shard: Shard::ALL,
            batch: 32,
            precompute_kv: true,
            template: PromptTemplate::default(),
            allow_moved: false,
        }
    }
}

/// A file found in the inputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its document id: the path relative to the directory given, under that directory's
    /// name (`docs/guide/intro.md`), or the file name for a file given directly — the same
    /// on every machine, wherever the corpus is mounted.
    pub doc_id: String,
}

/// Progress, reported as the job goes.
#[derive(Debug, Clone)]
pub enum IngestEvent {
    /// The files of this shard were listed.
    Planned {
        /// Files to read.
        files: usize,
        /// Their total size.
        bytes: u64,
    },
    /// A file was processed.
    Document {
        /// Its document id.
        doc_id: String,
        /// Its size in bytes.
        bytes: u64,
        /// Chunks it has.
        chunks: usize,
        /// Chunks that needed work (embedding, KV, or both).
        new_chunks: usize,
    },
    /// A file was skipped (and counted).
    Skipped {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        bytes: u64,
        /// Why.
        reason: NotADocument,
    },
}

/// What a run did, and where its time went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct IngestSummary {
    /// Files of this shard read as documents.
    pub documents: usize,
    /// Files skipped (binary, empty, not UTF-8, unreadable), with the reason.
    pub skipped: Vec<(String, String)>,
    /// Files belonging to other shards.
    pub other_shards: usize,
    /// Chunks in the documents.
    pub chunks: usize,
    /// LLM tokens in the chunks.
    pub tokens: usize,
    /// Chunks embedded and upserted in this run.
    pub chunks_indexed: usize,
    /// Chunk KV caches computed and stored in this run.
    pub kv_computed: usize,
    /// Tokens whose KV was computed in this run.
    pub kv_tokens: usize,
    /// Bytes of KV written to the store.
    pub bytes_stored: u64,
    /// Wall time, seconds.
    pub secs: f64,
    /// Reading, chunking and tokenizing.
    pub chunk_secs: f64,
    /// Embedding.
    pub embed_secs: f64,
    /// Computing KV caches.
    pub kv_compute_secs: f64,
    /// Writing KV caches (the part not overlapped with compute).
    pub kv_store_secs: f64,
    /// Index lookups, upserts and deletes.
    pub index_secs: f64,
}

impl IngestSummary {
    /// Tokens ingested per second of wall time.
    pub fn tokens_per_sec(&self) -> f64 {
        if self.secs > 0.0 {
            self.tokens as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Whether the run changed nothing (everything was already there).
    pub fn did_no_work(&self) -> bool {
        self.chunks_indexed == 0 && self.kv_computed == 0 && self.bytes_stored == 0
    }
}

/// Lists the documents under `inputs`: files as given, directories walked recursively
/// (sorted, hidden entries and non-text extensions left out, symlinks not followed).
pub fn discover(inputs: &[PathBuf]) -> Result<Vec<SourceFile>> {
    let mut files = Vec::new();
    for input in inputs {
        let meta = std::fs::metadata(input).map_err(|source| IngestError::Io {
            path: input.display().to_string(),
            source,
        })?;
        let name = input
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| {
                std::fs::canonicalize(input)
                    .ok()?
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_default();
        if meta.is_file() {
            files.push(SourceFile {
                path: input.clone(),
                doc_id: name,
            });
        } else {
            walk(input, &name, &mut files)?;
        }
    }
    unique_documents(files)
}

/// The same file reached twice (overlapping inputs: a directory and a file in it) is read
/// once, under the id it was first found with. Two different files with the same id (two
/// inputs of the same name, `a/docs` and `b/docs`) are refused: keeping one would drop the
/// other, and a later run of either would replace the other's chunks.
fn unique_documents(files: Vec<SourceFile>) -> Result<Vec<SourceFile>> {
    let mut by_id: HashMap<String, PathBuf> = HashMap::new();
    let mut seen_files = HashSet::new();
    let mut unique = Vec::with_capacity(files.len());
    for file in files {
        let real = std::fs::canonicalize(&file.path).unwrap_or_else(|_| file.path.clone());
        if !seen_files.insert(real.clone()) {
            continue;
        }
        if let Some(first) = by_id.get(&file.doc_id) {
            return Err(IngestError::InvalidSetting(format!(
                "two inputs give the document id {:?}: {} and {}; ingest inputs with \
                 different names (the input's own name starts each id), or in separate \
                 indexes",
                file.doc_id,
                first.display(),
                file.path.display()
            )));
        }
        by_id.insert(file.doc_id.clone(), file.path.clone());
        unique.push(file);
    }
    Ok(unique)
}

fn walk(dir: &Path, id_prefix: &str, out: &mut Vec<SourceFile>) -> Result<()> {
    let io = |source| IngestError::Io {
        path: dir.display().to_string(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<std::io::Result<_>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let kind = entry.file_type().map_err(io)?;
        let doc_id = if id_prefix.is_empty() {
            name.clone()
        } else {
            format!("{id_prefix}/{name}")
        };
        if kind.is_dir() {
            walk(&entry.path(), &doc_id, out)?;
        } else if kind.is_file() {
            let text_like = Path::new(&name)
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| TEXT_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if text_like {
                out.push(SourceFile {
                    path: entry.path(),
                    doc_id,
                });
            }
        }
    }
    Ok(())
}

/// Reads a file as a document, or says why it is not one.
pub fn read_document(path: &Path) -> std::result::Result<String, NotADocument> {
    let bytes = std::fs::read(path).map_err(|e| NotADocument::Unreadable(Arc::new(e)))?;
    if bytes.is_empty() {
        return Err(NotADocument::Empty);
    }
    if bytes[..bytes.len().min(BINARY_SNIFF_BYTES)].contains(&0) {
        return Err(NotADocument::Binary);
    }
    let text = String::from_utf8(bytes).map_err(|e| NotADocument::NotUtf8 {
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    if text.trim().is_empty() {
        return Err(NotADocument::OnlyWhitespace);
    }
    Ok(text)
}

/// The job: an engine for KV and tokens, an embedder, an index, a KV store.
#[derive(Debug, Clone)]
pub struct Ingest {
    engine: Arc<Engine>,
    embedder: Arc<Embedder>,
    index: Arc<dyn VectorIndex>,
    kv: Arc<KvStore>,
    config: IngestConfig,
    /// The standard preamble chunk caches are computed after, and its KV.
    context: Arc<[u32]>,
    context_kv: Option<Arc<KvRange>>,
}

/// A chunk of the document being ingested, and what it still needs.
struct PendingChunk {
    chunk: IndexedChunk,
    key: CacheKey,
    needs_index: bool,
    needs_kv: bool,
}

impl Ingest {
    /// A job writing `engine`'s chunk caches to `kv` and chunk vectors to `index`.
    pub fn new(
        engine: Arc<Engine>,
        embedder: Arc<Embedder>,
        index: Arc<dyn VectorIndex>,
        kv: Arc<KvStore>,
        config: IngestConfig,
    ) -> Result<Self> {
        if kv.fingerprint() != engine.fingerprint() {
            return Err(IngestError::InvalidSetting(format!(
                "the KV store holds caches of model {}, the engine is {}",
                kv.fingerprint().short(),
                engine.fingerprint().short()
            )));
        }
        if embedder.dim() != index.dim() {
            return Err(ragcake_retriever::RetrieverError::DimensionMismatch {
                expected: embedder.dim(),
                found: index.dim(),
            }
            .into());
        }
        if config.batch == 0 {
            return Err(IngestError::InvalidSetting(
                "batch must be at least 1".into(),
            ));
        }
        ragcake_retriever::chunker::check_target_tokens(config.chunk_tokens)?;
        let context: Vec<u32> = config
            .template
            .chunk_context(&engine)
            .map_err(|e| IngestError::InvalidSetting(format!("the prompt template: {e}")))?;
        let context_kv = if context.is_empty() || !config.precompute_kv {
            None
        } else {
            let mut cache = engine.new_cache();
            engine.append(&mut cache, &context, context.len(), false)?;
            Some(Arc::new(cache.export(0..context.len())?))
        };
        Ok(Self {
            engine,
            embedder,
            index,
            kv,
            config,
            context: context.into(),
            context_kv,
        })
    }

    /// Ingests the documents under `inputs` that belong to this run's shard, reporting
    /// progress to `progress`. Skipped files are counted, never fatal; a failing index or
    /// store stops the job with an error (what was done stays done).
    pub async fn run(
        &self,
        inputs: &[PathBuf],
        progress: &(dyn Fn(IngestEvent) + Sync),
    ) -> Result<IngestSummary> {
        let started = Instant::now();
        let mut summary = IngestSummary::default();
        let all = discover(inputs)?;
        let mine: Vec<SourceFile> = all
            .into_iter()
            .filter(|f| {
                let owned = self.config.shard.owns(&f.doc_id);
                summary.other_shards += usize::from(!owned);
                owned
            })
            .collect();
        let sizes: Vec<u64> = mine
            .iter()
            .map(|f| std::fs::metadata(&f.path).map_or(0, |m| m.len()))
            .collect();
        progress(IngestEvent::Planned {
            files: mine.len(),
            bytes: sizes.iter().sum(),
        });
        for (file, &bytes) in mine.iter().zip(&sizes) {
            let t = Instant::now();
            let text = match read_document(&file.path) {
                Ok(text) => text,
                Err(reason) => {
                    tracing::warn!(path = %file.path.display(), %reason, "skipping file");
                    summary
                        .skipped
                        .push((file.path.display().to_string(), reason.to_string()));
                    progress(IngestEvent::Skipped {
                        path: file.path.clone(),
                        bytes,
                        reason,
                    });
                    continue;
                }
            };
            let chunks = self.chunk(&text)?;
            summary.chunk_secs += t.elapsed().as_secs_f64();
            let (total, new) = self
                .ingest_document(file, &text, chunks, &mut summary)
                .await?;
            summary.documents += 1;
            progress(IngestEvent::Document {
                doc_id: file.doc_id.clone(),
                bytes,
                chunks: total,
                new_chunks: new,
            });
        }
        summary.secs = started.elapsed().as_secs_f64();
        Ok(summary)
    }

    fn chunk(&self, text: &str) -> Result<Vec<TextChunk>> {
        let tokenizer = self.engine.tokenizer();
        let tokenize = |text: &str| tokenizer.encode(text, false).map_err(TokenizeError::from);
        Ok(Chunker::new(&tokenize, self.config.chunk_tokens)?.split(text)?)
    }

    /// Brings one document's chunks into the index and the store; returns (chunks, chunks
    /// that needed work).
    async fn ingest_document(
        &self,
        file: &SourceFile,
        text: &str,
        chunks: Vec<TextChunk>,
        summary: &mut IngestSummary,
    ) -> Result<(usize, usize)> {
        let model = self.engine.fingerprint();
        let llm = model.to_hex();
        let doc_hash = blake3::hash(text.as_bytes()).to_hex().to_string();
        // The absolute path: the same file is recognised from any working directory.
        let source = std::fs::canonicalize(&file.path)
            .unwrap_or_else(|_| file.path.clone())
            .display()
            .to_string();
        let ids: Vec<ChunkId> = chunks
            .iter()
            .map(|c| ChunkId::new(&file.doc_id, c.chunk_no, &c.text))
            .collect();

        let t = Instant::now();
        // Indexed for this LLM already (a point tokenized for another one is redone), with
        // the cache key it records (empty: no cache recorded).
        let indexed: HashMap<ChunkId, String> = self
            .index
            .get(&ids)
            .await?
            .into_iter()
            .filter(|c| c.llm == llm)
            .map(|c| (c.chunk_id(), c.kv_key))
            .collect();
        summary.index_secs += t.elapsed().as_secs_f64();

        let keys: Vec<CacheKey> = chunks
            .iter()
            .map(|c| self.kv.chunk_key(&self.context, &c.token_ids))
            .collect();
        // The documents' cache lookups go out together (one round trip, not one per chunk).
        let stored: Vec<bool> = if self.config.precompute_kv {
            futures::future::try_join_all(keys.iter().map(|key| self.kv.contains(key))).await?
        } else {
            vec![true; keys.len()]
        };
        let mut pending = Vec::with_capacity(chunks.len());
        for ((c, id), (key, stored)) in chunks
            .into_iter()
            .zip(&ids)
            .zip(keys.into_iter().zip(stored))
        {
            let needs_kv = !stored;
            summary.chunks += 1;
            summary.tokens += c.token_ids.len();
            // The payload records the stored cache, so retrieval need not ask the store: a
            // point indexed before its cache was precomputed is written again.
            let kv_key = if self.config.precompute_kv {
                key.to_hex()
            } else {
                indexed.get(id).cloned().unwrap_or_default()
            };
            pending.push(PendingChunk {
                needs_index: indexed.get(id) != Some(&kv_key),
                needs_kv,
                key,
                chunk: IndexedChunk {
                    id: Some(*id),
                    doc_id: file.doc_id.clone(),
                    chunk_no: c.chunk_no,
                    token_count: c.token_ids.len(),
                    token_ids: c.token_ids,
                    text: c.text,
                    source: source.clone(),
                    llm: llm.clone(),
                    kv_key,
                    doc_hash: doc_hash.clone(),
                },
            });
        }
        let total = pending.len();
        let new = pending
            .iter()
            .filter(|p| p.needs_index || p.needs_kv)
            .count();
        if new == 0 {
            return Ok((total, 0));
        }
        if !self.config.allow_moved {
            self.check_same_source(file, &source).await?;
        }
        // Stale chunks of an earlier version of the document go first: a run killed after
        // this point still finds the new chunks missing and finishes the job.
        if pending.iter().any(|p| p.needs_index) {
            let t = Instant::now();
            self.index.delete_doc_except(&file.doc_id, &ids).await?;
            summary.index_secs += t.elapsed().as_secs_f64();
        }
        for batch in pending.chunks(self.config.batch) {
            self.store_kv(batch, summary).await?;
            // Indexed only once its cache is stored: an indexed chunk is a complete one.
            self.index_batch(batch, summary).await?;
        }
        Ok((total, new))
    }

    /// Refuses to touch a document whose id is indexed from another file than `source`
    /// (`file`'s absolute path). Sources written as given (relative, by older runs) are
    /// resolved from the working directory.
    async fn check_same_source(&self, file: &SourceFile, source: &str) -> Result<()> {
        /// Chunks looked at: a document's chunks share their source unless a run with
        /// `allow_moved` was cut short.
        const SAMPLE: usize = 16;
        let indexed = self.index.doc_chunks(&file.doc_id, SAMPLE).await?;
        let same = |indexed: &str| {
            indexed == source
                || std::fs::canonicalize(indexed).is_ok_and(|p| p.display().to_string() == source)
        };
        match indexed.iter().find(|c| !same(&c.source)) {
            Some(other) => Err(IngestError::OtherSource {
                doc_id: file.doc_id.clone(),
                indexed: other.source.clone(),
                given: source.to_string(),
            }),
            None => Ok(()),
        }
    }

    /// Computes and stores the caches a batch lacks; each put overlaps the next compute.
    async fn store_kv(&self, batch: &[PendingChunk], summary: &mut IngestSummary) -> Result<()> {
        let mut put: Option<tokio::task::JoinHandle<Result<usize>>> = None;
        for p in batch.iter().filter(|p| p.needs_kv) {
            let t = Instant::now();
            let engine = self.engine.clone();
            let tokens = p.chunk.token_ids.clone();
            let context = self.context_kv.clone();
            let range = tokio::task::spawn_blocking(move || -> Result<_> {
                // After the preamble, at the positions that follow it; only the chunk kept.
                let mut cache = engine.new_cache();
                if let Some(context) = &context {
                    engine.import(&mut cache, context)?;
                }
                let start = cache.len();
                engine.append(&mut cache, &tokens, tokens.len(), false)?;
                Ok(cache.export(start..cache.len())?)
            })
            .await
            .map_err(|e| IngestError::Task(format!("KV compute task failed: {e}")))??;
            summary.kv_compute_secs += t.elapsed().as_secs_f64();
            summary.kv_computed += 1;
            summary.kv_tokens += p.chunk.token_ids.len();

            let t = Instant::now();
            if let Some(previous) = put.take() {
                summary.bytes_stored += join_put(previous).await? as u64;
            }
            summary.kv_store_secs += t.elapsed().as_secs_f64();
            let kv = self.kv.clone();
            let (key, tokens) = (p.key, p.chunk.token_ids.clone());
            put = Some(tokio::spawn(async move {
                Ok(kv.put(&key, &tokens, &range).await?)
            }));
        }
        let t = Instant::now();
        if let Some(last) = put {
            summary.bytes_stored += join_put(last).await? as u64;
        }
        summary.kv_store_secs += t.elapsed().as_secs_f64();
        Ok(())
    }

    /// Embeds and upserts the chunks of a batch that are not indexed.
    async fn index_batch(&self, batch: &[PendingChunk], summary: &mut IngestSummary) -> Result<()> {
        let todo: Vec<&PendingChunk> = batch.iter().filter(|p| p.needs_index).collect();
        if todo.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let texts: Vec<String> = todo.iter().map(|p| p.chunk.text.clone()).collect();
        let embedder = self.embedder.clone();
        let vectors = tokio::task::spawn_blocking(move || embedder.embed(&texts))
            .await
            .map_err(|e| IngestError::Task(format!("embedding task failed: {e}")))??;
        summary.embed_secs += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let points = todo
            .iter()
            .zip(vectors)
            .map(|(p, vector)| IndexPoint {
                chunk: p.chunk.clone(),
                vector,
            })
            .collect();
        self.index.upsert(points).await?;
        summary.index_secs += t.elapsed().as_secs_f64();
        summary.chunks_indexed += todo.len();
        Ok(())
    }
}

async fn join_put(put: tokio::task::JoinHandle<Result<usize>>) -> Result<usize> {
    put.await
        .map_err(|e| IngestError::Task(format!("KV store task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_parse_and_partition_documents() {
        assert_eq!("1/3".parse::<Shard>(), Ok(Shard { index: 1, count: 3 }));
        for bad in ["3/3", "1/0", "x/2", "1", ""] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (0..3).map(|i| Shard { index: i, count: 3 }).collect();
        for n in 0..300 {
            let doc = format!("docs/{n}.md");
            assert_eq!(shards.iter().filter(|s| s.owns(&doc)).count(), 1, "{doc}");
        }
        assert!(Shard::ALL.owns("anything"));
    }

    #[test]
    fn bad_files_are_named_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        assert!(matches!(
            read_document(&write("e.txt", b"")),
            Err(NotADocument::Empty)
        ));
        assert!(matches!(
            read_document(&write("b.txt", b"ab\0cd")),
            Err(NotADocument::Binary)
        ));
        assert!(matches!(
            read_document(&write("u.txt", b"ok \xff\xfe")),
            Err(NotADocument::NotUtf8 { valid_up_to: 3 })
        ));
        assert!(matches!(
            read_document(&write("w.txt", b" \n\t")),
            Err(NotADocument::OnlyWhitespace)
        ));
        assert!(matches!(
            read_document(&dir.path().join("absent.txt")),
            Err(NotADocument::Unreadable(_))
        ));
        assert_eq!(
            read_document(&write("g.md", b"# Title\n")).unwrap(),
            "# Title\n"
        );
    }

    #[test]
    fn discovery_walks_directories_in_order_with_stable_ids() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("corpus");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        for name in ["b.md", "a.txt", "sub/c.markdown", "image.png", ".git/x.txt"] {
            std::fs::write(root.join(name), "text").unwrap();
        }
        // A file also reached through its directory is read once.
        let files = discover(&[root.clone(), root.join("a.txt")]).unwrap();
        let ids: Vec<&str> = files.iter().map(|f| f.doc_id.as_str()).collect();
        assert_eq!(
            ids,
            ["corpus/a.txt", "corpus/b.md", "corpus/sub/c.markdown"]
        );
    }

    #[test]
    fn two_inputs_that_would_share_document_ids_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for side in ["a", "b"] {
            let docs = dir.path().join(side).join("docs");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join("guide.md"), format!("{side}'s guide")).unwrap();
        }
        let inputs = [dir.path().join("a/docs"), dir.path().join("b/docs")];
        let error = discover(&inputs).unwrap_err().to_string();
        assert!(error.contains("docs/guide.md"), "{error}");
        assert!(error.contains("a/docs/guide.md") && error.contains("b/docs/guide.md"));
        // Each alone is fine.
        assert_eq!(discover(&inputs[..1]).unwrap().len(), 1);
    }
}
