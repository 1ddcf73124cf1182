//! Slower storage on demand: a wrapper that adds per-request latency and limits bandwidth,
//! so benchmarks can sweep the balance between computing and loading.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::throttle::{ThrottleConfig, ThrottledStore};

/// How much slower reads should be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttle {
    /// Read bandwidth of one request in bytes per second; `None` leaves it unlimited.
    /// The limit is per request: concurrent reads each get it, as with object stores whose
    /// per-connection throughput is the limit.
    pub bytes_per_second: Option<f64>,
    /// Added to every read and metadata request (time to first byte).
    pub latency: Duration,
}

impl Throttle {
    /// No throttling.
    pub const NONE: Throttle = Throttle {
        bytes_per_second: None,
        latency: Duration::ZERO,
    };
}

/// Wraps `inner` so reads take `latency` plus `bytes / bytes_per_second`. `inner` must
/// answer reads with streams (memory, cloud stores): object_store's throttle panics on a
/// local directory's file answers, so copy such objects into memory first.
///
/// Built on object_store's `ThrottledStore`, whose per-byte wait has nanosecond resolution:
/// bandwidths above 1 GB/s are treated as unlimited.
pub fn throttled(inner: Arc<dyn ObjectStore>, throttle: Throttle) -> Arc<dyn ObjectStore> {
    let per_byte = throttle
        .bytes_per_second
        .filter(|bps| *bps > 0.0 && *bps < 1e9)
        .map(|bps| Duration::from_secs_f64(1.0 / bps))
        .unwrap_or(Duration::ZERO);
    let config = ThrottleConfig {
        wait_get_per_call: throttle.latency,
        wait_get_per_byte: per_byte,
        wait_list_per_call: throttle.latency,
        ..ThrottleConfig::default()
    };
    Arc::new(ThrottledStore::new(inner, config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use object_store::path::Path;
    use object_store::{ObjectStoreExt, PutPayload};

    #[tokio::test]
    async fn reads_take_latency_plus_size_over_bandwidth() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let path = Path::from("blob");
        inner
            .put(&path, PutPayload::from(vec![0u8; 200_000]))
            .await
            .unwrap();
        let store = throttled(
            inner,
            Throttle {
                bytes_per_second: Some(1e6),
                latency: Duration::from_millis(20),
            },
        );
        let started = std::time::Instant::now();
        let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
        let took = started.elapsed();
        assert_eq!(bytes.len(), 200_000);
        // 20 ms + 200 kB at 1 MB/s = 220 ms.
        assert!(took >= Duration::from_millis(215), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
}
