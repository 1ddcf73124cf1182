//! Write-back of computed chunks through a queue bounded in bytes: a store that is slow or
//! never answers costs dropped write-backs (counted), never memory without limit and never
//! an answer's time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;

use super::{LoadBackend, StoreError, WriteBack};

/// Writers running at once: enough to overlap a store's latency, few enough that
/// write-back does not compete with loads for the store.
const WRITERS: usize = 2;

/// One chunk to write: where, its tokens, its KV, and the bytes it holds in the queue.
pub(super) struct Job<K, Kv> {
    pub(super) dest: WriteBack<K>,
    pub(super) tokens: Arc<[u32]>,
    pub(super) kv: Kv,
    pub(super) bytes: usize,
}

/// Counts of write-backs and the bytes waiting, shared by the queue and its writers.
#[derive(Debug, Default)]
pub(super) struct WriteBackCounts {
    pub(super) written: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) dropped: AtomicU64,
    /// Bytes of KV queued or being written.
    pub(super) pending_bytes: AtomicUsize,
}

/// The queue's sending side. Dropping it lets the writers finish what is queued and stop.
pub(super) struct WriteBackQueue<K, Kv> {
    jobs: mpsc::UnboundedSender<Job<K, Kv>>,
    capacity_bytes: usize,
    pub(super) counts: Arc<WriteBackCounts>,
}

impl<K: Send + Sync + 'static, Kv: Send + 'static> WriteBackQueue<K, Kv> {
    /// A queue holding at most `capacity_bytes` of KV, written to `loader` by a task on
    /// `runtime`, each write given up after `timeout`.
    pub(super) fn start<L>(
        loader: Arc<L>,
        runtime: &tokio::runtime::Handle,
        capacity_bytes: usize,
        timeout: Duration,
    ) -> Self
    where
        L: LoadBackend<Key = K, Kv = Kv>,
    {
        let (jobs, mut queued) = mpsc::unbounded_channel::<Job<K, Kv>>();
        let counts = Arc::new(WriteBackCounts::default());
        let writer_counts = counts.clone();
        runtime.spawn(async move {
            let jobs = futures::stream::poll_fn(move |cx| queued.poll_recv(cx));
            jobs.for_each_concurrent(WRITERS, |job| {
                let (loader, counts) = (loader.clone(), writer_counts.clone());
                async move {
                    let bytes = job.bytes;
                    let counter = match tokio::time::timeout(timeout, write(&*loader, job)).await {
                        Ok(Ok(true)) => &counts.written,
                        Ok(Ok(false)) => &counts.skipped,
                        Ok(Err(error)) => {
                            tracing::warn!(%error, "write-back of a computed chunk failed");
                            &counts.failed
                        }
                        Err(_) => {
                            tracing::warn!(?timeout, "write-back of a computed chunk timed out");
                            &counts.failed
                        }
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    counts.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
                }
            })
            .await;
        });
        Self {
            jobs,
            capacity_bytes,
            counts,
        }
    }

    /// Queues `jobs` (one request's chunks) if they fit; otherwise drops them all and
    /// counts them: a prefix chain is only useful whole, from its first chunk on.
    pub(super) fn offer(&self, jobs: Vec<Job<K, Kv>>) {
        let bytes: usize = jobs.iter().map(|j| j.bytes).sum();
        let pending = &self.counts.pending_bytes;
        let admitted = pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                (held + bytes <= self.capacity_bytes).then_some(held + bytes)
            })
            .is_ok();
        if !admitted {
            self.counts
                .dropped
                .fetch_add(jobs.len() as u64, Ordering::Relaxed);
            return;
        }
        for job in jobs {
            let bytes = job.bytes;
            if self.jobs.send(job).is_err() {
                // The writer is gone (the runtime shut down): nothing will write it.
                pending.fetch_sub(bytes, Ordering::Relaxed);
                self.counts.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Writes one chunk; `Ok(false)` when a cache was already stored under its key.
async fn write<L: LoadBackend>(
    loader: &L,
    job: Job<L::Key, L::Kv>,
) -> std::result::Result<bool, StoreError> {
    let key = match job.dest {
        WriteBack::Store(key) => key,
        WriteBack::StoreIfAbsent(key) => {
            if loader.contains(&key).await? {
                return Ok(false);
            }
            key
        }
    };
    loader.store(&key, &job.tokens, job.kv).await.map(|()| true)
}
