//! ragcake's KV store: chunk KV caches as verified safetensors blobs in object storage
//! (local directory, memory, S3, Azure, GCS), with a byte-bounded memory tier.
//!
//! Every read is checked — format version, model fingerprint, key, token ids, dtype, shapes
//! and a crc32c per tensor — and a blob that fails any check is a miss, never data.

pub mod error;
pub mod format;
pub mod key;
pub mod lifecycle;
pub mod load;
#[cfg(unix)]
mod local;
pub mod store;
pub mod throttle;
pub mod url;

pub use error::{KvStoreError, RejectReason, Result};
pub use format::StorageDtype;
pub use key::{CacheKey, CacheKind};
/// The object store crate, for building stores to pass to [`KvStore::new`].
pub use object_store;
pub use store::{KvStore, Lookup, StoreStats};
pub use throttle::{Throttle, throttled};
pub use url::{StoreClientConfig, open_url, open_url_with};
