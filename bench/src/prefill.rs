//! `ragcake bench prefill`: prefill and decode tokens/s beside llama.cpp on the same GGUF,
//! tokens and thread count.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use ragcake::engine::Engine;
use serde::Serialize;

use super::report::{Stats, print_json, print_table, write_csv};
use super::{ModelArgs, plot};

#[derive(Debug, Args)]
pub struct PrefillArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Context lengths to prefill, in tokens.
    #[arg(long, value_delimiter = ',', default_value = "256,1024,2048,4096")]
    contexts: Vec<usize>,
    /// Timed repeats per measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Prefill chunk size (llama.cpp's batch size is set to the same).
    #[arg(long, default_value_t = 512)]
    chunk: usize,
    /// Tokens decoded one at a time after a 256-token prompt.
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Sequences decoded together, one batched step per token (each after its own
    /// 256-token prompt), beside single-stream decode.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    decode_batches: Vec<usize>,
    /// Python interpreter with llama-cpp-python
    /// [default: $RAGCAKE_HOME/venv-llama-cpp/bin/python when it exists].
    #[arg(long)]
    llama_cpp_python: Option<PathBuf>,
    /// Skip the llama.cpp comparison.
    #[arg(long)]
    no_llama_cpp: bool,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Write the results as CSV here.
    #[arg(long, default_value = "bench-results/prefill.csv")]
    csv: PathBuf,
}

/// One measurement of the prefill benchmark: prefill at one context length, or decode.
#[derive(Debug, Serialize)]
struct Row {
    /// `prefill` or `decode`.
    measure: &'static str,
    /// Context tokens (decode: the prompt before the decoded tokens).
    context: usize,
    /// Sequences decoded together (1 for prefill and single-stream decode); tokens/s
    /// counts the tokens of all of them.
    batch: usize,
    threads: usize,
    ragcake_tok_s: f64,
    ragcake_min: f64,
    ragcake_max: f64,
    llama_cpp_tok_s: Option<f64>,
    llama_cpp_min: Option<f64>,
    llama_cpp_max: Option<f64>,
    /// ragcake / llama.cpp (medians).
    ratio: Option<f64>,
}

impl Row {
    fn new(
        measure: &'static str,
        context: usize,
        threads: usize,
        ragcake: Stats,
        llama_cpp: Option<Stats>,
    ) -> Self {
        Self {
            measure,
            context,
            batch: 1,
            threads,
            ragcake_tok_s: ragcake.median,
            ragcake_min: ragcake.min,
            ragcake_max: ragcake.max,
            llama_cpp_tok_s: llama_cpp.map(|l| l.median),
            llama_cpp_min: llama_cpp.map(|l| l.min),
            llama_cpp_max: llama_cpp.map(|l| l.max),
            ratio: llama_cpp.map(|l| ragcake.median / l.median),
        }
    }
}

/// Deterministic ordinary-vocabulary token ids (attention cost does not depend on content).
pub fn bench_tokens(engine: &Engine, n: usize) -> Vec<u32> {
    let vocab = engine.tokenizer().vocab_size() as u64;
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let id = (state >> 33) % vocab;
            // Skip control tokens; a run of them is not a realistic prompt.
            if engine.tokenizer().kind(id as u32) == Some(ragcake::engine::TokenKind::Normal) {
                id as u32
            } else {
                1000 + (id % 1000) as u32
            }
        })
        .collect()
}

pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

