//! The service's configuration, as read from its TOML file (`docs/ragcake.toml` lists every
//! setting at its default): the HTTP server, the pipeline, and the limits a request must
//! respect. Each option has its default in one place.

use std::net::SocketAddr;
use std::path::Path;

use ragcake_engine::{ChatMessage, Role};
use ragcake_kvstore::{StorageDtype, StoreClientConfig};
use ragcake_scheduler::SchedulerConfig;
use serde::{Deserialize, Serialize};

use crate::error::{PipelineError, Result};
use crate::types::{AskOptions, AskRequest};
use ragcake_engine::PromptTemplate;

/// Settings of the HTTP server (the `[http]` table of the service's TOML file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, bytes.
    pub max_body_bytes: usize,
    /// The model name clients use in `/v1/chat/completions` (the GGUF's file stem is
    /// accepted too).
    pub model_name: String,
    /// Keys a client must present (`Authorization: Bearer KEY` or `X-Api-Key: KEY`) on the
    /// question routes; none: open. Each key is a tenant: its cache salt is mixed into the
    /// keys of everything before the retrieved chunks, so tenants never see each other's
    /// prefix hits.
    pub api_keys: Vec<ApiKey>,
    /// A connection that has not sent a request's headers this long after it opened or
    /// after its last response (an idle keep-alive connection) is closed.
    pub header_read_timeout_secs: f64,
    /// A request whose body has not arrived this long after its headers gets a 408.
    pub body_read_timeout_secs: f64,
    /// Connections served at once; more wait to be accepted.
    pub max_connections: usize,
}

/// One client key and the tenant it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// The secret the client presents.
    pub key: String,
    /// Its tenant's cache salt: keys with the same salt share prefix caches. Default: a hash
    /// of the key (each key its own tenant).
    #[serde(default)]
    pub cache_salt: Option<String>,
}

impl ApiKey {
    /// The salt this key's requests are cached under.
    pub fn salt(&self) -> String {
        self.cache_salt
            .clone()
            .unwrap_or_else(|| blake3::hash(self.key.as_bytes()).to_hex().to_string())
    }

    /// Keys from `KEY[=SALT]` entries separated by commas (the `RAGCAKE_API_KEYS`
    /// variable).
    pub fn parse_list(list: &str) -> Result<Vec<Self>> {
        list.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let (key, salt) = match entry.split_once('=') {
                    Some((key, salt)) => (key.trim(), Some(salt.trim().to_string())),
                    None => (entry, None),
                };
                if key.is_empty() {
                    return Err(PipelineError::InvalidRequest(format!(
                        "an API key entry without a key: {entry:?}"
                    )));
                }
                Ok(Self {
                    key: key.to_string(),
                    cache_salt: salt,
                })
            })
            .collect()
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024,
            model_name: "ragcake".into(),
            api_keys: Vec::new(),
            header_read_timeout_secs: 10.0,
            body_read_timeout_secs: 30.0,
            max_connections: 1024,
        }
    }
}

/// The service's whole configuration, as read from its TOML file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceConfig {
    /// The HTTP server.
    pub http: HttpConfig,
    /// The pipeline.
    pub pipeline: PipelineConfig,
}

impl ServiceConfig {
    /// Parses a configuration from TOML text.
    pub fn from_toml(text: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| PipelineError::Config(e.to_string()))
    }

    /// Reads a configuration file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| PipelineError::Config(format!("{}: {e}", path.display())))
    }
}

/// Settings of a pipeline (the `[pipeline]` table of the service's TOML file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PipelineConfig {
    /// Qdrant collection (server index only).
    pub collection: String,
    /// Bytes of recently used chunk caches kept in memory in front of the store.
    pub memory_tier_bytes: usize,
    /// Questions answered at once (retrieval to last token); more wait in the queue.
    pub max_concurrent: usize,
    /// Questions waiting beyond `max_concurrent`; more are refused as overloaded.
    pub max_queue: usize,
    /// A question not answered within this many seconds fails (queueing included).
    pub timeout_secs: f64,
    /// Longest question, in characters.
    pub max_question_chars: usize,
    /// Most generated tokens a request may ask for.
    pub max_tokens_limit: usize,
    /// The text around the retrieved chunks.
    pub prompt: PromptTemplate,
    /// Options of a request that sets none.
    pub defaults: AskOptions,
    /// Which prompts' computed caches are written back to the store.
    pub write_back: WriteBackAdmission,
    /// How exact prefix caches are stored (f32: loaded caches are the computed ones bit for
    /// bit). Part of their keys.
    pub prefix_cache_dtype: StorageDtype,
    /// How position-independent chunk caches are stored (f16, or int8 at about half the
    /// bytes). Part of their keys: ingest must store them the same way.
    pub chunk_cache_dtype: StorageDtype,
    /// The prefill scheduler.
    pub scheduler: SchedulerConfig,
    /// How requests to a cloud object store are bounded (connect and request timeouts,
    /// retries); a local directory needs none.
    pub store: StoreClientConfig,
}

/// Which requests write the caches they compute back to the store (the admission rule:
/// a write-back costs store bytes, worth it only for a cache another request can load).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WriteBackAdmission {
    /// Prompts other requests can reuse: every prompt but one that carries a conversation's
    /// history (its whole prefix chain follows that history, so only the same conversation
    /// at the same turn could load it, and its next turn's prompt differs).
    #[default]
    Shared,
    /// Every prompt, histories included.
    All,
    /// None: the store holds what the precompute job wrote, and nothing more.
    Off,
}

