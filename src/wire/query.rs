//! Query strings (`application/x-www-form-urlencoded`, what the CLI, curl
//! and browsers send) read into `#[derive(Deserialize)]` structs, with one
//! spelling of a boolean ([`flag`]) for every route.
//!
//! Values reach a struct as text: `String` and `Option<String>` fields
//! take them as they are; anything else names a `deserialize_with`
//! function that says what is wrong in the route's own words. A name
//! given twice counts once, with its last value (as the hand-written
//! loops this replaces did). An unknown name is [`QueryError::Unknown`],
//! so each route can list the names it takes.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
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
    let mut pairs: Vec<(String, Text)> = Vec::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match pairs.iter_mut().find(|(name, _)| *name == k) {
            Some((_, value)) => value.0 = v.into_owned(),
            None => pairs.push((k.into_owned(), Text(v.into_owned()))),
        }
    }
    T::deserialize(de::value::MapDeserializer::new(pairs.into_iter()))
}

/// A boolean parameter, one spelling for every route: `1`, `true` or
/// `yes` is true; `0`, `false` or `no` is false (the union of what the
/// routes took before they shared this).
pub fn flag(name: &str, value: &str) -> Result<bool, QueryError> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => Err(QueryError::Invalid(format!(
            "{name}: {:?} is not one of 1, true, yes, 0, false, no",
            cut(other, 64)
        ))),
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

/// One value as text: a string to every request, and present to an
/// `Option` (absence is a missing field).
struct Text(String);

impl<'de> IntoDeserializer<'de, QueryError> for Text {
    type Deserializer = Text;

    fn into_deserializer(self) -> Text {
        self
    }
}

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
        #[serde(default, deserialize_with = "follow")]
        follow: bool,
    }

    fn follow<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        flag("follow", &text(d)?).map_err(de::Error::custom)
    }

    #[test]
    fn values_are_decoded_and_the_last_of_a_name_counts() {
        let q: Q = parse(Some("model=a+b%20c%zz%4&follow=yes&model=tiny%2Dchat")).unwrap();
        assert_eq!(
            q,
            Q {
                model: Some("tiny-chat".into()),
                follow: true
            }
        );
        assert_eq!(
            parse::<Q>(None).unwrap(),
            Q {
                model: None,
                follow: false
            }
        );
    }

    #[test]
    fn one_boolean_spelling_and_unknown_names_are_told_apart() {
        for (v, want) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("false", false),
            ("no", false),
        ] {
            assert_eq!(flag("f", v), Ok(want), "{v}");
        }
        let e = parse::<Q>(Some("follow=maybe")).unwrap_err();
        assert!(e.to_string().starts_with("follow: \"maybe\""), "{e}");
        assert_eq!(
            parse::<Q>(Some("lines=5")).unwrap_err(),
            QueryError::Unknown("lines".into())
        );
    }
}
