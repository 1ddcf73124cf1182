//! Opening object stores by URL.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use url::Url;

use crate::error::{KvStoreError, Result};

/// Opens the object store a URL names and returns it with the path prefix inside it:
/// `file:///DIR` (created if missing), `memory://`, and with the `cloud` feature `s3://BUCKET/PREFIX`,
/// `az://CONTAINER/PREFIX`, `gs://BUCKET/PREFIX`. Cloud stores take their endpoint and
/// credentials from the usual environment variables (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, …)
/// and from `options` (`("aws_endpoint", "http://127.0.0.1:9000")`, …).
pub fn open_url(
    url: &str,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let opened = open_url_parts(url, options)?;
    Ok((opened.store, opened.prefix))
}

/// An object store opened from a URL.
pub(crate) struct OpenedStore {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The same store, when it is a local directory.
    pub local: Option<Arc<LocalFileSystem>>,
}

/// [`open_url`], keeping a local directory's store as one.
pub(crate) fn open_url_parts(
    url: &str,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<OpenedStore> {
    let invalid = |reason: String| KvStoreError::InvalidUrl {
        url: url.to_string(),
        reason,
    };
    let parsed = Url::parse(url).map_err(|e| invalid(e.to_string()))?;
    if parsed.scheme() == "file" {
        let dir = parsed
            .to_file_path()
            .map_err(|_| invalid("not an absolute local path".into()))?;
        std::fs::create_dir_all(&dir).map_err(|e| invalid(format!("{}: {e}", dir.display())))?;
        let local =
            Arc::new(LocalFileSystem::new_with_prefix(&dir).map_err(|e| invalid(e.to_string()))?);
        return Ok(OpenedStore {
            store: local.clone(),
            prefix: Path::default(),
            local: Some(local),
        });
    }
    // object_store's URL parser starts from empty builders; take the usual environment
    // variables first (as the builders' `from_env` would), then the explicit options.
    let env_prefix = match parsed.scheme() {
        "s3" | "s3a" => Some("aws_"),
        "az" | "adl" | "azure" | "abfs" | "abfss" => Some("azure_"),
        "gs" => Some("google_"),
        _ => None,
    };
    let from_env: Vec<(String, String)> = env_prefix
        .map(|p| {
            std::env::vars()
                .filter(|(k, _)| k.to_ascii_lowercase().starts_with(p))
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect()
        })
        .unwrap_or_default();
    let (store, prefix) =
        object_store::parse_url_opts(&parsed, from_env.into_iter().chain(options))
            .map_err(|e| invalid(e.to_string()))?;
    Ok(OpenedStore {
        store: Arc::from(store),
        prefix,
        local: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_memory_urls_open() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/kv", dir.path().display());
        let (_, prefix) = open_url(&url, Vec::new()).unwrap();
        assert_eq!(prefix, Path::default());
        assert!(dir.path().join("kv").is_dir(), "the directory is created");
        assert!(open_url("memory://", Vec::new()).is_ok());
    }

    #[test]
    fn malformed_and_unknown_urls_are_invalid() {
        for url in ["not a url", "file://relative/dir", "ftp://host/x"] {
            let err = open_url(url, Vec::new()).unwrap_err();
            assert!(
                matches!(err, KvStoreError::InvalidUrl { .. }),
                "{url}: {err}"
            );
        }
    }

    /// Cloud stores are built without touching the network; their bucket prefix is kept.
    #[cfg(feature = "cloud")]
    #[test]
    fn cloud_urls_open_with_their_prefix() {
        let opts = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let cases = [
            (
                "s3://bucket/a/b",
                opts(&[
                    ("aws_region", "us-east-1"),
                    ("aws_endpoint", "http://127.0.0.1:1"),
                ]),
            ),
            (
                "az://container/a/b",
                opts(&[("azure_storage_use_emulator", "true")]),
            ),
            (
                "gs://bucket/a/b",
                opts(&[("google_skip_signature", "true")]),
            ),
        ];
        for (url, options) in cases {
            let (_, prefix) = open_url(url, options).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(prefix, Path::from("a/b"), "{url}");
        }
    }
}