pub fn run(mut args: PrefillArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    anyhow::ensure!(!args.contexts.is_empty(), "--contexts is empty");
    let model_path = args.model.model_path()?;
    let engine = args.model.load()?;
    // Contexts past the model's are left out, said so (a GPU run asks for up to 32k tokens
    // whatever model it is given).
    let context_length = engine.context_length();
    let (contexts, too_long): (Vec<usize>, Vec<usize>) = args
        .contexts
        .iter()
        .partition(|&&n| n + args.decode_tokens <= context_length);
    if !too_long.is_empty() {
        eprintln!("contexts {too_long:?} skipped: the model's context is {context_length} tokens");
    }
    anyhow::ensure!(
        !contexts.is_empty(),
        "no context fits the model's {context_length} tokens"
    );
    args.contexts = contexts;
    let max_ctx = *args.contexts.iter().max().unwrap_or(&256);
    // GPU kernels run asynchronously: a timer stops only after the device has finished.
    let finish = || -> anyhow::Result<()> { Ok(engine.device().synchronize()?) };
    let tokens = bench_tokens(&engine, max_ctx.max(256 + args.decode_tokens));
    let threads = threads();

    // Warm-up: first-touch page faults and thread-pool start are not prefill speed.
    engine.prefill(
        &mut engine.new_cache(),
        &tokens[..256.min(max_ctx)],
        args.chunk,
    )?;
    finish()?;
    let mut llama = if args.no_llama_cpp {
        None
    } else {
        let python = args.llama_cpp_python.clone().unwrap_or_else(|| {
            ragcake::model_cache::ragcake_home()
                .join("venv-llama-cpp")
                .join("bin")
                .join("python")
        });
        let n_ctx = max_ctx.max(256 + args.decode_tokens) + 16;
        match LlamaCpp::start(&python, &model_path, &tokens, n_ctx, threads, args.chunk) {
            Ok(worker) => Some(worker),
            Err(e) => {
                eprintln!("llama.cpp comparison skipped: {e:#}");
                None
            }
        }
    };
    // ragcake and llama.cpp take turns going first in every repeat.
    let turns = |repeat: usize| {
        let ragcake_first = repeat.is_multiple_of(2);
        [ragcake_first, !ragcake_first]
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for &n in &args.contexts {
        let (mut rates, mut llama_rates) = (Vec::new(), Vec::new());
        for repeat in 0..args.repeats {
            for ragcake_turn in turns(repeat) {
                if ragcake_turn {
                    let mut cache = engine.new_cache();
                    let t0 = Instant::now();
                    engine.prefill(&mut cache, &tokens[..n], args.chunk)?;
                    finish()?;
                    rates.push(n as f64 / t0.elapsed().as_secs_f64());
                } else if let Some(llama) = llama.as_mut() {
                    llama_rates.push(n as f64 / llama.time(serde_json::json!({ "prefill": n }))?);
                }
            }
        }
        eprintln!(
            "ragcake prefill {n}: {:.1} tok/s",
            Stats::of(rates.clone()).median
        );
        ours.push(rates);
        theirs.push(llama_rates);
    }
    let (mut decode, mut llama_decode) = (Vec::new(), Vec::new());
    let decoded = args.decode_tokens as f64;
    for repeat in 0..args.repeats {
        for ragcake_turn in turns(repeat) {
            if ragcake_turn {
                let mut cache = engine.new_cache();
                engine.prefill(&mut cache, &tokens[..256], args.chunk)?;
                let t0 = Instant::now();
                for i in 0..args.decode_tokens {
                    engine
                        .model()
                        .decode(&tokens[256 + i..257 + i], &mut cache)?;
                }
                finish()?;
                decode.push(decoded / t0.elapsed().as_secs_f64());
            } else if let Some(llama) = llama.as_mut() {
                let request = serde_json::json!({ "decode": args.decode_tokens });
                llama_decode.push(decoded / llama.time(request)?);
            }
        }
    }
    let llama_ran = llama.is_some();
    drop(llama);
    let mut batched = Vec::new();
    for &batch in args.decode_batches.iter().filter(|&&b| b > 1) {
        let mut rates = Vec::new();
        for _ in 0..args.repeats {
            let mut caches = Vec::with_capacity(batch);
            for _ in 0..batch {
                let mut cache = engine.new_cache();
                engine.prefill(&mut cache, &tokens[..256], args.chunk)?;
                caches.push(cache);
            }
            let mut refs: Vec<&mut _> = caches.iter_mut().collect();
            let t0 = Instant::now();
            for i in 0..args.decode_tokens {
                let step = vec![tokens[256 + i]; batch];
                engine.model().decode_batch(&step, &mut refs)?;
            }
            finish()?;
            rates.push((batch * args.decode_tokens) as f64 / t0.elapsed().as_secs_f64());
        }
        eprintln!(
            "ragcake decode, batch of {batch}: {:.1} tok/s",
            Stats::of(rates.clone()).median
        );
        batched.push((batch, rates));
    }

    let llama_stats = |rates: Vec<f64>| llama_ran.then(|| Stats::of(rates));
    let mut rows: Vec<Row> = args
        .contexts
        .iter()
        .zip(ours.into_iter().zip(theirs))
        .map(|(&context, (rates, llama_rates))| {
            let llama_cpp = llama_stats(llama_rates);
            Row::new("prefill", context, threads, Stats::of(rates), llama_cpp)
        })
        .collect();
    rows.push(Row::new(
        "decode",
        256,
        threads,
        Stats::of(decode),
        llama_stats(llama_decode),
    ));
    for (batch, rates) in batched {
        rows.push(Row {
            batch,
            ..Row::new("decode", 256, threads, Stats::of(rates), None)
        });
    }
    write_csv(&args.csv, &rows)?;
    let png = args.csv.with_extension("png");
    let prefill_rows = || rows.iter().filter(|r| r.measure == "prefill");
    let mut series = vec![plot::Series {
        name: "ragcake".into(),
        points: prefill_rows()
            .map(|r| (r.context as f64, r.ragcake_tok_s))
            .collect(),
    }];
    if llama_ran {
        series.push(plot::Series {
            name: "llama.cpp".into(),
            points: prefill_rows()
                .filter_map(|r| Some((r.context as f64, r.llama_cpp_tok_s?)))
                .collect(),
        });
    }
    let title = format!(
        "Prefill throughput, {} threads (median of {})",
        threads, args.repeats
    );
    plot::line_plot_or_warn(
        &png,
        &title,
        "context (tokens)",
        "prefill tokens/s",
        &series,
        false,
    );
    if args.json {
        print_json(&rows)
    } else {
        println!(
            "model {}, {threads} threads, chunk {}, median of {} (min, max)",
            model_path.display(),
            args.chunk,
            args.repeats
        );
        print_table(
            &rows,
            &[
                "measure",
                "context",
                "batch",
                "ragcake_tok_s",
                "ragcake_min",
                "ragcake_max",
                "llama_cpp_tok_s",
                "llama_cpp_min",
                "llama_cpp_max",
                "ratio",
            ],
        )
    }
}

/// llama-cpp-python in a worker process (`scripts/llama_cpp_bench.py`): the model loaded
/// once, then one timed prefill or decode per request, so the engines can take turns.
struct LlamaCpp {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    script: PathBuf,
}

impl LlamaCpp {
    /// Starts the worker on `model` with the benchmark's token ids and settings, and waits
    /// for its warm-up pass.
    fn start(
        python: &PathBuf,
        model: &PathBuf,
        tokens: &[u32],
        n_ctx: usize,
        threads: usize,
        batch: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            python.exists(),
            "{} not found (scripts/bench.sh installs llama-cpp-python there)",
            python.display()
        );
        let script =
            std::env::temp_dir().join(format!("ragcake-llama-cpp-bench-{}.py", std::process::id()));
        std::fs::write(&script, include_str!("../../scripts/llama_cpp_bench.py"))?;
        let mut child = Command::new(python)
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", python.display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut worker = Self {
            child,
            stdin: Some(stdin),
            stdout,
            script,
        };
        let settings = serde_json::json!({
            "model": model, "tokens": tokens, "n_ctx": n_ctx, "threads": threads, "batch": batch,
        });
        let ready = worker.exchange(&settings)?;
        anyhow::ensure!(ready["ready"] == true, "llama.cpp worker said {ready}");
        Ok(worker)
    }

    /// Seconds the worker took for `request` (`{"prefill": n}` or `{"decode": d}`).
    fn time(&mut self, request: serde_json::Value) -> anyhow::Result<f64> {
        let answer = self.exchange(&request)?;
        answer["seconds"]
            .as_f64()
            .with_context(|| format!("llama.cpp worker answered {answer} to {request}"))
    }

    /// Sends one line and reads the answer line; when the worker has died, says why.
    fn exchange(&mut self, message: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the llama.cpp worker is closed")?;
        let sent = writeln!(stdin, "{message}").and_then(|()| stdin.flush());
        let mut line = String::new();
        let read = sent.and_then(|()| self.stdout.read_line(&mut line));
        if !matches!(read, Ok(n) if n > 0) {
            self.stdin = None;
            // How it ended says what went wrong where it printed nothing (a crash).
            let status = self
                .child
                .wait()
                .map_or_else(|e| format!("status unknown: {e}"), |s| s.to_string());
            let mut stderr = String::new();
            if let Some(mut err) = self.child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            anyhow::bail!("the llama.cpp worker stopped ({status}): {}", stderr.trim());
        }
        serde_json::from_str(&line).context("parsing the llama.cpp worker's answer")
    }
}

impl Drop for LlamaCpp {
    fn drop(&mut self) {
        // Closing its stdin ends the worker's loop.
        self.stdin = None;
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.script);
    }
}
