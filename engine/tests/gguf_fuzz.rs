//! Malformed GGUF files: a tiny llama written here, then truncated at every byte of its
//! header, metadata and tensor descriptions and inside its data, every such byte flipped,
//! counts, dimensions and sizes set to absurd values, tensors made rank 0, vocabulary arrays
//! removed. Each load is an error of the engine's own type or a model, never a panic, and
//! never allocates more than the file justifies. Its own test binary: the allocator that
//! measures the largest allocation sees no other test's.

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};

use ragcake_engine::{DeviceChoice, Engine, EngineConfig};

/// The system allocator, recording the largest single request.
struct Measuring;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

/// A metadata value as the tiny file writes it.
#[derive(Clone)]
enum Meta {
    U32(u32),
    U64(u64),
    F32(f32),
    Str(String),
    Strings(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// A GGUF file's parts, written byte for byte here (GGUF v3, f32 tensors).
#[derive(Clone)]
struct Gguf {
    metadata: Vec<(String, Meta)>,
    /// Name, dimensions (innermost first, as GGUF stores them) and values.
    tensors: Vec<(String, Vec<u64>, Vec<f32>)>,
}

/// Where the sections of a written file start and end.
struct Sections {
    /// End of the header (magic, version, counts).
    header: usize,
    /// End of each metadata entry.
    entries: Vec<usize>,
    /// Start of the tensor data.
    data: usize,
}

const ALIGNMENT: usize = 32;

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Gguf {
    fn bytes(&self) -> (Vec<u8>, Sections) {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.metadata.len() as u64).to_le_bytes());
        let header = out.len();
        let mut entries = Vec::new();
        for (key, value) in &self.metadata {
            put_string(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::U64(v) => {
                    out.extend(10u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_string(&mut out, s);
                }
                Meta::Strings(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|s| put_string(&mut out, s));
                }
                Meta::F32s(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(6u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| out.extend(v.to_le_bytes()));
                }
                Meta::I32s(items) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((items.len() as u64).to_le_bytes());
                    items.iter().for_each(|v| out.extend(v.to_le_bytes()));
                }
            }
            entries.push(out.len());
        }
        let mut offset = 0usize;
        for (name, dims, values) in &self.tensors {
            put_string(&mut out, name);
            out.extend((dims.len() as u32).to_le_bytes());
            dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
            out.extend(0u32.to_le_bytes()); // f32
            out.extend((offset as u64).to_le_bytes());
            offset += (values.len() * 4).next_multiple_of(ALIGNMENT);
        }
        out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        let data = out.len();
        for (_, _, values) in &self.tensors {
            values.iter().for_each(|v| out.extend(v.to_le_bytes()));
            out.resize(out.len().next_multiple_of(ALIGNMENT), 0);
        }
        (
            out,
            Sections {
                header,
                entries,
                data,
            },
        )
    }

    fn set(&mut self, key: &str, value: Meta) {
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    fn without(&self, key: &str) -> Self {
        let mut file = self.clone();
        file.metadata.retain(|(k, _)| k != key);
        file
    }

    fn with_dims(&self, tensor: &str, dims: Vec<u64>) -> Self {
        let mut file = self.clone();
        let t = file.tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
        let elements = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        t.1 = dims;
        // Data for as many elements as the dimensions say, when that is small.
        if let Some(elements) = elements.filter(|&n| n <= 1 << 16) {
            t.2 = vec![0.5; elements as usize];
        }
        file
    }
}

