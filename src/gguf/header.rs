//! A GGUF file's header: the parse of its fixed fields (magic, version,
//! counts), every metadata entry and every tensor info, into a [`Header`]
//! with the accessors the Ollama routes and the estimate read. The tensor
//! data is never read.
//!
//! Invariant: a parsed header has version 2 or 3, unique keys and a
//! parameter count that did not overflow; any failure is a
//! [`GgufError::Bad`] naming what was being read and where.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value as Json};

use super::names;
use super::reader::{Fail, Reader, Step, Value};
use super::{GgufError, Problem, MAX_DIMS, MAX_KV, MAX_STRING, MAX_TENSORS, MAX_TENSOR_NAME};

/// One tensor's description (its data is not read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    /// ggml's `ne[]`: the innermost dimension first.
    pub dims: Vec<u64>,
    /// ggml's `ggml_type` id; see [`names::ggml_type_name`].
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
        self.get(names::ARCHITECTURE).and_then(Value::as_str)
    }

    /// `general.name`.
    pub fn name(&self) -> Option<&str> {
        self.get(names::NAME).and_then(Value::as_str)
    }

    /// Ollama's `details.family`: the architecture.
    pub fn family(&self) -> Option<&str> {
        self.architecture()
    }

    /// `general.file_type`: llama.cpp's `llama_ftype` id.
    pub fn file_type(&self) -> Option<u32> {
        self.get(names::FILE_TYPE)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// Ollama's `details.quantization_level`: the name of
    /// `general.file_type`, or, when the file does not say, of the ggml type
    /// most of its multi-dimensional tensors use (1-D norms stay F32 in
    /// quantized files, so they do not vote); "unknown" when neither tells.
    pub fn quantization_level(&self) -> &'static str {
        if let Some(name) = self.file_type().and_then(names::file_type_name) {
            return name;
        }
        let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
        for t in self.tensors.iter().filter(|t| t.dims.len() >= 2) {
            *votes.entry(t.ggml_type).or_default() += 1;
        }
        votes
            .into_iter()
            .max_by_key(|&(ty, n)| (n, std::cmp::Reverse(ty)))
            .and_then(|(ty, _)| names::ggml_type_name(ty))
            .unwrap_or("unknown")
    }

    /// The number of parameters: the sum over tensors of their elements.
    pub fn parameter_count(&self) -> u64 {
        self.parameter_count
    }

    /// Ollama's `details.parameter_size`, e.g. "8.0B", "135M", "4.18M".
    pub fn parameter_size(&self) -> String {
        names::human_number(self.parameter_count)
    }

    /// `{arch}.context_length`: the context the model was trained for.
    pub fn context_length(&self) -> Option<u64> {
        self.arch_u64(names::CONTEXT_LENGTH)
    }

    /// `{arch}.embedding_length`.
    pub fn embedding_length(&self) -> Option<u64> {
        self.arch_u64(names::EMBEDDING_LENGTH)
    }

    /// `{arch}.{suffix}` as an unsigned integer, e.g. `llama.block_count`
    /// for "block_count" (the suffixes are in [`names`]).
    pub fn arch_u64(&self, suffix: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.get(&format!("{arch}.{suffix}"))
            .and_then(Value::as_u64)
    }

    /// `tokenizer.chat_template` (Jinja).
    pub fn chat_template(&self) -> Option<&str> {
        self.get(names::CHAT_TEMPLATE).and_then(Value::as_str)
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
            if key == names::NAME || key == names::CHAT_TEMPLATE {
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
            names::PARAMETER_COUNT.to_string(),
            Json::from(self.parameter_count),
        );
        info
    }
}

/// One tensor info: name, dimensions, ggml type, data offset.
fn tensor<R: Read>(r: &mut Reader<R>) -> Step<TensorInfo> {
    let name = r.string(MAX_TENSOR_NAME)?;
    let at = r.offset;
    let n_dims = r.u32()?;
    if n_dims > MAX_DIMS {
        return r.fail(at, Problem::Dims(n_dims));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        dims.push(r.u64()?);
    }
    let ggml_type = r.u32()?;
    let offset = r.u64()?;
    Ok(TensorInfo {
        name,
        dims,
        ggml_type,
        offset,
    })
}

/// Parses a header from `source`; `path` only names it in errors.
pub(super) fn parse<R: Read>(source: R, path: &Path) -> Result<Header, GgufError> {
    let mut r = Reader::new(source);
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
        let tensor = tensor(&mut r).map_err(|f| bad(&format_args!("the info of tensor {i}"), f))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::reader::{Array, ValueType};
    use crate::gguf::testing::{every_type, gstr, parse_bytes, problem, Builder};
    use crate::gguf::{human_number, read};
    use proptest::prelude::*;
    use std::path::PathBuf;

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
}
