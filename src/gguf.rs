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
//!   [`Stamp`] (device, inode, size, mtime, ctime). A file that changes while
//!   it is read is read again (a few times), never cached half-old.
//! - Both caches block (file I/O, hashing a multi-GiB file takes seconds):
//!   async callers use `tokio::task::spawn_blocking`. Their locks are held
//!   only to look up or insert, never while reading; two concurrent first
//!   calls for one file may both read it, and the later insert wins — both
//!   computed the same value from the same file version.
//!
//! A leaf: no `crate::` imports.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{File, Metadata};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value as Json};

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

/// A metadata value's type, with GGUF's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl ValueType {
    fn from_id(id: u32) -> Option<ValueType> {
        Some(match id {
            0 => ValueType::U8,
            1 => ValueType::I8,
            2 => ValueType::U16,
            3 => ValueType::I16,
            4 => ValueType::U32,
            5 => ValueType::I32,
            6 => ValueType::F32,
            7 => ValueType::Bool,
            8 => ValueType::String,
            9 => ValueType::Array,
            10 => ValueType::U64,
            11 => ValueType::I64,
            12 => ValueType::F64,
            _ => return None,
        })
    }

    /// Bytes per value for the fixed-size types.
    fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    /// Any nonzero byte is `true` (llama.cpp does not check either).
    Bool(bool),
    String(String),
    Array(Array),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// An array value: its element type and length always, its contents only
/// when it has at most [`MAX_HELD_ARRAY`] elements.
#[derive(Debug, Clone, PartialEq)]
pub struct Array {
    pub element: ValueType,
    pub len: u64,
    /// `None` when the array was longer than [`MAX_HELD_ARRAY`].
    pub values: Option<Vec<Value>>,
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as JSON; arrays whose contents were not kept are `null`.
    pub fn to_json(&self) -> Json {
        match self {
            Value::U8(v) => Json::from(*v),
            Value::I8(v) => Json::from(*v),
            Value::U16(v) => Json::from(*v),
            Value::I16(v) => Json::from(*v),
            Value::U32(v) => Json::from(*v),
            Value::I32(v) => Json::from(*v),
            // Through the shortest decimal that round-trips the f32, so
            // 1e-5 stored as f32 shows as 0.00001, not 9.999999747378752e-6.
            Value::F32(v) => float_json(v.to_string().parse().unwrap_or(f64::NAN)),
            Value::Bool(v) => Json::from(*v),
            Value::String(v) => Json::from(v.as_str()),
            Value::Array(a) => match &a.values {
                Some(values) => Json::Array(values.iter().map(Value::to_json).collect()),
                None => Json::Null,
            },
            Value::U64(v) => Json::from(*v),
            Value::I64(v) => Json::from(*v),
            Value::F64(v) => float_json(*v),
        }
    }
}

/// JSON has no NaN or infinity: those become `null`.
fn float_json(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number)
}

/// One tensor's description (its data is not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne[]`: the innermost dimension first.
    pub dims: Vec<u64>,
    /// ggml's `ggml_type` id; see [`ggml_type_name`].
    pub ggml_type: u32,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of elements (the product of `dims`).
    pub fn elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }
}

/// A GGUF file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    version: u32,
    metadata: BTreeMap<String, Value>,
    tensors: Vec<TensorInfo>,
    parameter_count: u64,
}

impl Header {
    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata entry, by key.
    pub fn metadata(&self) -> &BTreeMap<String, Value> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// `general.architecture`, e.g. "llama".
    pub fn architecture(&self) -> Option<&str> {
        self.get("general.architecture").and_then(Value::as_str)
    }

    /// `general.name`.
    pub fn name(&self) -> Option<&str> {
        self.get("general.name").and_then(Value::as_str)
    }