/// A one-layer llama with a SentencePiece vocabulary: hidden 32, 4 query heads over 2 KV
/// heads of width 8, feed-forward 64, context 64.
fn tiny_llama() -> Gguf {
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
    tokens.extend(["▁", "a", "b", "c", "e", "h", "l", "o", "▁a", "he", "ll"].map(String::from));
    let mut types = vec![2, 3, 3];
    types.extend(std::iter::repeat_n(6, 256));
    types.extend(std::iter::repeat_n(1, tokens.len() - 259));
    let vocab = tokens.len();
    let scores: Vec<f32> = (0..vocab).map(|i| -(i as f32) / 10.0).collect();
    let u = |v: u32| Meta::U32(v);
    let metadata = vec![
        ("general.architecture".into(), Meta::Str("llama".into())),
        ("general.alignment".into(), u(ALIGNMENT as u32)),
        ("llama.block_count".into(), u(1)),
        ("llama.context_length".into(), u(64)),
        ("llama.embedding_length".into(), u(32)),
        ("llama.feed_forward_length".into(), u(64)),
        ("llama.attention.head_count".into(), u(4)),
        ("llama.attention.head_count_kv".into(), u(2)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Meta::F32(1e-5),
        ),
        ("llama.rope.freq_base".into(), Meta::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), Meta::Str("llama".into())),
        ("tokenizer.ggml.tokens".into(), Meta::Strings(tokens)),
        ("tokenizer.ggml.scores".into(), Meta::F32s(scores)),
        ("tokenizer.ggml.token_type".into(), Meta::I32s(types)),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
    ];
    let mut seed = 0x2545_f491u32;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                (seed as f32 / u32::MAX as f32 - 0.5) * 0.2
            })
            .collect()
    };
    let matrix = |name: &str, rows: u64, cols: u64, values: &mut dyn FnMut(usize) -> Vec<f32>| {
        (
            name.to_string(),
            vec![cols, rows],
            values((rows * cols) as usize),
        )
    };
    let norm = |name: &str, n: usize| (name.to_string(), vec![n as u64], vec![1.0; n]);
    let v = vocab as u64;
    let tensors = vec![
        matrix("token_embd.weight", v, 32, &mut values),
        norm("output_norm.weight", 32),
        matrix("output.weight", v, 32, &mut values),
        norm("blk.0.attn_norm.weight", 32),
        matrix("blk.0.attn_q.weight", 32, 32, &mut values),
        matrix("blk.0.attn_k.weight", 16, 32, &mut values),
        matrix("blk.0.attn_v.weight", 16, 32, &mut values),
        matrix("blk.0.attn_output.weight", 32, 32, &mut values),
        norm("blk.0.ffn_norm.weight", 32),
        matrix("blk.0.ffn_gate.weight", 64, 32, &mut values),
        matrix("blk.0.ffn_up.weight", 64, 32, &mut values),
        matrix("blk.0.ffn_down.weight", 32, 64, &mut values),
    ];
    Gguf { metadata, tensors }
}

/// What loading one file did.
enum Outcome {
    Loaded,
    Refused(String),
    Panicked(String),
}

/// Loads `bytes` as a model file; returns what happened and the largest allocation made.
fn load(bytes: &[u8], dir: &std::path::Path) -> (Outcome, usize) {
    let path = dir.join("model.gguf");
    std::fs::write(&path, bytes).unwrap();
    let config = EngineConfig {
        device: DeviceChoice::Cpu,
        ..EngineConfig::default()
    };
    // A panic is caught and reported as this case's outcome; the default hook's output
    // would only repeat it.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    LARGEST.store(0, Ordering::Relaxed);
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| Engine::load(&path, &config)));
    let largest = LARGEST.load(Ordering::Relaxed);
    std::panic::set_hook(hook);
    let outcome = match result {
        Ok(Ok(_)) => Outcome::Loaded,
        Ok(Err(error)) => Outcome::Refused(error.to_string()),
        Err(panic) => Outcome::Panicked(
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default(),
        ),
    };
    (outcome, largest)
}

/// Runs every case: none may panic or allocate past the bound; the ones marked `refused`
/// must be errors. Returns how many loaded and how many were refused.
fn run_cases(
    cases: Vec<(String, Vec<u8>, bool)>,
    bound: impl Fn(usize) -> usize,
    dir: &std::path::Path,
) -> (usize, usize) {
    let (mut loaded, mut refused) = (0, 0);
    for (what, bytes, must_refuse) in cases {
        let (outcome, largest) = load(&bytes, dir);
        let limit = bound(bytes.len());
        assert!(
            largest <= limit,
            "{what}: an allocation of {largest} bytes for a file of {} (bound {limit})",
            bytes.len()
        );
        match outcome {
            Outcome::Panicked(message) => panic!("{what}: the load panicked: {message}"),
            Outcome::Loaded if must_refuse => panic!("{what}: loaded, must be refused"),
            Outcome::Loaded => loaded += 1,
            Outcome::Refused(_) => refused += 1,
        }
    }
    (loaded, refused)
}