impl WriteBackAdmission {
    /// Whether a prompt with `history` writes back what it computes.
    pub fn admits(self, history: &[ChatMessage]) -> bool {
        match self {
            Self::Shared => history.iter().all(|m| m.role == Role::System),
            Self::All => true,
            Self::Off => false,
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        let limits = RequestLimits::default();
        Self {
            collection: "ragcake".into(),
            memory_tier_bytes: 256 << 20,
            max_concurrent: 8,
            max_queue: 64,
            timeout_secs: 300.0,
            max_question_chars: limits.max_question_chars,
            max_tokens_limit: limits.max_tokens,
            prompt: PromptTemplate::default(),
            defaults: AskOptions::default(),
            write_back: WriteBackAdmission::default(),
            prefix_cache_dtype: StorageDtype::F32,
            chunk_cache_dtype: StorageDtype::F16,
            scheduler: SchedulerConfig::default(),
            store: StoreClientConfig::default(),
        }
    }
}

impl PipelineConfig {
    pub(crate) fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_question_chars: self.max_question_chars,
            max_tokens: self.max_tokens_limit,
            ..RequestLimits::default()
        }
    }

    pub(crate) fn check(&self) -> Result<()> {
        let bad = |why: &str| Err(PipelineError::Config(why.to_string()));
        if self.max_concurrent == 0 {
            return bad("max_concurrent must be at least 1");
        }
        if self.max_queue == 0 {
            return bad("max_queue must be at least 1");
        }
        if !(self.timeout_secs > 0.0 && self.timeout_secs.is_finite()) {
            return bad("timeout_secs must be positive");
        }
        if self.scheduler.io_concurrency == 0 {
            return bad("scheduler.io_concurrency must be at least 1");
        }
        let lookup = self.scheduler.lookup_timeout_secs;
        if lookup.is_nan() || lookup <= 0.0 {
            return bad("scheduler.lookup_timeout_secs must be positive");
        }
        self.store
            .validate()
            .map_err(|e| PipelineError::Config(e.to_string()))?;
        self.limits()
            .check(&AskRequest::new("?").with_options(self.defaults.clone()))
            .map_err(|e| PipelineError::Config(format!("defaults: {e}")))
    }
}

/// Limits a request must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Longest question, in characters.
    pub max_question_chars: usize,
    /// Most chunks per prompt.
    pub max_top_k: usize,
    /// Most generated tokens.
    pub max_tokens: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_question_chars: 4000,
            max_top_k: 16,
            max_tokens: 1024,
        }
    }
}

impl RequestLimits {
    /// Checks a request against the limits and the options against their ranges.
    pub fn check(&self, request: &AskRequest) -> Result<(), PipelineError> {
        let invalid = |why: String| Err(PipelineError::InvalidRequest(why));
        let o = &request.options;
        let chars = request.question.chars().count();
        if request.question.trim().is_empty() {
            return invalid("the question is empty".into());
        }
        if chars > self.max_question_chars {
            return invalid(format!(
                "the question has {chars} characters, at most {} are accepted",
                self.max_question_chars
            ));
        }
        if o.top_k == 0 || o.top_k > self.max_top_k {
            return invalid(format!("top_k must be 1 to {}", self.max_top_k));
        }
        if o.max_tokens == 0 || o.max_tokens > self.max_tokens {
            return invalid(format!("max_tokens must be 1 to {}", self.max_tokens));
        }
        if !(0.0..=2.0).contains(&o.temperature) {
            return invalid("temperature must be 0 to 2".into());
        }
        if !(o.top_p > 0.0 && o.top_p <= 1.0) {
            return invalid("top_p must be above 0 and at most 1".into());
        }
        if !(o.prefer_cached_within >= 0.0 && o.prefer_cached_within <= 2.0) {
            return invalid("prefer_cached_within must be 0 to 2".into());
        }
        if o.recompute.validate().is_err() {
            return invalid("recompute.ratio must be 0 to 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_keys_parse_with_and_without_salts_and_each_key_is_its_own_tenant() {
        let keys = ApiKey::parse_list(" a=team , b,, c=team ").unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(
            (keys[0].key.as_str(), keys[0].salt().as_str()),
            ("a", "team")
        );
        assert_eq!(keys[2].salt(), keys[0].salt(), "one salt, one tenant");
        assert_ne!(keys[1].salt(), keys[0].salt());
        assert_ne!(keys[1].salt(), "b", "a derived salt is not the key itself");
        assert!(ApiKey::parse_list("=salt").is_err());
    }

    #[test]
    fn the_documented_configuration_file_is_the_defaults() {
        // Read when the test runs: a binary built by a checkout elsewhere sharing the target
        // directory must not read that checkout's file.
        let dir = std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it");
        let path = Path::new(&dir).join("../docs/ragcake.toml");
        let config = ServiceConfig::load(&path).unwrap();
        assert_eq!(config, ServiceConfig::default());
    }

    #[test]
    fn an_unknown_setting_is_an_error_that_names_it() {
        let error = ServiceConfig::from_toml("[pipeline]\nmax_concurent = 3\n").unwrap_err();
        assert!(error.to_string().contains("max_concurent"), "{error}");
    }
}
