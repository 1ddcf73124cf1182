//! Loads from a local directory without an intermediate copy: the header is read and
//! checked first, then each tensor is read from the file straight into the loaded cache's
//! buffer (int8 ones into a scratch buffer dequantized into it) and checksummed there, while
//! its bytes are still in cache. A GET through object_store would first copy the whole blob
//! into memory and then copy each tensor out of it again.

use std::fs::File;
use std::io::{ErrorKind, Read as _};
use std::mem::MaybeUninit;
use std::ops::Range;
use std::path::Path;

use candle_core::Device;
use ragcake_engine::KvRange;
use safetensors::tensor::TensorInfo;

use crate::error::RejectReason;
use crate::format::{self, BlobMeta, CheckedHeader, Expectation, TensorSource};

/// What reading one local blob found.
pub(crate) enum LocalRead {
    /// No file.
    Absent,
    /// A verified cache, and the bytes read for it.
    Hit {
        bytes: u64,
        blob: BlobMeta,
        range: KvRange,
    },
    /// A file that is no cache for the request.
    Rejected(RejectReason),
}

/// The most a blob may be: larger files are refused before anything but their size is read.
pub(crate) struct Limits {
    pub blob_bytes: u64,
    pub header_bytes: u64,
}

/// Tensors read from a blob's file at their offsets. A failed read (the disk, or a file
/// truncated under the reader) is kept to be reported as an I/O error, not as a rejection.
struct FileSource<'f> {
    file: &'f File,
    data_start: u64,
    error: Option<std::io::Error>,
}

// SAFETY: `fill` returns `Ok` only after `pread` has written every byte of `dest`.
unsafe impl TensorSource for FileSource<'_> {
    fn fill(
        &mut self,
        _: usize,
        info: &TensorInfo,
        dest: &mut [MaybeUninit<u8>],
    ) -> Result<(), RejectReason> {
        let start = self.data_start + info.data_offsets.0 as u64;
        let mut done = 0;
        while done < dest.len() {
            let read = rustix::io::pread(self.file, &mut dest[done..], start + done as u64);
            let error = match read {
                Ok((written, _)) if !written.is_empty() => {
                    done += written.len();
                    continue;
                }
                Ok(_) => std::io::Error::from(ErrorKind::UnexpectedEof),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => e.into(),
            };
            let at = start + done as u64;
            let reason = RejectReason::Malformed(format!("reading at byte {at}: {error}"));
            self.error = Some(error);
            return Err(reason);
        }
        Ok(())
    }
}

/// Reads and verifies the blob in `path` (only `layers` of it, when given) into a KV range
/// on `device`.
pub(crate) fn read_blob(
    path: &Path,
    limits: &Limits,
    expected: &Expectation<'_>,
    layers: Option<Range<usize>>,
    device: &Device,
) -> std::io::Result<LocalRead> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(LocalRead::Absent),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    if size > limits.blob_bytes {
        let limit = limits.blob_bytes;
        return Ok(LocalRead::Rejected(RejectReason::Oversized { size, limit }));
    }
    let mut first = [0u8; 8];
    let first = if size >= 8 {
        file.read_exact(&mut first)?;
        &first[..]
    } else {
        &[]
    };
    let header_len = match format::header_len(first, size, limits.header_bytes) {
        Ok(len) => len,
        Err(reason) => return Ok(LocalRead::Rejected(reason)),
    };
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)?;
    let checked = format::parse_header(&header, size)
        .and_then(|parsed| format::check_header(&parsed, expected, layers));
    let CheckedHeader {
        meta,
        blob,
        tensors,
    } = match checked {
        Ok(found) => found,
        Err(reason) => return Ok(LocalRead::Rejected(reason)),
    };
    let mut source = FileSource {
        file: &file,
        data_start: 8 + header_len,
        error: None,
    };
    let range = format::range_from_tensors(&tensors, &mut source, &meta, &blob, device);
    if let Some(e) = source.error {
        return Err(e);
    }
    let data: usize = tensors
        .iter()
        .map(|(_, i)| i.data_offsets.1 - i.data_offsets.0)
        .sum();
    Ok(match range {
        Ok(range) => LocalRead::Hit {
            bytes: 8 + header_len + data as u64,
            blob,
            range,
        },
        Err(reason) => LocalRead::Rejected(reason),
    })
}
