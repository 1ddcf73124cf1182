//! Opening object stores by URL, every cloud request bounded.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use url::Url;

use crate::error::{KvStoreError, Result};

/// How ragcake's requests to a cloud object store (S3, Azure, GCS) are bounded: no request
/// waits on a store that hangs or refuses longer than these settings allow. object_store's
/// own defaults (30 s per attempt, retries for up to 3 minutes) would let one metadata
/// request to a hung endpoint hold a question for minutes.
///
/// The longest a request can take is about `retry_timeout_secs + request_timeout_secs`
/// (no retry starts after the first); the scheduler's load, lookup and write-back
/// deadlines are shorter still where a question waits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreClientConfig {
    /// A connection not established within this many seconds fails (and may be retried).
    pub connect_timeout_secs: f64,
    /// One attempt of a request, connection to last byte, fails after this many seconds.
    pub request_timeout_secs: f64,
    /// Retries after a failed attempt (a timeout, a refused connection, a server error);
    /// 0: none.
    pub max_retries: usize,
    /// No retry starts this many seconds after a request's first attempt.
    pub retry_timeout_secs: f64,
    /// The wait before the first retry, seconds; it doubles on each retry…
    pub initial_backoff_secs: f64,
    /// …up to this.
    pub max_backoff_secs: f64,
}

impl Default for StoreClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout_secs: 3.0,
            request_timeout_secs: 30.0,
            max_retries: 2,
            retry_timeout_secs: 15.0,
            initial_backoff_secs: 0.1,
            max_backoff_secs: 2.0,
        }
    }
}

impl StoreClientConfig {
    /// Checks that every duration is positive and finite (the backoffs may be 0).
    pub fn validate(&self) -> Result<()> {
        let bad = |name: &str| {
            Err(KvStoreError::Config(format!(
                "store.{name} must be a positive, finite number of seconds"
            )))
        };
        for (name, secs, zero_ok) in [
            ("connect_timeout_secs", self.connect_timeout_secs, false),
            ("request_timeout_secs", self.request_timeout_secs, false),
            ("retry_timeout_secs", self.retry_timeout_secs, false),
            ("initial_backoff_secs", self.initial_backoff_secs, true),
            ("max_backoff_secs", self.max_backoff_secs, true),
        ] {
            if !(secs.is_finite() && (secs > 0.0 || zero_ok && secs == 0.0)) {
                return bad(name);
            }
        }
        Ok(())
    }

    #[cfg(feature = "cloud")]
    fn client_options(&self) -> object_store::ClientOptions {
        object_store::ClientOptions::new()
            .with_connect_timeout(Duration::from_secs_f64(self.connect_timeout_secs))
            .with_timeout(Duration::from_secs_f64(self.request_timeout_secs))
    }

    #[cfg(feature = "cloud")]
    fn retry(&self) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_secs_f64(self.initial_backoff_secs),
                max_backoff: Duration::from_secs_f64(self.max_backoff_secs),
                base: 2.0,
            },
            max_retries: self.max_retries,
            retry_timeout: Duration::from_secs_f64(self.retry_timeout_secs),
        }
    }

    /// The longest one request may take under these settings: every attempt allowed
    /// before the retry deadline, each at most the request timeout.
    pub fn request_bound(&self) -> Duration {
        Duration::from_secs_f64(self.retry_timeout_secs + self.request_timeout_secs)
    }
}

/// Opens the object store a URL names and returns it with the path prefix inside it:
/// `file:///DIR` (created if missing), `memory://`, and with the `cloud` feature `s3://BUCKET/PREFIX`,
/// `az://CONTAINER/PREFIX`, `gs://BUCKET/PREFIX`. Cloud stores take their endpoint and
/// credentials from the usual environment variables (`AWS_ENDPOINT`, `AWS_ACCESS_KEY_ID`, …)
/// and from `options` (`("aws_endpoint", "http://127.0.0.1:9000")`, …); their requests are
/// bounded by [`StoreClientConfig::default`].
pub fn open_url(
    url: &str,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    open_url_with(url, &StoreClientConfig::default(), options)
}

