//! Where the embedded defaults keep their data: under `$RAGCAKE_HOME/data`.

use std::path::PathBuf;

use crate::models::ragcake_home;

/// The embedded Qdrant directory used when no index is configured.
pub fn default_index_dir() -> PathBuf {
    ragcake_home().join("data").join("index")
}

/// The KV store used when none is configured: a local directory.
pub fn default_kv_url() -> String {
    format!(
        "file://{}",
        ragcake_home().join("data").join("kv").display()
    )
}
