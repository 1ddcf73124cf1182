//! The examples and the CLI as a user runs them: real processes on a fresh index and KV
//! directory.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// An example's executable, built by `cargo test` beside the package's binaries.
fn example(name: &str) -> PathBuf {
    let bin = crate::common::ragcake_binary();
    let path = bin.parent().unwrap().join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`, which builds the examples",
        path.display()
    );
    path
}

/// A command with the default models and the data under `data`.
fn command(program: &Path, data: &Path) -> Command {
    let mut command = Command::new(program);
    command
        .current_dir(crate::common::repo_dir())
        .env("RAGCAKE_MODEL", crate::common::model_path())
        .env("RAGCAKE_INDEX", data.join("index"))
        .env(
            "RAGCAKE_KV",
            format!("file://{}", data.join("kv").display()),
        )
        .env("RAGCAKE_LOG", "warn,qdrant_edge=error");
    command
}

fn succeeded(output: Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed: {}\nstdout: {stdout}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Every file under `dir`, as a path string.
fn walk_files(dir: &Path) -> impl Iterator<Item = String> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else {
                files.push(path.display().to_string());
            }
        }
    }
    files.into_iter()
}

/// Reads the child's first stdout line, "listening on http://…", and returns the URL.
fn listening_url(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

/// Kills the child when the test ends, however it ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_examples_and_the_cli_ingest_answer_and_serve_the_demo_corpus() {
    let data = tempfile::tempdir().unwrap();
    let ragcake = &crate::common::ragcake_binary();

    // The batch job as library calls.
    let out = succeeded(
        command(&example("precompute"), data.path())
            .arg("demo/corpus")
            .output()
            .unwrap(),
        "precompute",
    );
    assert!(out.contains("12 documents"), "{out}");

    // The library quickstart: a whole answer and a streamed one.
    let out = succeeded(
        command(&example("quickstart"), data.path())
            .arg("What is the highest point of the Isle of Varrow?")
            .output()
            .unwrap(),
        "quickstart",
    );
    assert!(out.contains("from corpus/geography.md"), "{out}");
    assert!(out.contains("streamed: (3 sources)"), "{out}");

    // The CLI: the answer, its sources and the breakdown as JSON. Computed in context, its
    // chunks are written back as prefix caches, and it waits for those writes before
    // exiting: they are in the store after.
    let prefix_objects = || {
        walk_files(&data.path().join("kv"))
            .filter(|p| p.contains("/prefix/"))
            .count()
    };
    let before = prefix_objects();
    let output = command(ragcake, data.path())
        .args([
            "ask",
            "--json",
            "--max-tokens",
            "16",
            "--mode",
            "compute-only",
        ])
        .arg("Who first described the Varrow primrose?")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let out = succeeded(output, "ragcake ask");
    assert!(stderr.contains("write-backs finished"), "{stderr}");
    let answer: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        prefix_objects() > before,
        "no prefix cache written back before exit: {stderr}"
    );
    assert!(
        answer["sources"][0]["doc_id"].as_str().is_some(),
        "{answer}"
    );
    assert!(answer["breakdown"]["ttft_secs"].as_f64().unwrap() > 0.0);

    // The embedded service: ragcake's routes beside one of its own.
    let mut child = KillOnDrop(
        command(&example("qa_service"), data.path())
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let base = listening_url(&mut child.0);
    crate::common::runtime().block_on(async {
        let client = reqwest::Client::new();
        let hello = client.get(format!("{base}/hello")).send().await.unwrap();
        assert_eq!(hello.text().await.unwrap(), "ragcake QA service\n");
        let response = client
            .post(format!("{base}/v1/ask"))
            .json(&serde_json::json!({
                "question": "How many pupils attend Varrow School?",
                "options": {"max_tokens": 16},
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let answer: serde_json::Value = response.json().await.unwrap();
        assert!(
            answer["sources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["doc_id"] == "corpus/school.md"),
            "{answer}"
        );
    });
    // One process at a time may open an embedded index.
    drop(child);

    // `ragcake serve` with the documented configuration file, the address from the
    // environment (it overrides the file) and the queue from a flag.
    let mut serve = KillOnDrop(
        command(ragcake, data.path())
            .args(["serve", "--config", "docs/ragcake.toml", "--max-queue", "2"])
            .env("RAGCAKE_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let base = listening_url(&mut serve.0);
    crate::common::runtime().block_on(async {
        let health: serde_json::Value = reqwest::get(format!("{base}/healthz"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "ok", "{health}");
        assert!(health["index_chunks"].as_u64().unwrap() > 10, "{health}");
        let metrics = crate::common::get_text(&format!("{base}/metrics")).await;
        assert!(
            metrics.contains("# TYPE ragcake_ttft_seconds histogram"),
            "{metrics}"
        );
    });
    drop(serve);

    // The store's lifecycle: stats, a dry run that deletes nothing, then a collection that
    // deletes the prefix caches (the requests' write-backs) and keeps ingest's chunk caches.
    let kv_stats = || -> serde_json::Value {
        let out = succeeded(
            command(ragcake, data.path())
                .args(["kv", "stats", "--json"])
                .output()
                .unwrap(),
            "ragcake kv stats",
        );
        serde_json::from_str(&out).unwrap()
    };
    let of_kind = |stats: &serde_json::Value, kind: &str| -> u64 {
        stats
            .as_array()
            .unwrap()
            .iter()
            .filter(|g| g["kind"] == kind)
            .map(|g| g["objects"].as_u64().unwrap())
            .sum()
    };
    let before = kv_stats();
    let chunks = of_kind(&before, "chunk");
    assert!(
        chunks >= 12,
        "a chunk cache per chunk of 12 documents: {before}"
    );
    let gc = |args: &[&str]| -> serde_json::Value {
        let out = succeeded(
            command(ragcake, data.path())
                .args(["kv", "gc", "--json"])
                .args(args)
                .output()
                .unwrap(),
            "ragcake kv gc",
        );
        serde_json::from_str(&out).unwrap()
    };
    let dry = gc(&["--max-bytes", "1", "--dry-run"]);
    assert_eq!(dry["deleted"], 0, "{dry}");
    assert_eq!(dry["selected_chunk"].as_u64(), Some(chunks), "{dry}");
    // What is stored, without the ages (a second may pass between two listings).
    let contents = |stats: &serde_json::Value| -> Vec<(String, u64, u64)> {
        let rows = stats.as_array().expect("a list of kinds");
        rows.iter()
            .map(|r| {
                let kind = r["kind"].as_str().unwrap_or_default().to_string();
                (
                    kind,
                    r["objects"].as_u64().unwrap_or(0),
                    r["bytes"].as_u64().unwrap_or(0),
                )
            })
            .collect()
    };
    assert_eq!(
        contents(&kv_stats()),
        contents(&before),
        "a dry run deletes nothing"
    );
    let done = gc(&["--older-than", "0s", "--kind", "prefix"]);
    assert_eq!(done["deleted"], done["selected_prefix"], "{done}");
    assert_eq!(done["selected_chunk"], 0, "{done}");
    let after = kv_stats();
    assert_eq!(
        (of_kind(&after, "prefix"), of_kind(&after, "chunk")),
        (0, chunks)
    );
}

#[test]
fn bench_serve_reports_every_contender_at_every_point_with_the_documented_fields() {
    let out_dir = tempfile::tempdir().unwrap();
    let csv = out_dir.path().join("serve.csv");
    let output = command(&crate::common::ragcake_binary(), out_dir.path())
        .args(["bench", "serve", "--context", "64", "--chunk", "32"])
        .args(["--max-tokens", "3", "--requests", "3", "--loads", "4"])
        .args(["--streams", "2", "--bandwidths", "100"])
        .args(["--contenders", "adaptive,compute-only", "--json", "--csv"])
        .arg(&csv)
        .output()
        .unwrap();
    let stdout = succeeded(output, "ragcake bench serve");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let points = report["points"].as_array().expect("a points array");
    // One Poisson load and one closed-loop point, two contenders each.
    assert_eq!(points.len(), 4, "{report:#}");
    for point in points {
        for field in [
            "load",
            "bandwidth",
            "contender",
            "req_per_s",
            "output_tok_per_s",
            "ttft_p50",
            "ttft_p99",
            "tpot_p50",
            "tpot_p99",
        ] {
            assert!(point.get(field).is_some(), "{field} missing in {point:#}");
        }
        assert_eq!(point["failed"], 0, "{point:#}");
        for positive in ["req_per_s", "output_tok_per_s", "ttft_p99", "tpot_p99"] {
            let value = point[positive].as_f64().unwrap_or(f64::NAN);
            assert!(value > 0.0, "{positive} = {value} in {point:#}");
        }
        // Every answer decodes exactly its three tokens.
        let tokens =
            point["output_tok_per_s"].as_f64().unwrap() / point["req_per_s"].as_f64().unwrap();
        assert!(
            (tokens - 3.0).abs() < 1e-6,
            "{tokens} tokens per answer in {point:#}"
        );
    }
    assert!(csv.is_file());
}

/// Without a GPU the GPU benchmark script runs nothing and says why, with exit status 2:
/// when `nvidia-smi` is missing and when it lists no device.
#[test]
fn gpu_bench_script_refuses_clearly_without_a_gpu() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-bench.sh");
    let bin = tempfile::tempdir().unwrap();
    let which = |name: &str| {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .unwrap();
        PathBuf::from(String::from_utf8(found.stdout).unwrap().trim())
    };
    // Only what the script needs before its GPU check: no nvidia-smi on this PATH.
    std::os::unix::fs::symlink(which("dirname"), bin.path().join("dirname")).unwrap();
    let bash = which("bash");
    let out_dir = bin.path().join("results");
    let run = || {
        Command::new(&bash)
            .arg(&script)
            .arg(&out_dir)
            .env("PATH", bin.path())
            .output()
            .unwrap()
    };
    let missing = run();
    let said = String::from_utf8_lossy(&missing.stderr).to_string();
    assert_eq!(missing.status.code(), Some(2), "{said}");
    assert!(
        said.contains("nvidia-smi not found") && said.contains("nothing was run"),
        "{said}"
    );

    let fake = bin.path().join("nvidia-smi");
    std::fs::write(&fake, "#!/bin/sh\necho 'No devices were found'\nexit 6\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let none = run();
    let said = String::from_utf8_lossy(&none.stderr).to_string();
    assert_eq!(none.status.code(), Some(2), "{said}");
    assert!(
        said.contains("finds no usable GPU: No devices were found"),
        "{said}"
    );
    assert!(!out_dir.exists(), "nothing was written");
}

#[test]
fn the_cli_answers_and_runs_the_demo_with_gemma3_by_name() {
    // `--model gemma3-270m` resolves the fetched model by name (the test script fetches it)
    // for every command: generate alone, and the demo end to end (ingest, chunk caches,
    // default-mode answers over them, full computation beside them).
    let _ = crate::common::gemma3_path();
    let data = tempfile::tempdir().unwrap();
    let ragcake = &crate::common::ragcake_binary();
    let out = succeeded(
        command(ragcake, data.path())
            .args([
                "generate",
                "--model",
                "gemma3-270m",
                "--json",
                "--max-tokens",
                "8",
            ])
            .arg("The capital of France is")
            .output()
            .unwrap(),
        "ragcake generate --model gemma3-270m",
    );
    let done: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(done["generated_tokens"], 8, "{done}");
    assert!(
        done["text"].as_str().is_some_and(|t| !t.trim().is_empty()),
        "{done}"
    );

    let out = succeeded(
        command(ragcake, data.path())
            .args(["demo", "--model", "gemma3-270m"])
            .output()
            .unwrap(),
        "ragcake demo --model gemma3-270m",
    );
    assert!(out.contains("12 documents"), "{out}");
    assert!(out.contains("A (default): "), "{out}");
    assert!(out.contains("new questions: mean TTFT default"), "{out}");
    // The default mode loaded the chunk caches ingest stored for Gemma.
    assert!(
        out.lines()
            .filter(|l| l.contains("loaded from the store"))
            .any(|l| !l.contains("loaded from the store 0, from memory 0")),
        "{out}"
    );
}
