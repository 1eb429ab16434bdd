//! GGUF bytes written by hand, field by field as the spec lays them out,
//! for the reader's, the header's and the caches' tests, and the
//! scheduler's estimate's.

use std::path::Path;

use super::header::parse;
use super::{GgufError, Header, Problem};

/// Writes GGUF bytes by hand, field by field, as the spec lays them out.
pub struct Builder {
    version: u32,
    kvs: Vec<u8>,
    n_kv: u64,
    pub tensors: Vec<u8>,
    pub n_tensors: u64,
}

pub fn gstr(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

impl Builder {
    pub fn new(version: u32) -> Self {
        Builder {
            version,
            kvs: Vec::new(),
            n_kv: 0,
            tensors: Vec::new(),
            n_tensors: 0,
        }
    }

    /// A key with a raw type id and payload.
    pub fn kv(mut self, key: &str, ty: u32, payload: &[u8]) -> Self {
        self.kvs.extend(gstr(key.as_bytes()));
        self.kvs.extend(ty.to_le_bytes());
        self.kvs.extend_from_slice(payload);
        self.n_kv += 1;
        self
    }

    pub fn string(self, key: &str, value: &str) -> Self {
        self.kv(key, 8, &gstr(value.as_bytes()))
    }

    pub fn u32(self, key: &str, value: u32) -> Self {
        self.kv(key, 4, &value.to_le_bytes())
    }

    pub fn tensor(mut self, name: &str, dims: &[u64], ty: u32) -> Self {
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

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(self.version.to_le_bytes());
        out.extend(self.n_tensors.to_le_bytes());
        out.extend(self.n_kv.to_le_bytes());
        out.extend_from_slice(&self.kvs);
        out.extend_from_slice(&self.tensors);
        out
    }
}

pub fn array_payload(elem: u32, len: u64, body: &[u8]) -> Vec<u8> {
    let mut out = elem.to_le_bytes().to_vec();
    out.extend(len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// One key of every value type, short and long arrays, nested arrays
/// and two tensors.
pub fn every_type(version: u32) -> Builder {
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

pub fn parse_bytes(bytes: &[u8]) -> Result<Header, GgufError> {
    parse(bytes, Path::new("test.gguf"))
}

pub fn problem(bytes: &[u8]) -> (u64, Problem) {
    match parse_bytes(bytes) {
        Err(GgufError::Bad {
            offset, problem, ..
        }) => (offset, problem),
        other => panic!("expected a Bad error, got {other:?}"),
    }
}
