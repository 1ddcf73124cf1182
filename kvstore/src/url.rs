//! Opening object stores by URL.

use std::sync::Arc;

use object_store::ObjectStore;
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
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| invalid(e.to_string()))?;
        return Ok((Arc::new(store), Path::default()));
    }
    let (store, prefix) =
        object_store::parse_url_opts(&parsed, options).map_err(|e| invalid(e.to_string()))?;
    Ok((Arc::from(store), prefix))
}