#[test]
fn malformed_gguf_files_are_typed_errors_never_panics_or_outsized_allocations() {
    let dir = tempfile::tempdir().unwrap();
    let file = tiny_llama();
    let (bytes, sections) = file.bytes();
    let (outcome, honest) = load(&bytes, dir.path());
    if let Outcome::Refused(error) | Outcome::Panicked(error) = &outcome {
        panic!("the well-formed file does not load: {error}");
    }
    // Everything in a file's load is sized by its bytes, its declared context (the rotary
    // tables) or a fixed amount: twice the well-formed file's largest allocation, or 64
    // bytes per byte of file, bounds every malformed variant.
    let bound = |len: usize| (2 * honest).max(64 * len);
    let mut cases: Vec<(String, Vec<u8>, bool)> = Vec::new();

    // Truncated at every byte before the data, and at each tensor's data midway.
    for cut in 0..sections.data {
        cases.push((format!("cut at byte {cut}"), bytes[..cut].to_vec(), true));
    }
    for cut in (sections.data..bytes.len()).step_by(997) {
        cases.push((
            format!("cut in the data at {cut}"),
            bytes[..cut].to_vec(),
            true,
        ));
    }
    // Every byte of the header and tensor descriptions flipped; every entry's type and
    // length bytes, and a stride of the vocabulary's bytes.
    let mut flips: Vec<usize> = (0..sections.header).collect();
    let infos_start = *sections.entries.last().unwrap();
    flips.extend(infos_start..sections.data);
    let mut entry_start = sections.header;
    for &end in &sections.entries {
        flips.extend(entry_start..(entry_start + 24).min(end));
        flips.extend((entry_start..end).step_by(13));
        entry_start = end;
    }
    flips.sort_unstable();
    flips.dedup();
    for &at in &flips {
        for mask in [0xFF, 0x80, 0x01] {
            let mut flipped = bytes.clone();
            flipped[at] ^= mask;
            cases.push((format!("byte {at} ^ {mask:#x}"), flipped, false));
        }
    }
    // Absurd counts in the header, and an absurd first key length.
    for (at, value, what) in [
        (8, u64::MAX, "tensor count"),
        (8, 1 << 40, "tensor count"),
        (16, u64::MAX, "metadata count"),
        (16, 1 << 33, "metadata count"),
        (24, u64::MAX, "first key's length"),
        (24, 1 << 31, "first key's length"),
    ] {
        let mut edited = bytes.clone();
        edited[at..at + 8].copy_from_slice(&value.to_le_bytes());
        cases.push((format!("{what} {value}"), edited, true));
    }
    // Absurd values, each where the model's sizes come from.
    let mut refused_files: Vec<(String, Gguf)> = Vec::new();
    for (key, value) in [
        ("general.alignment", Meta::U32(0)),
        ("general.alignment", Meta::U32(3)),
        ("general.alignment", Meta::U64(32)),
        ("llama.block_count", Meta::U32(u32::MAX)),
        ("llama.block_count", Meta::U32(0)),
        ("llama.context_length", Meta::U32(u32::MAX)),
        ("llama.context_length", Meta::U32(0)),
        ("llama.embedding_length", Meta::U32(0)),
        ("llama.embedding_length", Meta::U32(u32::MAX)),
        ("llama.feed_forward_length", Meta::U32(0)),
        ("llama.attention.head_count", Meta::U32(0)),
        ("llama.attention.head_count", Meta::U32(1 << 30)),
        ("llama.attention.head_count_kv", Meta::U32(3)),
        ("llama.attention.key_length", Meta::U32(1 << 30)),
        ("tokenizer.ggml.token_type", Meta::I32s(vec![1; 3])),
        ("tokenizer.ggml.tokens", Meta::Strings(Vec::new())),
        ("tokenizer.ggml.tokens", Meta::F32s(vec![1.0; 4])),
        ("tokenizer.ggml.model", Meta::Str("nonesuch".into())),
    ] {
        let mut edited = file.clone();
        edited.set(key, value);
        refused_files.push((format!("{key} set absurdly"), edited));
    }
    // Tensors of rank 0, of absurd or overflowing dimensions, of too many dimensions.
    for (tensor, dims) in [
        ("token_embd.weight", vec![]),
        ("blk.0.attn_q.weight", vec![]),
        ("output_norm.weight", vec![]),
        ("token_embd.weight", vec![1 << 62]),
        ("token_embd.weight", vec![1 << 32, 1 << 32]),
        ("token_embd.weight", vec![u64::MAX, 2]),
        ("blk.0.ffn_down.weight", vec![64, 32, 1, 1, 1]),
        ("blk.0.ffn_down.weight", vec![32, 64]),
    ] {
        refused_files.push((
            format!("{tensor} of dimensions {dims:?}"),
            file.with_dims(tensor, dims),
        ));
    }
    // Vocabulary arrays missing: the tokens and the model are required; scores and token
    // types are not (llama.cpp reads none as 0 and as text).
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.model",
        "general.architecture",
    ] {
        refused_files.push((format!("no {key}"), file.without(key)));
    }
    for (what, edited) in refused_files {
        cases.push((what, edited.bytes().0, true));
    }
    for key in ["tokenizer.ggml.scores", "tokenizer.ggml.token_type"] {
        let (outcome, _) = load(&file.without(key).bytes().0, dir.path());
        assert!(
            matches!(outcome, Outcome::Loaded),
            "without {key}: refused or panicked"
        );
    }

    let total = cases.len();
    let (loaded, refused) = run_cases(cases, bound, dir.path());
    assert_eq!(loaded + refused, total);
    assert!(refused > total / 2, "{refused} of {total} refused");
    eprintln!(
        "{total} malformed files: {refused} refused, {loaded} loaded (flips in names, text or values that stay valid)"
    );
}
