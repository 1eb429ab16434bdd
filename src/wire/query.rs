//! Query strings (`application/x-www-form-urlencoded`, what the CLI, curl
//! and browsers send) read into `#[derive(Deserialize)]` structs, with one
//! spelling of a boolean ([`flag`]) for every route.
//!
//! Values reach a struct as text: `String` and `Option<String>` fields
//! take them as they are, [`Flag`] reads a boolean, and anything else
//! names a `deserialize_with` function built on [`text`] that says what
//! is wrong in the route's own words. A value's error starts with its
//! name (`limit: must be 1 to 1000`). A name given twice counts once,
//! with its last value (as the hand-written loops this replaces did). An
//! unknown name is [`QueryError::Unknown`], so each route can list the
//! names it takes.

use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
use serde::Deserializer;

/// Why a query string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// A name the route does not take.
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    /// A value it cannot use; the text says which and why.
    #[error("{0}")]
    Invalid(String),
}

impl de::Error for QueryError {
    fn custom<T: fmt::Display>(msg: T) -> QueryError {
        QueryError::Invalid(msg.to_string())
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> QueryError {
        QueryError::Unknown(field.to_string())
    }
}

/// Reads `query` (absent: empty) into `T`.
pub fn parse<T: DeserializeOwned>(query: Option<&str>) -> Result<T, QueryError> {
    T::deserialize(Pairs {
        pairs: pairs(query).into_iter(),
        value: None,
    })
}

/// The decoded pairs, each name once (with its last value), in the order
/// the names first came.
fn pairs(query: Option<&str>) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match pairs.iter_mut().find(|(name, _)| *name == k) {
            Some((_, value)) => *value = v.into_owned(),
            None => pairs.push((k.into_owned(), v.into_owned())),
        }
    }
    pairs
}

/// A boolean parameter, one spelling for every route: `1`, `true` or
/// `yes` is true; `0`, `false` or `no` is false (the union of what the
/// admin routes and the event stream took before they shared this).
/// Absent, it is false (`#[serde(default)]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flag(pub bool);

impl<'de> serde::Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Flag, D::Error> {
        flag(&text(d)?).map(Flag).map_err(de::Error::custom)
    }
}

fn flag(value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => Err(format!(
            "{:?} is not one of 1, true, yes, 0, false, no",
            cut(other, 64)
        )),
    }
}

/// The text of a parameter, for `deserialize_with` functions.
pub fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    serde::Deserialize::deserialize(d)
}

/// At most `max` characters of `s` (a value echoed in an error).
fn cut(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

/// The pairs of a query string, as a map to deserialize a struct from.
struct Pairs {
    pairs: std::vec::IntoIter<(String, String)>,
    /// The pair whose name was read last, for its value.
    value: Option<(String, String)>,
}

impl<'de> Deserializer<'de> for Pairs {
    type Error = QueryError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for Pairs {
    type Error = QueryError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, QueryError> {
        let Some((name, value)) = self.pairs.next() else {
            return Ok(None);
        };
        let key = seed.deserialize(name.as_str().into_deserializer())?;
        self.value = Some((name, value));
        Ok(Some(key))
    }

    /// The value's errors start with its name.
    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, QueryError> {
        let (name, value) = self.value.take().unwrap_or_default();
        seed.deserialize(Text(value)).map_err(|e| match e {
            QueryError::Invalid(m) => QueryError::Invalid(format!("{}: {m}", cut(&name, 64))),
            unknown => unknown,
        })
    }
}

/// One value as text: a string to every request, and present to an
/// `Option` (absence is a missing field).
struct Text(String);

impl<'de> Deserializer<'de> for Text {
    type Error = QueryError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_string(self.0)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, QueryError> {
        visitor.visit_some(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Q {
        model: Option<String>,
        #[serde(default)]
        follow: Flag,
        #[serde(default, deserialize_with = "small")]
        n: Option<u8>,
    }

    fn small<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u8>, D::Error> {
        let t = text(d)?;
        t.parse()
            .map(Some)
            .map_err(|_| de::Error::custom("must be a small number"))
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            pairs(Some("model=tiny%2Dchat&since=1h&x")),
            [
                ("model".to_string(), "tiny-chat".to_string()),
                ("since".into(), "1h".into()),
                ("x".into(), "".into())
            ]
        );
        assert_eq!(
            pairs(Some("model=a+b%20c%zz%4")),
            [("model".to_string(), "a b c%zz%4".to_string())]
        );
    }

    #[test]
    fn values_are_decoded_and_the_last_of_a_name_counts() {
        let q: Q = parse(Some("model=a+b%20c%zz%4&follow=yes&model=tiny%2Dchat&n=3")).unwrap();
        assert_eq!(
            q,
            Q {
                model: Some("tiny-chat".into()),
                follow: Flag(true),
                n: Some(3),
            }
        );
        let q: Q = parse(Some("model=a+b%20c%zz%4")).unwrap();
        assert_eq!(q.model.as_deref(), Some("a b c%zz%4"));
        assert_eq!(
            parse::<Q>(None).unwrap(),
            Q {
                model: None,
                follow: Flag(false),
                n: None,
            }
        );
    }

    #[test]
    fn one_boolean_spelling_and_errors_that_name_the_parameter() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("false", false),
            ("no", false),
        ] {
            assert_eq!(flag(v), Ok(want), "{v}");
        }
        let e = parse::<Q>(Some("follow=maybe")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "follow: \"maybe\" is not one of 1, true, yes, 0, false, no"
        );
        let e = parse::<Q>(Some("n=300")).unwrap_err();
        assert_eq!(e.to_string(), "n: must be a small number");
        assert_eq!(
            parse::<Q>(Some("lines=5")).unwrap_err(),
            QueryError::Unknown("lines".into())
        );
    }
}