    /// Ollama's `details.family`: the architecture.
    pub fn family(&self) -> Option<&str> {
        self.architecture()
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` id.
    pub fn file_type(&self) -> Option<u32> {
        self.get("general.file_type")
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// Ollama's `details.quantization_level`: the name of
    /// `general.file_type`, or, when the file does not say, of the ggml type
    /// most of its multi-dimensional tensors use (1-D norms stay F32 in
    /// quantized files, so they do not vote); "unknown" when neither tells.
    pub fn quantization_level(&self) -> &'static str {
        if let Some(name) = self.file_type().and_then(file_type_name) {
            return name;
        }
        let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
        for t in self.tensors.iter().filter(|t| t.dims.len() >= 2) {
            *votes.entry(t.ggml_type).or_default() += 1;
        }
        votes
            .into_iter()
            .max_by_key(|&(ty, n)| (n, std::cmp::Reverse(ty)))
            .and_then(|(ty, _)| ggml_type_name(ty))
            .unwrap_or("unknown")
    }

    /// The number of parameters: the sum over tensors of their elements.
    pub fn parameter_count(&self) -> u64 {
        self.parameter_count
    }

    /// Ollama's `details.parameter_size`, e.g. "8.0B", "135M", "4.18M".
    pub fn parameter_size(&self) -> String {
        human_number(self.parameter_count)
    }

    /// `{arch}.context_length`: the context the model was trained for.
    pub fn context_length(&self) -> Option<u64> {
        self.arch_u64("context_length")
    }

    /// `{arch}.embedding_length`.
    pub fn embedding_length(&self) -> Option<u64> {
        self.arch_u64("embedding_length")
    }

    fn arch_u64(&self, suffix: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.{suffix}"))
            .and_then(Value::as_u64)
    }

    /// `tokenizer.chat_template` (Jinja).
    pub fn chat_template(&self) -> Option<&str> {
        self.get("tokenizer.chat_template").and_then(Value::as_str)
    }

    /// Whether the file carries a vision encoder: a `clip.*` key (llama.cpp's
    /// mmproj files) or a `vision` key segment (`{arch}.vision.*`, Ollama's
    /// combined files).
    pub fn has_vision(&self) -> bool {
        self.metadata
            .keys()
            .any(|k| k.starts_with("clip.") || k.split('.').any(|s| s == "vision"))
    }

    /// `model_info` as Ollama's `/api/show` shows it without `verbose`:
    /// every key except `general.name` and `tokenizer.chat_template` (shown
    /// elsewhere in the response), non-empty arrays as `null` (Ollama reads
    /// them with a maximum array size of 0; its docs draw them as `[]`, its
    /// server sends `null`), and `general.parameter_count` set to the sum
    /// over the tensors. Keys are sorted, as Go marshals a map.
    pub fn model_info(&self) -> Map<String, Json> {
        let mut info = Map::new();
        for (key, value) in &self.metadata {
            if key == "general.name" || key == "tokenizer.chat_template" {
                continue;
            }
            let json = match value {
                Value::Array(a) if a.len == 0 => Json::Array(Vec::new()),
                Value::Array(_) => Json::Null,
                other => other.to_json(),
            };
            info.insert(key.clone(), json);
        }
        info.insert(
            "general.parameter_count".to_string(),
            Json::from(self.parameter_count),
        );
        info
    }
}

/// llama.cpp's `llama_ftype` (include/llama.h) → the name Ollama shows.
/// 4 is "MXFP4" as Ollama numbers it (llama.cpp retired 4 and uses 38).
pub fn file_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        4 => "MXFP4",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// ggml's `ggml_type` (ggml/include/ggml.h) → its name; the ids ggml
/// removed have none.
pub fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

/// A count as Ollama's `format.HumanNumber` writes it: "8.0B" (one decimal
/// for billions), "4.18M" (two for millions), whole numbers bare ("7B",
/// "135M"), thousands rounded ("1K"), smaller counts as they are.
pub fn human_number(n: u64) -> String {
    const THOUSAND: u64 = 1_000;
    const MILLION: u64 = 1_000_000;
    const BILLION: u64 = 1_000_000_000;
    let scaled = |unit: u64, decimals: usize, suffix: &str| {
        if n % unit == 0 {
            format!("{}{suffix}", n / unit)
        } else {
            format!("{:.*}{suffix}", decimals, n as f64 / unit as f64)
        }
    };
    if n >= BILLION {
        scaled(BILLION, 1, "B")
    } else if n >= MILLION {
        scaled(MILLION, 2, "M")
    } else if n >= THOUSAND {
        format!("{:.0}K", n as f64 / THOUSAND as f64)
    } else {
        n.to_string()
    }
}

/// CUDA context, cuBLAS workspace and compute buffers of a child with
/// any layer on a GPU: measured real runs put these at a few hundred MiB.
pub const GPU_OVERHEAD_BYTES: u64 = 384 << 20;
/// llama-server's context size when its arguments give none.
const DEFAULT_CONTEXT: u64 = 4096;

/// A first estimate of the GPU memory llama-server takes for this model
/// with these arguments, before it has ever been measured: the offloaded
/// share of the weights (the file's size, by layers: `-ngl`/
/// `--n-gpu-layers`, all when absent or `auto`/-1), the f16 KV cache of
/// those layers for the context (`-c`/`--ctx-size`, else 4096, at most the
/// trained context; 0 = the trained context) from the header's attention
/// dimensions, plus [`GPU_OVERHEAD_BYTES`]. Zero with no layer offloaded.
/// Replaced by the measurement as soon as the model has run.
pub fn vram_estimate(header: &Header, file_size: u64, args: &[String]) -> u64 {
    let layers = header.arch_u64("block_count").unwrap_or(1).max(1);
    let offloaded = match arg_value(args, &["-ngl", "--n-gpu-layers", "--gpu-layers"]) {
        None => layers,
        Some(v) if v == "auto" || v == "all" => layers,
        Some(v) => match v.parse::<i64>() {
            Ok(n) if n < 0 => layers,
            Ok(n) => u64::try_from(n).unwrap_or(0).min(layers),
            Err(_) => layers,
        },
    };
    if offloaded == 0 {
        return 0;
    }
    let weights = if offloaded >= layers {
        file_size
    } else {
        file_size / layers * offloaded
    };
    let trained = header.context_length().unwrap_or(DEFAULT_CONTEXT);
    let context = match arg_value(args, &["-c", "--ctx-size"]).and_then(|v| v.parse::<u64>().ok()) {
        Some(0) => trained,
        Some(n) => n,
        None => DEFAULT_CONTEXT.min(trained),
    };
    let heads = header.arch_u64("attention.head_count").unwrap_or(1).max(1);
    let kv_heads = header.arch_u64("attention.head_count_kv").unwrap_or(heads);
    let embedding = header.embedding_length().unwrap_or(0);
    let key_len = header
        .arch_u64("attention.key_length")
        .unwrap_or(embedding / heads);
    let value_len = header.arch_u64("attention.value_length").unwrap_or(key_len);
    let per_token_layer = kv_heads
        .saturating_mul(key_len + value_len)
        .saturating_mul(2);
    let kv = per_token_layer
        .saturating_mul(context)
        .saturating_mul(offloaded);
    weights
        .saturating_add(kv)
        .saturating_add(GPU_OVERHEAD_BYTES)
}

/// The value after the first of `names` in `args` (`-c 8192` or
/// `--ctx-size=8192`).
fn arg_value<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if names.contains(&a.as_str()) {
            return it.next().map(String::as_str);
        }
        if let Some((name, value)) = a.split_once('=') {
            if names.contains(&name) {
                return Some(value);
            }
        }
    }
    None
}

/// Reads the header of the GGUF file at `path` (through a buffer; the
/// tensor data is never read). Blocks.
pub fn read(path: &Path) -> Result<Header, GgufError> {
    let file = File::open(path).map_err(|source| GgufError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    parse(BufReader::with_capacity(64 << 10, file), path)
}

/// A failure inside the parser, before it is given its context.
struct Fail {
    offset: u64,
    problem: Problem,
}

type Step<T> = Result<T, Fail>;

/// The byte source with its position and the budget of kept string bytes.
struct Reader<R> {
    inner: R,
    offset: u64,
    held: u64,
}

impl<R: Read> Reader<R> {
    fn fail<T>(&self, offset: u64, problem: Problem) -> Step<T> {
        Err(Fail { offset, problem })
    }

    fn fill(&mut self, buf: &mut [u8]) -> Step<()> {
        let start = self.offset;
        let mut done = 0;
        while done < buf.len() {
            match self.inner.read(&mut buf[done..]) {
                Ok(0) => return self.fail(start, Problem::Truncated),
                Ok(n) => {
                    done += n;
                    self.offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(start, Problem::Io(e)),
            }
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Step<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Reads `n` bytes into nothing; `start` is where the skipped item began.
    fn skip(&mut self, n: u64, start: u64) -> Step<()> {
        let copied = match io::copy(&mut (&mut self.inner).take(n), &mut io::sink()) {
            Ok(copied) => copied,
            Err(e) => return self.fail(start, Problem::Io(e)),
        };
        self.offset += copied;
        if copied < n {
            return self.fail(start, Problem::Truncated);
        }
        Ok(())
    }

    /// A length prefix, checked against `limit`.
    fn len(&mut self, limit: u64) -> Step<u64> {
        let start = self.offset;
        let len = self.u64()?;
        if len > limit {
            return self.fail(start, Problem::TooLong { len, limit });
        }
        Ok(len)
    }

    /// A string of at most `limit` bytes, counted against the budget of
    /// kept text. The buffer grows only as bytes arrive.
    fn string(&mut self, limit: u64) -> Step<String> {
        let start = self.offset;
        let len = self.len(limit)?;
        self.held = self.held.saturating_add(len);
        if self.held > MAX_HELD_BYTES {
            return self.fail(start, Problem::TooMuchText);
        }
        let mut bytes = Vec::new();
        let got = match (&mut self.inner).take(len).read_to_end(&mut bytes) {
            Ok(got) => got as u64,
            Err(e) => return self.fail(start, Problem::Io(e)),
        };
        self.offset += got;
        if got < len {
            return self.fail(start, Problem::Truncated);
        }
        Ok(match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        })
    }

    fn value_type(&mut self) -> Step<ValueType> {
        let start = self.offset;
        let id = self.u32()?;
        match ValueType::from_id(id) {
            Some(ty) => Ok(ty),
            None => self.fail(start, Problem::ValueType(id)),
        }
    }

    fn value(&mut self, ty: ValueType, depth: u8) -> Step<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array()?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array()?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array()?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array()?)),
            ValueType::U32 => Value::U32(self.u32()?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array()?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array()?)),
            ValueType::Bool => Value::Bool(self.array::<1>()?[0] != 0),
            ValueType::String => Value::String(self.string(MAX_STRING)?),
            ValueType::Array => Value::Array(self.array_value(depth)?),
            ValueType::U64 => Value::U64(self.u64()?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array()?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array()?)),
        })
    }

    /// An array's element type, length and (when short) contents.
    fn array_value(&mut self, depth: u8) -> Step<Array> {
        let start = self.offset;
        if depth >= MAX_NESTING {
            return self.fail(start, Problem::Nesting);
        }
        let element = self.value_type()?;
        let len = self.len(MAX_ARRAY_LEN)?;
        if len > MAX_HELD_ARRAY {
            self.skip_elements(element, len, depth, start)?;
            return Ok(Array {
                element,
                len,
                values: None,
            });
        }
        let mut values = Vec::new();
        for _ in 0..len {
            values.push(self.value(element, depth + 1)?);
        }
        Ok(Array {
            element,
            len,
            values: Some(values),
        })
    }

    /// Reads through `len` elements of type `element` without keeping them.
    fn skip_elements(&mut self, element: ValueType, len: u64, depth: u8, start: u64) -> Step<()> {
        if let Some(size) = element.fixed_size() {
            let Some(bytes) = len.checked_mul(size) else {
                return self.fail(start, Problem::Overflow);
            };
            return self.skip(bytes, start);
        }
        for _ in 0..len {
            let at = self.offset;
            if element == ValueType::String {
                let n = self.len(MAX_STRING)?;
                self.skip(n, at)?;
            } else {
                if depth + 1 >= MAX_NESTING {
                    return self.fail(at, Problem::Nesting);
                }
                let inner = self.value_type()?;
                let n = self.len(MAX_ARRAY_LEN)?;
                self.skip_elements(inner, n, depth + 1, at)?;
            }
        }
        Ok(())
    }

    fn tensor(&mut self) -> Step<TensorInfo> {
        let name = self.string(MAX_TENSOR_NAME)?;
        let at = self.offset;
        let n_dims = self.u32()?;
        if n_dims > MAX_DIMS {
            return self.fail(at, Problem::Dims(n_dims));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.u64()?);
        }
        let ggml_type = self.u32()?;
        let offset = self.u64()?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        })
    }
}

/// Parses a header from `source`; `path` only names it in errors.
fn parse<R: Read>(source: R, path: &Path) -> Result<Header, GgufError> {
    let mut r = Reader {
        inner: source,
        offset: 0,
        held: 0,
    };
    let bad = |what: &dyn fmt::Display, fail: Fail| GgufError::Bad {
        path: path.to_path_buf(),
        what: what.to_string(),
        offset: fail.offset,
        problem: fail.problem,
    };
    let magic: [u8; 4] = r.array().map_err(|f| bad(&"the magic", f))?;
    if &magic != b"GGUF" {
        return Err(bad(
            &"the magic",
            Fail {
                offset: 0,
                problem: Problem::Magic(magic),
            },
        ));
    }
    let version = r.u32().map_err(|f| bad(&"the version", f))?;
    if version != 2 && version != 3 {
        return Err(bad(
            &"the version",
            Fail {
                offset: 4,
                problem: Problem::Version(version),
            },
        ));
    }
    let count = |r: &mut Reader<R>, limit: u64| -> Step<u64> {
        let at = r.offset;
        let n = r.u64()?;
        if n > limit {
            return r.fail(at, Problem::TooMany { count: n, limit });
        }
        Ok(n)
    };
    let tensor_count = count(&mut r, MAX_TENSORS).map_err(|f| bad(&"the tensor count", f))?;
    let kv_count = count(&mut r, MAX_KV).map_err(|f| bad(&"the metadata count", f))?;

    let mut metadata = BTreeMap::new();
    for i in 0..kv_count {
        let key_at = r.offset;
        let key = r
            .string(MAX_STRING)
            .map_err(|f| bad(&format_args!("the key of metadata entry {i}"), f))?;
        let what = || format!("the value of `{key}`");
        let ty = r.value_type().map_err(|f| bad(&what(), f))?;
        let value = r.value(ty, 0).map_err(|f| bad(&what(), f))?;
        if metadata.contains_key(&key) {
            return Err(bad(
                &format_args!("metadata entry {i}"),
                Fail {
                    offset: key_at,
                    problem: Problem::DuplicateKey(key),
                },
            ));
        }
        metadata.insert(key, value);
    }

    let mut tensors = Vec::with_capacity(tensor_count.min(256) as usize);
    let mut parameter_count = 0u64;
    for i in 0..tensor_count {
        let at = r.offset;
        let tensor = r
            .tensor()
            .map_err(|f| bad(&format_args!("the info of tensor {i}"), f))?;
        let overflow = || {
            bad(
                &format_args!("tensor {i} (`{}`)", tensor.name),
                Fail {
                    offset: at,
                    problem: Problem::Overflow,
                },
            )
        };
        let elements = tensor.elements().ok_or_else(overflow)?;
        parameter_count = parameter_count.checked_add(elements).ok_or_else(overflow)?;
        tensors.push(tensor);
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        parameter_count,
    })
}

/// Which version of a file a cache entry was computed from. Any write
/// moves mtime and ctime; a replacement by rename changes the inode; ctime
/// cannot be set back by `touch` or `rsync -t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// How many times a file that changes under the reader is read again.
const ATTEMPTS: usize = 3;

/// Values computed from a whole file, one per path, kept while the file's
/// [`Stamp`] stays the same. The lock guards only the map.
struct Cache<T> {
    entries: Mutex<HashMap<PathBuf, (Stamp, T)>>,
    computed: AtomicU64,
}

enum CacheError<E> {
    Stat(io::Error),
    Compute(E),
    Changed,
}

impl<T: Clone> Cache<T> {
    fn new() -> Self {
        Cache {
            entries: Mutex::new(HashMap::new()),
            computed: AtomicU64::new(0),
        }
    }

    fn get<E>(
        &self,
        path: &Path,
        compute: impl Fn(&Path) -> Result<T, E>,
    ) -> Result<T, CacheError<E>> {
        for _ in 0..ATTEMPTS {
            let before = match std::fs::metadata(path) {
                Ok(meta) => Stamp::of(&meta),
                Err(e) => {
                    self.lock().remove(path);
                    return Err(CacheError::Stat(e));
                }
            };
            if let Some((stamp, value)) = self.lock().get(path) {
                if *stamp == before {
                    return Ok(value.clone());
                }
            }
            self.computed.fetch_add(1, Ordering::Relaxed);
            let value = compute(path).map_err(CacheError::Compute)?;
            let after = std::fs::metadata(path).map_err(CacheError::Stat)?;
            if Stamp::of(&after) == before {
                self.lock()
                    .insert(path.to_path_buf(), (before, value.clone()));
                return Ok(value);
            }
        }
        Err(CacheError::Changed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (Stamp, T)>> {
        // The map is consistent after every statement; a panic elsewhere
        // while it was locked leaves nothing half-done.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// SHA-256 digests of whole files, computed once per file version.
///
/// Blocking: hashing reads the whole file (seconds for a large model); call
/// it from `spawn_blocking`. `Send + Sync`; share it behind an `Arc`.
pub struct Digests {
    cache: Cache<String>,
}

impl Default for Digests {
    fn default() -> Self {
        Digests::new()
    }
}

impl Digests {
    pub fn new() -> Self {
        Digests {
            cache: Cache::new(),
        }
    }

    /// The file's SHA-256 as 64 lowercase hex digits, without a `sha256:`
    /// prefix (Ollama's `/api/tags` shows the bare hex); cached until the
    /// file's size, mtime, ctime or inode changes.
    pub fn digest(&self, path: &Path) -> io::Result<String> {
        self.cache.get(path, sha256_file).map_err(|e| match e {
            CacheError::Stat(e) | CacheError::Compute(e) => e,
            CacheError::Changed => io::Error::other(format!(
                "{}: the file kept changing while it was hashed",
                path.display()
            )),
        })
    }

    /// How many times a file has been hashed (each cache miss), for tests
    /// and metrics.
    pub fn hashed(&self) -> u64 {
        self.cache.computed.load(Ordering::Relaxed)
    }
}

fn sha256_file(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Parsed headers, read once per file version (`/api/tags` asks for every
/// model's on every call).
///
/// Blocking (file I/O); call it from `spawn_blocking`. `Send + Sync`.
pub struct Headers {
    cache: Cache<Arc<Header>>,
}

impl Default for Headers {
    fn default() -> Self {
        Headers::new()
    }
}

impl Headers {
    pub fn new() -> Self {
        Headers {
            cache: Cache::new(),
        }
    }

    /// The header of the file at `path`, as [`read`] gives it.
    pub fn read(&self, path: &Path) -> Result<Arc<Header>, GgufError> {
        self.cache
            .get(path, |p| read(p).map(Arc::new))
            .map_err(|e| match e {
                CacheError::Compute(e) => e,
                CacheError::Stat(source) => GgufError::Open {
                    path: path.to_path_buf(),
                    source,
                },
                CacheError::Changed => GgufError::Changed {
                    path: path.to_path_buf(),
                },
            })
    }

    /// How many times a header has been read from disk (each cache miss).
    pub fn reads(&self) -> u64 {
        self.cache.computed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Writes GGUF bytes by hand, field by field, as the spec lays them out.
    struct Builder {
        version: u32,
        kvs: Vec<u8>,
        n_kv: u64,
        tensors: Vec<u8>,
        n_tensors: u64,
    }

    fn gstr(s: &[u8]) -> Vec<u8> {
        let mut out = (s.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(s);
        out
    }

    impl Builder {
        fn new(version: u32) -> Self {
            Builder {
                version,
                kvs: Vec::new(),
                n_kv: 0,
                tensors: Vec::new(),
                n_tensors: 0,
            }
        }

        /// A key with a raw type id and payload.
        fn kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
            self.kvs.extend(gstr(key.as_bytes()));
            self.kvs.extend(ty.to_le_bytes());
            self.kvs.extend_from_slice(payload);
            self.n_kv += 1;
            self
        }

        fn string(self, key: &str, value: &str) -> Self {
            self.kv(key, 8, &gstr(value.as_bytes()))
        }

        fn u32(self, key: &str, value: u32) -> Self {
            self.kv(key, 4, &value.to_le_bytes())
        }

        fn tensor(mut self, name: &str, dims: &[u64], ty: u32) -> Self {
            self.tensors.extend(gstr(name.as_bytes()));
            self.tensors.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                self.tensors.extend(d.to_le_bytes());
            }
            self.tensors.extend(ty.to_le_bytes());
            self.tensors.extend(0u64.to_le_bytes());
            self.n_tensors += 1;
            self
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend(self.version.to_le_bytes());
            out.extend(self.n_tensors.to_le_bytes());
            out.extend(self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kvs);
            out.extend_from_slice(&self.tensors);
            out
        }
    }

    fn array_payload(elem: u32, len: u64, body: &[u8]) -> Vec<u8> {
        let mut out = elem.to_le_bytes().to_vec();
        out.extend(len.to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// One key of every value type, short and long arrays, nested arrays
    /// and two tensors.
    fn every_type(version: u32) -> Builder {
        let strings: Vec<u8> = (0..100u32)
            .flat_map(|i| gstr(format!("tok{i}").as_bytes()))
            .collect();
        let nested: Vec<u8> = [array_payload(4, 2, &[1, 0, 0, 0, 2, 0, 0, 0])]
            .concat()
            .repeat(2);
        Builder::new(version)
            .string("general.architecture", "llama")
            .string("general.name", "hand made")
            .kv("t.u8", 0, &[200])
            .kv("t.i8", 1, &(-5i8).to_le_bytes())
            .kv("t.u16", 2, &60000u16.to_le_bytes())
            .kv("t.i16", 3, &(-30000i16).to_le_bytes())
            .u32("t.u32", 4_000_000_000)
            .kv("t.i32", 5, &(-2_000_000_000i32).to_le_bytes())
            .kv("t.f32", 6, &1.5f32.to_le_bytes())
            .kv("t.bool", 7, &[1])
            .string("t.string", "héllo")
            .kv("t.u64", 10, &u64::MAX.to_le_bytes())
            .kv("t.i64", 11, &i64::MIN.to_le_bytes())
            .kv("t.f64", 12, &(-0.25f64).to_le_bytes())
            .kv(
                "t.short",
                9,
                &array_payload(5, 3, &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]),
            )
            .kv("t.empty", 9, &array_payload(6, 0, &[]))
            .kv("t.long_u8", 9, &array_payload(0, 1000, &[7; 1000]))
            .kv("t.long_str", 9, &array_payload(8, 100, &strings))
            .kv("t.nested", 9, &array_payload(9, 2, &nested))
            .tensor("a.weight", &[3, 4], 0)
            .tensor("b.weight", &[5], 1)
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Header, GgufError> {
        parse(bytes, Path::new("test.gguf"))
    }

    fn problem(bytes: &[u8]) -> (u64, Problem) {
        match parse_bytes(bytes) {
            Err(GgufError::Bad {
                offset, problem, ..
            }) => (offset, problem),
            other => panic!("expected a Bad error, got {other:?}"),
        }
    }

    #[test]
    fn every_value_type_in_v2_and_v3() {
        for version in [2, 3] {
            let h = parse_bytes(&every_type(version).bytes()).unwrap();
            assert_eq!(h.version(), version);
            let get = |k: &str| h.get(k).unwrap().clone();
            assert_eq!(get("t.u8"), Value::U8(200));
            assert_eq!(get("t.i8"), Value::I8(-5));
            assert_eq!(get("t.u16"), Value::U16(60000));
            assert_eq!(get("t.i16"), Value::I16(-30000));
            assert_eq!(get("t.u32"), Value::U32(4_000_000_000));
            assert_eq!(get("t.i32"), Value::I32(-2_000_000_000));
            assert_eq!(get("t.f32"), Value::F32(1.5));
            assert_eq!(get("t.bool"), Value::Bool(true));
            assert_eq!(get("t.string"), Value::String("héllo".into()));
            assert_eq!(get("t.u64"), Value::U64(u64::MAX));
            assert_eq!(get("t.i64"), Value::I64(i64::MIN));
            assert_eq!(get("t.f64"), Value::F64(-0.25));
            assert_eq!(
                get("t.short"),
                Value::Array(Array {
                    element: ValueType::I32,
                    len: 3,
                    values: Some(vec![Value::I32(1), Value::I32(2), Value::I32(3)]),
                })
            );
            let long = |k: &str, element| {
                let Value::Array(a) = get(k) else {
                    panic!("{k} is not an array")
                };
                assert_eq!((a.element, a.values), (element, None), "{k}");
                a.len
            };
            assert_eq!(long("t.long_u8", ValueType::U8), 1000);
            assert_eq!(long("t.long_str", ValueType::String), 100);
            let Value::Array(nested) = get("t.nested") else {
                panic!("not an array")
            };
            assert_eq!(nested.element, ValueType::Array);
            let inner = nested.values.unwrap();
            assert_eq!(inner.len(), 2);
            assert_eq!(inner[1].to_json(), serde_json::json!([1, 2]));
            assert_eq!(h.tensors().len(), 2);
            assert_eq!(h.tensors()[0].dims, vec![3, 4]);
            assert_eq!(h.tensors()[1].ggml_type, 1);
            assert_eq!(h.parameter_count(), 12 + 5);
            assert_eq!(h.name(), Some("hand made"));
        }
    }

    #[test]
    fn model_info_is_what_ollama_shows() {
        let h = parse_bytes(&every_type(3).bytes()).unwrap();
        let info = h.model_info();
        assert_eq!(info["general.architecture"], "llama");
        assert_eq!(info["general.parameter_count"], 17);
        assert!(!info.contains_key("general.name"));
        assert_eq!(info["t.f32"], 1.5);
        assert_eq!(info["t.u64"], u64::MAX);
        assert_eq!(info["t.long_str"], Json::Null);
        assert_eq!(info["t.short"], Json::Null);
        assert_eq!(info["t.empty"], serde_json::json!([]));
        // every key but general.name, plus general.parameter_count
        assert_eq!(info.len(), h.metadata().len());
    }

    #[test]
    fn version_1_and_other_versions_are_refused_by_name() {
        for version in [0, 1, 4, u32::MAX] {
            let mut bytes = every_type(3).bytes();
            bytes[4..8].copy_from_slice(&version.to_le_bytes());
            let (offset, p) = problem(&bytes);
            assert_eq!(offset, 4);
            assert!(matches!(p, Problem::Version(v) if v == version), "{p}");
        }
        let mut bytes = every_type(3).bytes();
        bytes[4..8].copy_from_slice(&1u32.to_le_bytes());
        let message = parse_bytes(&bytes).unwrap_err().to_string();
        assert!(message.contains("version 1 is not supported"), "{message}");
        assert!(message.contains("test.gguf"), "{message}");
    }

    #[test]
    fn a_wrong_magic_is_not_gguf() {
        let mut bytes = every_type(3).bytes();
        bytes[..4].copy_from_slice(b"GGML");
        let (offset, p) = problem(&bytes);
        assert_eq!(offset, 0);
        assert!(matches!(p, Problem::Magic(m) if &m == b"GGML"));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = every_type(3).bytes();
        assert!(parse_bytes(&bytes).is_ok());
        for len in 0..bytes.len() {
            match parse_bytes(&bytes[..len]) {
                Err(GgufError::Bad {
                    problem: Problem::Truncated,
                    offset,
                    ..
                }) => assert!(offset <= len as u64, "cut at {len}: offset {offset}"),
                other => panic!("cut at {len}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_name_the_key_and_offset() {
        let bytes = Builder::new(3)
            .string("general.architecture", "llama")
            .kv("bad.type", 13, &[0; 8])
            .bytes();
        let err = parse_bytes(&bytes).unwrap_err();
        let offset = 24 + gstr(b"general.architecture").len() + 4 + gstr(b"llama").len();
        let type_at = offset + gstr(b"bad.type").len();
        match &err {
            GgufError::Bad {
                what,
                offset,
                problem: Problem::ValueType(13),
                ..
            } => {
                assert_eq!(what, "the value of `bad.type`");
                assert_eq!(*offset, type_at as u64);
            }
            other => panic!("{other:?}"),
        }
        assert!(
            err.to_string().contains(&format!("at byte {type_at}")),
            "{err}"
        );
    }

    #[test]
    fn huge_declared_lengths_are_refused_without_allocating() {
        // A string claiming u64::MAX bytes.
        let (_, p) = problem(&Builder::new(3).kv("k", 8, &u64::MAX.to_le_bytes()).bytes());
        assert!(matches!(p, Problem::TooLong { len: u64::MAX, .. }), "{p}");
        // A string just under the cap with nothing behind it: truncated,
        // and the buffer only ever held what arrived.
        let (_, p) = problem(
            &Builder::new(3)
                .kv("k", 8, &MAX_STRING.to_le_bytes())
                .bytes(),
        );
        assert!(matches!(p, Problem::Truncated), "{p}");
        // A key that is too long.
        let mut bytes = Builder::new(3).bytes();
        bytes[16..24].copy_from_slice(&1u64.to_le_bytes());
        bytes.extend((MAX_STRING + 1).to_le_bytes());
        assert!(matches!(problem(&bytes).1, Problem::TooLong { .. }));
        // Arrays: over the element cap, and an element size overflow cannot
        // happen under it, but a u64 array of 2^32 is just skipped → truncated.
        let (_, p) = problem(
            &Builder::new(3)
                .kv("k", 9, &array_payload(0, u64::MAX, &[]))
                .bytes(),
        );
        assert!(matches!(p, Problem::TooLong { .. }), "{p}");
        let (_, p) = problem(
            &Builder::new(3)
                .kv("k", 9, &array_payload(10, MAX_ARRAY_LEN, &[]))
                .bytes(),
        );
        assert!(matches!(p, Problem::Truncated), "{p}");
        let (_, p) = problem(
            &Builder::new(3)
                .kv("k", 9, &array_payload(8, MAX_ARRAY_LEN, &[]))
                .bytes(),
        );
        assert!(matches!(p, Problem::Truncated), "{p}");
        // Counts.
        let mut bytes = Builder::new(3).bytes();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(problem(&bytes), (8, Problem::TooMany { .. })));
        let mut bytes = Builder::new(3).bytes();
        bytes[16..24].copy_from_slice(&(MAX_KV + 1).to_le_bytes());
        assert!(matches!(problem(&bytes), (16, Problem::TooMany { .. })));
        // Tensors: too many dimensions, elements overflowing.
        let mut b = Builder::new(3);
        b.tensors.extend(gstr(b"t"));
        b.tensors.extend(5u32.to_le_bytes());
        b.n_tensors = 1;
        assert!(matches!(problem(&b.bytes()).1, Problem::Dims(5)));
        let b = Builder::new(3).tensor("t", &[u64::MAX, 2], 0);
        assert!(matches!(problem(&b.bytes()).1, Problem::Overflow));
        let b = Builder::new(3)
            .tensor("t", &[u64::MAX], 0)
            .tensor("u", &[1], 0);
        assert!(matches!(problem(&b.bytes()).1, Problem::Overflow));
    }

    #[test]
    fn nesting_and_duplicates_are_refused() {
        // An array of arrays of arrays ... deeper than the limit, both kept
        // (short) and skipped (long).
        for outer_len in [1u64, MAX_HELD_ARRAY + 1] {
            let mut payload = Vec::new();
            for _ in 0..MAX_NESTING + 1 {
                payload.extend(9u32.to_le_bytes());
                payload.extend(outer_len.to_le_bytes());
            }
            let (_, p) = problem(&Builder::new(3).kv("deep", 9, &payload).bytes());
            assert!(matches!(p, Problem::Nesting), "{outer_len}: {p}");
        }
        // As deep as allowed: arrays of arrays down to an array of u8.
        let mut payload = Vec::new();
        for _ in 0..MAX_NESTING - 1 {
            payload.extend(array_payload(9, 1, &[])[..12].to_vec());
        }
        payload.extend(array_payload(0, 1, &[5]));
        let h = parse_bytes(&Builder::new(3).kv("deep", 9, &payload).bytes()).unwrap();
        let mut v = h.get("deep").unwrap().to_json();
        for _ in 0..MAX_NESTING {
            v = v[0].clone();
        }
        assert_eq!(v, 5);
        let bytes = Builder::new(3).u32("k", 1).u32("k", 2).bytes();
        assert!(matches!(problem(&bytes).1, Problem::DuplicateKey(k) if k == "k"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_after_the_magic_never_panic(
            version in prop_oneof![Just(2u32), Just(3u32), any::<u32>()],
            counts in (0u64..8, 0u64..8),
            tail in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend(version.to_le_bytes());
            bytes.extend(counts.0.to_le_bytes());
            bytes.extend(counts.1.to_le_bytes());
            bytes.extend(tail);
            let _ = parse_bytes(&bytes);
        }

        #[test]
        fn corrupting_a_valid_file_never_panics(
            at in 0usize..4096,
            with in any::<u8>(),
        ) {
            let mut bytes = every_type(3).bytes();
            let at = at % bytes.len();
            bytes[at] = with;
            let _ = parse_bytes(&bytes);
        }
    }

    #[test]
    fn the_vram_estimate_counts_offloaded_weights_kv_cache_and_overhead() {
        // 32 layers, 4096 wide, 32 heads of which 8 hold K/V (GQA), trained
        // for 8192 tokens.
        let header = parse_bytes(
            &Builder::new(3)
                .string("general.architecture", "llama")
                .u32("llama.block_count", 32)
                .u32("llama.embedding_length", 4096)
                .u32("llama.attention.head_count", 32)
                .u32("llama.attention.head_count_kv", 8)
                .u32("llama.context_length", 8192)
                .bytes(),
        )
        .unwrap();
        let file = 4u64 << 30;
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // K and V: 8 heads x 128 dims x 2 bytes each, per token and layer.
        let kv_per_token_layer = 8 * 128 * 2 * 2;
        let all = vram_estimate(&header, file, &[]);
        assert_eq!(
            all,
            file + kv_per_token_layer * 4096 * 32 + GPU_OVERHEAD_BYTES,
            "all layers, the default 4096 context"
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["-c", "8192"])),
            file + kv_per_token_layer * 8192 * 32 + GPU_OVERHEAD_BYTES
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["--ctx-size=0"])),
            file + kv_per_token_layer * 8192 * 32 + GPU_OVERHEAD_BYTES,
            "0 is the trained context"
        );
        assert_eq!(
            vram_estimate(&header, file, &args(&["-ngl", "16"])),
            file / 2 + kv_per_token_layer * 4096 * 16 + GPU_OVERHEAD_BYTES,
            "half the layers, half the weights and half the cache"
        );
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "0"])), 0);
        assert_eq!(
            vram_estimate(&header, file, &args(&["--n-gpu-layers", "-1"])),
            all
        );
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "auto"])), all);
        assert_eq!(vram_estimate(&header, file, &args(&["-ngl", "999"])), all);
    }

    #[test]
    fn quantization_names() {
        let with_ftype =
            |ft: u32| parse_bytes(&Builder::new(3).u32("general.file_type", ft).bytes()).unwrap();
        for (ft, name) in [
            (0, "F32"),
            (1, "F16"),
            (2, "Q4_0"),
            (7, "Q8_0"),
            (15, "Q4_K_M"),
            (18, "Q6_K"),
            (28, "IQ2_S"),
            (30, "IQ4_XS"),
            (32, "BF16"),
            (999, "unknown"),
        ] {
            assert_eq!(with_ftype(ft).quantization_level(), name, "{ft}");
        }
        // Without general.file_type: the type most 2-D tensors have.
        let h = parse_bytes(
            &Builder::new(3)
                .tensor("norm", &[64], 0)
                .tensor("norm2", &[64], 0)
                .tensor("q", &[64, 64], 12)
                .tensor("k", &[64, 64], 12)
                .tensor("out", &[64, 64], 14)
                .bytes(),
        )
        .unwrap();
        assert_eq!(h.file_type(), None);
        assert_eq!(h.quantization_level(), "Q4_K");
        assert_eq!(
            parse_bytes(&Builder::new(3).bytes())
                .unwrap()
                .quantization_level(),
            "unknown"
        );
    }

    #[test]
    fn parameter_sizes_as_ollama_writes_them() {
        for (n, shown) in [
            (8_030_261_248u64, "8.0B"),
            (7_000_000_000, "7B"),
            (7_615_616_512, "7.6B"),
            (135_000_000, "135M"),
            (4_178_240, "4.18M"),
            (1_200, "1K"),
            (999, "999"),
            (0, "0"),
        ] {
            assert_eq!(human_number(n), shown, "{n}");
        }
    }

    #[test]
    fn vision_is_seen_from_its_keys() {
        let h = |key: &str| {
            parse_bytes(&Builder::new(3).u32(key, 1).bytes())
                .unwrap()
                .has_vision()
        };
        assert!(h("clip.has_vision_encoder"));
        assert!(h("gemma3.vision.block_count"));
        assert!(!h("llama.context_length"));
        assert!(!h("general.visionary"));
    }

    /// The chat template tests/tools/make-tiny-model.py writes.
    const TINY_TEMPLATE: &str = "{% for message in messages %}\
        {{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\
        {% endfor %}\
        {% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    fn tiny_model() -> Option<PathBuf> {
        match std::env::var_os("CLARACORE_TEST_MODEL") {
            Some(p) => Some(PathBuf::from(p)),
            None => {
                eprintln!(
                    "CLARACORE_TEST_MODEL is unset: skipping (see tests/tools/setup-test-deps.sh)"
                );
                None
            }
        }
    }

    #[test]
    fn the_tiny_model_reads_as_the_script_wrote_it() {
        let Some(path) = tiny_model() else { return };
        let h = read(&path).unwrap();
        assert_eq!(h.version(), 3);
        assert_eq!(h.architecture(), Some("llama"));
        assert_eq!(h.family(), Some("llama"));
        assert_eq!(h.name(), Some("claracore-tiny-llama-seed0"));
        assert_eq!(h.context_length(), Some(2048));
        assert_eq!(h.embedding_length(), Some(64));
        assert_eq!(h.chat_template(), Some(TINY_TEMPLATE));
        assert_eq!(h.file_type(), Some(0));
        assert_eq!(h.quantization_level(), "F32");
        assert!(!h.has_vision());

        // The tokenizer list is known by type and length only.
        let Some(Value::Array(tokens)) = h.get("tokenizer.ggml.tokens") else {
            panic!("no token list")
        };
        assert_eq!(tokens.element, ValueType::String);
        assert_eq!(tokens.values, None);
        let n_vocab = tokens.len;
        assert_eq!(
            h.get("llama.vocab_size").and_then(Value::as_u64),
            Some(n_vocab)
        );

        // The script's shapes: N_LAYER 2, N_EMBD 64, 4 heads of 16, N_FF 128.
        let (n_layer, n_embd, n_ff, n_q, n_kv) = (2, 64, 128, 64, 64);
        let per_layer = 2 * n_embd // attn_norm, ffn_norm
            + n_embd * n_q + 2 * n_embd * n_kv + n_q * n_embd // q, k, v, output
            + 3 * n_embd * n_ff; // gate, up, down
        let expected = 2 * n_vocab * n_embd + n_layer * per_layer + n_embd;
        assert_eq!(h.parameter_count(), expected);
        assert_eq!(h.tensors().len(), 3 + 9 * n_layer as usize);
        assert_eq!(h.tensors()[0].name, "token_embd.weight");
        assert_eq!(h.tensors()[0].dims, vec![n_embd, n_vocab]);
        assert_eq!(h.parameter_size(), human_number(expected));

        let info = h.model_info();
        assert_eq!(info["general.architecture"], "llama");
        assert_eq!(info["general.parameter_count"], expected);
        assert_eq!(info["llama.context_length"], 2048);
        assert_eq!(info["llama.attention.layer_norm_rms_epsilon"], 1e-5);
        assert_eq!(info["tokenizer.ggml.tokens"], Json::Null);
        assert_eq!(info["tokenizer.ggml.add_bos_token"], true);
        assert!(!info.contains_key("tokenizer.chat_template"));
    }

    /// What the official `gguf` Python package (llama.cpp's gguf-py, in the
    /// test venv) reads from the same file: every key with its value, or
    /// `[element type, length]` for arrays, and every tensor's name, ne[]
    /// and type.
    const GGUF_PY_DUMP: &str = r#"
import json, sys
import gguf
r = gguf.GGUFReader(sys.argv[1])
out = {"kv": {}, "tensors": []}
for key, f in r.fields.items():
    if key.startswith("GGUF."):
        continue
    t = gguf.GGUFValueType(f.types[0])
    if t == gguf.GGUFValueType.ARRAY:
        out["kv"][key] = [int(f.types[-1]), len(f.data)]
    else:
        v = f.contents()
        out["kv"][key] = v if not isinstance(v, float) else repr(v)
for t in r.tensors:
    out["tensors"].append([t.name, [int(d) for d in t.shape], int(t.tensor_type)])
print(json.dumps(out))
"#;

    #[test]
    fn the_tiny_model_reads_as_gguf_py_reads_it() {
        let Some(path) = tiny_model() else { return };
        let Some(python) = std::env::var_os("CLARACORE_TEST_PYTHON") else {
            eprintln!("CLARACORE_TEST_PYTHON is unset: skipping");
            return;
        };
        let out = std::process::Command::new(python)
            .arg("-c")
            .arg(GGUF_PY_DUMP)
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs: Json = serde_json::from_slice(&out.stdout).unwrap();
        let h = read(&path).unwrap();

        let kv = theirs["kv"].as_object().unwrap();
        assert_eq!(kv.len(), h.metadata().len());
        for (key, expected) in kv {
            let ours = h.get(key).unwrap_or_else(|| panic!("{key} missing"));
            match ours {
                Value::Array(a) => {
                    assert_eq!(
                        *expected,
                        serde_json::json!([a.element as u32, a.len]),
                        "{key}"
                    )
                }
                Value::F32(f) => assert_eq!(
                    expected.as_str().unwrap().parse::<f64>().unwrap(),
                    f64::from(*f),
                    "{key}"
                ),
                other => assert_eq!(other.to_json(), *expected, "{key}"),
            }
        }
        let tensors: Vec<Json> = h
            .tensors()
            .iter()
            .map(|t| serde_json::json!([t.name, t.dims, t.ggml_type]))
            .collect();
        assert_eq!(theirs["tensors"], Json::Array(tensors));
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn the_caches_are_send_and_sync() {
        assert_send_sync::<Digests>();
        assert_send_sync::<Headers>();
        assert_send_sync::<Header>();
    }

    fn sha256sum(path: &Path) -> String {
        let out = std::process::Command::new("sha256sum")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()[..64].to_string()
    }

    /// Sets the file's mtime, so a rewrite is seen even on a coarse clock.
    fn set_mtime(path: &Path, secs: u64) {
        let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
        file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
            .unwrap();
    }

    #[test]
    fn digests_match_sha256sum_and_are_cached_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, vec![0xabu8; 3 << 20]).unwrap();
        let digests = Digests::new();

        let first = digests.digest(&path).unwrap();
        assert_eq!(first, sha256sum(&path));
        assert_eq!(first.len(), 64);
        assert_eq!(digests.hashed(), 1);
        assert_eq!(digests.digest(&path).unwrap(), first);
        assert_eq!(digests.hashed(), 1, "the second call must not hash again");

        // Same size, different bytes, mtime set apart.
        std::fs::write(&path, vec![0xcdu8; 3 << 20]).unwrap();
        set_mtime(&path, 1_000_000);
        let second = digests.digest(&path).unwrap();
        assert_ne!(second, first);
        assert_eq!(second, sha256sum(&path));
        assert_eq!(digests.hashed(), 2);

        // Different size.
        std::fs::write(&path, b"short").unwrap();
        let third = digests.digest(&path).unwrap();
        assert_eq!(third, sha256sum(&path));
        assert_ne!(third, second);
        assert_eq!(digests.digest(&path).unwrap(), third);
        assert_eq!(digests.hashed(), 3);

        // Replaced by rename with the same size and mtime: a new inode.
        let other = dir.path().join("other");
        std::fs::write(&other, b"SHORT").unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&other)
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(digests.digest(&path).unwrap(), sha256sum(&path));
        assert_eq!(digests.hashed(), 4);

