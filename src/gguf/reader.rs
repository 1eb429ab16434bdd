//! The low-level GGUF reader: little-endian numbers, length-prefixed
//! strings, typed metadata values and arrays, read from any byte source
//! with the position of every item for error reports.
//!
//! Invariant: every declared length and count is checked against its cap
//! before use, nothing is allocated from a declared length (strings grow
//! as their bytes arrive, long arrays are read through without being
//! kept), and the kept string bytes of one header stay under
//! [`MAX_HELD_BYTES`].

use std::io::{self, Read};

use serde_json::Value as Json;

use super::{Problem, MAX_ARRAY_LEN, MAX_HELD_ARRAY, MAX_HELD_BYTES, MAX_NESTING, MAX_STRING};

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
    pub(super) fn from_id(id: u32) -> Option<ValueType> {
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

/// A failure inside the parser, before it is given its context.
pub(super) struct Fail {
    pub offset: u64,
    pub problem: Problem,
}

pub(super) type Step<T> = Result<T, Fail>;

/// The byte source with its position and the budget of kept string bytes.
pub(super) struct Reader<R> {
    inner: R,
    /// Bytes consumed so far: where the next item starts.
    pub offset: u64,
    /// String bytes kept so far, against [`MAX_HELD_BYTES`].
    held: u64,
}

impl<R: Read> Reader<R> {
    pub(super) fn fail<T>(&self, offset: u64, problem: Problem) -> Step<T> {
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

    pub(super) fn array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut buf = [0u8; N];
        self.fill(&mut buf)?;
        Ok(buf)
    }

    pub(super) fn u32(&mut self) -> Step<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(super) fn u64(&mut self) -> Step<u64> {
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
    pub(super) fn string(&mut self, limit: u64) -> Step<String> {
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

    pub(super) fn value_type(&mut self) -> Step<ValueType> {
        let start = self.offset;
        let id = self.u32()?;
        match ValueType::from_id(id) {
            Some(ty) => Ok(ty),
            None => self.fail(start, Problem::ValueType(id)),
        }
    }

    pub(super) fn value(&mut self, ty: ValueType, depth: u8) -> Step<Value> {
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
}

impl<R> Reader<R> {
    /// A reader at the start of `inner`.
    pub(super) fn new(inner: R) -> Reader<R> {
        Reader {
            inner,
            offset: 0,
            held: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::testing::{array_payload, gstr, parse_bytes, problem, Builder};
    use crate::gguf::MAX_KV;

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
}
