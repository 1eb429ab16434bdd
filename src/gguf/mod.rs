//! GGUF model files: the header reader and the per-file caches the Ollama
//! routes need (`/api/tags`: size, digest, details; `/api/show`: details,
//! `model_info`, chat template; `/api/ps`: context length).
//!
//! [`read`] parses only the header — magic `GGUF`, version (2 or 3), tensor
//! and metadata counts, every metadata key/value and every tensor info —
//! and never touches the tensor data, so it costs a few hundred KiB of
//! reading even for a 70B model (the tokenizer arrays are read through, not
//! kept). [`Digests`] hashes whole files (SHA-256) once per file version;
//! [`Headers`] keeps parsed headers per file version.
//!
//! # Invariants
//!
//! - The file is untrusted: every length and count in it is checked against
//!   a fixed cap before it is used, nothing is allocated from a declared
//!   length (strings grow as their bytes actually arrive; arrays keep their
//!   contents only up to [`MAX_HELD_ARRAY`] elements and are skipped without
//!   allocating beyond that), arrays nest at most [`MAX_NESTING`] deep, and
//!   all arithmetic on declared sizes is checked. Bad input is a
//!   [`GgufError`] naming the file, what was being read and its byte
//!   offset; nothing here panics.
//! - Metadata strings are decoded lossily (invalid UTF-8 becomes U+FFFD):
//!   tokenizer vocabularies hold raw bytes, and a display field is better
//!   shown than refused.
//! - A cache entry is valid for one version of a file, identified by its
//!   stamp (device, inode, size, mtime, ctime). A file that changes while
//!   it is read is read again (a few times), never cached half-old.
//! - Both caches block (file I/O, hashing a multi-GiB file takes seconds):
//!   async callers use `tokio::task::spawn_blocking`. Their locks are held
//!   only to look up or insert, never while reading; two concurrent first
//!   calls for one file may both read it, and the later insert wins — both
//!   computed the same value from the same file version.
//!
//! The parts: `reader` decodes GGUF's primitives and typed values under
//! the caps below; `header` parses the header into a [`Header`];
//! [`names`] holds the metadata keys and the names of file and tensor
//! types; `cache` holds [`Digests`] and [`Headers`]. (The GPU memory
//! estimate made from a header is the scheduler's.)
//!
//! A leaf: no `crate::` imports.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

mod cache;
mod header;
pub mod names;
mod reader;
#[cfg(test)]
pub(crate) mod testing;

pub use cache::{Digests, Headers};
pub use header::{Header, TensorInfo};
pub use names::{file_type_name, ggml_type_name, human_number};
pub use reader::{Array, Value, ValueType};

/// Arrays of at most this many elements keep their contents; longer ones
/// (token lists, merges, scores: tens of thousands of entries) keep only
/// their element type and length.
pub const MAX_HELD_ARRAY: u64 = 64;
/// The longest string accepted anywhere in a header, `tokenizer.chat_template`
/// included (real templates are tens of KiB).
pub const MAX_STRING: u64 = 1 << 20;
/// The longest tensor name accepted (ggml itself allows 63 bytes).
pub const MAX_TENSOR_NAME: u64 = 4096;
/// The most metadata entries accepted (real files have well under 1000).
pub const MAX_KV: u64 = 1 << 16;
/// The most tensors accepted (the largest MoE models have tens of thousands).
pub const MAX_TENSORS: u64 = 1 << 20;
/// The most elements an array may declare, even one that is only skipped.
pub const MAX_ARRAY_LEN: u64 = 1 << 32;
/// How deep arrays of arrays may nest.
pub const MAX_NESTING: u8 = 4;
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: u32 = 4;
/// The most string bytes one header may keep in memory in total.
pub const MAX_HELD_BYTES: u64 = 64 << 20;

/// Why a header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or its metadata read.
    #[error("{}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The bytes at `offset` are not a valid header.
    #[error("{}: {what} at byte {offset}: {problem}", path.display())]
    Bad {
        path: PathBuf,
        /// What was being read, e.g. "the value of `llama.context_length`".
        what: String,
        /// Where that item starts in the file.
        offset: u64,
        problem: Problem,
    },
    /// The file kept changing while it was read.
    #[error("{}: the file changed while it was being read", path.display())]
    Changed { path: PathBuf },
}

/// What is wrong with the bytes a [`GgufError::Bad`] points at.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    #[error("the file ends before it is complete (truncated)")]
    Truncated,
    #[error("read failed: {0}")]
    Io(io::Error),
    #[error("not a GGUF file (magic {0:02x?}, expected \"GGUF\")")]
    Magic([u8; 4]),
    #[error(
        "GGUF version {0} is not supported: only versions 2 and 3 are \
         (version 1 is the obsolete 2023 format; re-convert the model with a current llama.cpp)"
    )]
    Version(u32),
    #[error("declared count {count} exceeds the limit of {limit}")]
    TooMany { count: u64, limit: u64 },
    #[error("declared length {len} exceeds the limit of {limit}")]
    TooLong { len: u64, limit: u64 },
    #[error("unknown value type {0}")]
    ValueType(u32),
    #[error("arrays nested deeper than {MAX_NESTING}")]
    Nesting,
    #[error("{0} dimensions (ggml allows at most {MAX_DIMS})")]
    Dims(u32),
    #[error("the element count overflows 64 bits")]
    Overflow,
    #[error("duplicate key `{0}`")]
    DuplicateKey(String),
    #[error("the header keeps more than {MAX_HELD_BYTES} bytes of strings")]
    TooMuchText,
}

/// Reads the header of the GGUF file at `path` (through a buffer; the
/// tensor data is never read). Blocks.
pub fn read(path: &Path) -> Result<Header, GgufError> {
    let file = File::open(path).map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    header::parse(BufReader::with_capacity(64 << 10, file), path)
}