        // A missing file is an error, not a stale answer.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            digests.digest(&path).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn digests_from_many_threads_agree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(
            &path,
            (0..1_000_000u32)
                .flat_map(u32::to_le_bytes)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let digests = Arc::new(Digests::new());
        let results: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| digests.digest(&path).unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let expected = sha256sum(&path);
        assert!(results.iter().all(|r| *r == expected));
        let hashed = digests.hashed();
        assert!((1..=4).contains(&hashed), "{hashed}");
        digests.digest(&path).unwrap();
        assert_eq!(digests.hashed(), hashed);
    }

    #[test]
    fn headers_are_cached_per_file_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        std::fs::write(&path, every_type(3).bytes()).unwrap();
        let headers = Headers::new();
        let first = headers.read(&path).unwrap();
        assert_eq!(first.name(), Some("hand made"));
        let again = headers.read(&path).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(headers.reads(), 1);

        std::fs::write(
            &path,
            Builder::new(2).string("general.name", "rewritten").bytes(),
        )
        .unwrap();
        set_mtime(&path, 2_000_000);
        let changed = headers.read(&path).unwrap();
        assert_eq!(changed.name(), Some("rewritten"));
        assert_eq!(changed.version(), 2);
        assert_eq!(headers.reads(), 2);

        // A bad file is an error naming the path; it is not cached as good.
        std::fs::write(&path, b"GGUF\x01\0\0\0").unwrap();
        let err = headers.read(&path).unwrap_err();
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(matches!(
            headers.read(&dir.path().join("absent")),
            Err(GgufError::Open { .. })
        ));
    }
}
