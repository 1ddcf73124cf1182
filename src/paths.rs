//! Where the embedded defaults keep their data: `RAGCAKE_INDEX` and `RAGCAKE_KV` when set,
//! else under `$RAGCAKE_HOME/data`.

use crate::model_cache::ragcake_home;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The vector index used when none is configured: `RAGCAKE_INDEX` (a directory or a Qdrant
/// server URL), else the embedded Qdrant directory `$RAGCAKE_HOME/data/index`.
pub fn default_index_location() -> String {
    env("RAGCAKE_INDEX").unwrap_or_else(|| {
        ragcake_home()
            .join("data")
            .join("index")
            .display()
            .to_string()
    })
}

/// The KV store used when none is configured: `RAGCAKE_KV` (a store URL), else the local
/// directory `$RAGCAKE_HOME/data/kv`.
pub fn default_kv_url() -> String {
    env("RAGCAKE_KV").unwrap_or_else(|| {
        format!(
            "file://{}",
            ragcake_home().join("data").join("kv").display()
        )
    })
}

/// Where `ragcake calibrate` writes each model's attention correction, and where the
/// engine looks for its model's first (before the bundled ones): `RAGCAKE_CALIBRATION`,
/// else `$RAGCAKE_HOME/calibration`.
pub fn calibration_dir() -> std::path::PathBuf {
    env("RAGCAKE_CALIBRATION")
        .map(Into::into)
        .unwrap_or_else(|| ragcake_home().join("calibration"))
}