/// [`open_url`], with cloud requests bounded by `client`. An option in `options` that the
/// backend does not know is an error (a misspelt endpoint must not be ignored); variables
/// of the environment it does not know are skipped.
pub fn open_url_with(
    url: &str,
    client: &StoreClientConfig,
    options: impl IntoIterator<Item = (String, String)>,
) -> Result<(Arc<dyn ObjectStore>, Path)> {
    let opened = open_url_parts(url, client, options)?;
    Ok((opened.store, opened.prefix))
}

/// An object store opened from a URL.
pub(crate) struct OpenedStore {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// The same store, when it is a local directory.
    pub local: Option<Arc<LocalFileSystem>>,
}

/// [`open_url_with`], keeping a local directory's store as one.
pub(crate) fn open_url_parts(
    url: &str,
    client: &StoreClientConfig,
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
    client.validate()?;
    let (scheme, prefix) =
        object_store::ObjectStoreScheme::parse(&parsed).map_err(|e| invalid(e.to_string()))?;
    #[cfg(feature = "cloud")]
    let options: Vec<(String, String)> = options.into_iter().collect();
    #[cfg(not(feature = "cloud"))]
    drop(options);
    // The three cloud builders share no trait; each gets the same bounded client, then the
    // environment's and the caller's options.
    #[cfg(feature = "cloud")]
    macro_rules! cloud_store {
        ($builder:ty, $key:ty, $env_prefix:literal) => {{
            let builder = <$builder>::new()
                .with_url(url)
                .with_client_options(client.client_options())
                .with_retry(client.retry());
            let builder = configure(builder, $env_prefix, options, |b, k: $key, v| {
                b.with_config(k, v)
            })
            .map_err(|key| invalid(format!("unknown store option {key}")))?;
            Arc::new(builder.build().map_err(|e| invalid(e.to_string()))?)
        }};
    }
    let store: Arc<dyn ObjectStore> = match scheme {
        object_store::ObjectStoreScheme::Memory => Arc::new(object_store::memory::InMemory::new()),
        #[cfg(feature = "cloud")]
        object_store::ObjectStoreScheme::AmazonS3 => cloud_store!(
            object_store::aws::AmazonS3Builder,
            object_store::aws::AmazonS3ConfigKey,
            "aws_"
        ),
        #[cfg(feature = "cloud")]
        object_store::ObjectStoreScheme::MicrosoftAzure => cloud_store!(
            object_store::azure::MicrosoftAzureBuilder,
            object_store::azure::AzureConfigKey,
            "azure_"
        ),
        #[cfg(feature = "cloud")]
        object_store::ObjectStoreScheme::GoogleCloudStorage => cloud_store!(
            object_store::gcp::GoogleCloudStorageBuilder,
            object_store::gcp::GoogleConfigKey,
            "google_"
        ),
        other => return Err(invalid(format!("{other:?} stores are not supported"))),
    };
    Ok(OpenedStore {
        store,
        prefix,
        local: None,
    })
}

/// Applies the environment's variables with the backend's prefix (as the builders'
/// `from_env` would: unknown ones skipped), then the explicit options (an unknown one is an
/// error naming it: the key is returned).
#[cfg(feature = "cloud")]
fn configure<B, K: std::str::FromStr>(
    mut builder: B,
    env_prefix: &str,
    options: Vec<(String, String)>,
    with: impl Fn(B, K, String) -> B,
) -> std::result::Result<B, UnknownOption> {
    for (key, value) in std::env::vars() {
        let key = key.to_ascii_lowercase();
        if key.starts_with(env_prefix)
            && let Ok(known) = key.parse::<K>()
        {
            builder = with(builder, known, value);
        }
    }
    for (key, value) in options {
        let known = key
            .to_ascii_lowercase()
            .parse::<K>()
            .map_err(|_| UnknownOption(key.clone()))?;
        builder = with(builder, known, value);
    }
    Ok(builder)
}

/// A store option no backend of the URL's scheme knows.
#[cfg(feature = "cloud")]
#[derive(Debug)]
struct UnknownOption(String);

#[cfg(feature = "cloud")]
impl std::fmt::Display for UnknownOption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
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
