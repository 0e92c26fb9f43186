//! The TOML side of the policy: field types for the kinds' raw (serde) structs, and the one function that
//! deserializes a table into such a struct while keeping the name of the field at fault.
//!
//! **The one decision to know:** field types check only the *shape* of a value (a string, an integer, a
//! duration) and word their type errors as `expected …, found integer`; ranges and cross-field rules are
//! checked afterwards, by the same `validate` the builder runs, so TOML and code cannot disagree. serde's
//! own errors do not say which field they are about, so [`deserialize_table`] tracks the path
//! (`serde_path_to_error`) and turns "unknown field" into the name of the offending key.

use std::time::Duration;

use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, Visitor};

/// A field that failed: which one (`None` when the error is about the table as a whole) and why.
#[derive(Debug)]
pub(super) enum TableError {
    /// A key the raw struct does not declare; `accepted` lists the ones it does, in declaration order.
    Unknown {
        field: String,
        accepted: &'static [&'static str],
    },
    /// A value of the wrong shape (or any other error), in `field` if known.
    Invalid {
        field: Option<String>,
        message: String,
    },
}

/// Deserializes `T` (a raw struct with `#[serde(deny_unknown_fields)]`) from `table`, naming the field of
/// every error.
pub(super) fn deserialize_table<T: DeserializeOwned>(table: toml::Table) -> Result<T, TableError> {
    let accepted = struct_fields::<T>();
    let keys: Vec<String> = table.keys().cloned().collect();
    serde_path_to_error::deserialize(toml::Value::Table(table)).map_err(|e| {
        let field = e.path().iter().find_map(|segment| match segment {
            serde_path_to_error::Segment::Map { key } => Some(key.clone()),
            _ => None,
        });
        let message = e.inner().message().trim_end().to_owned();
        if message.starts_with("unknown field") {
            // The path ends at the unknown key; without one, the first key the struct does not declare.
            let field =
                field.or_else(|| keys.into_iter().find(|k| !accepted.contains(&k.as_str())));
            if let Some(field) = field {
                return TableError::Unknown { field, accepted };
            }
            return TableError::Invalid {
                field: None,
                message,
            };
        }
        TableError::Invalid { field, message }
    })
}

/// The field names a derived struct declares (what serde passes to `deserialize_struct`), or none.
fn struct_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);

    impl<'de> Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(de::Error::custom("probed"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }

    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Reads any TOML value, then lets `convert` accept it or say what it expected.
fn value<'de, D, T>(
    d: D,
    expected: &str,
    convert: impl FnOnce(toml::Value) -> Result<T, toml::Value>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let value = toml::Value::deserialize(d)?;
    convert(value).map_err(|other| {
        de::Error::custom(format!("expected {expected}, found {}", other.type_str()))
    })
}

/// A TOML string.
#[derive(Debug)]
pub(super) struct Text(pub(super) String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        value(d, "a string", |v| match v {
            toml::Value::String(s) => Ok(Text(s)),
            other => Err(other),
        })
    }
}

/// A TOML integer; each kind converts it to its own type and range (see [`Int::to`]).
#[derive(Debug, Clone, Copy)]
pub(super) struct Int(pub(super) i64);

impl Int {
    /// The integer as `T`; `range` says what the field accepts (`"a positive integer"`).
    pub(super) fn to<T: TryFrom<i64>>(
        self,
        field: &'static str,
        range: &str,
    ) -> Result<T, super::FieldError> {
        T::try_from(self.0).map_err(|_| (field, format!("must be {range}, got {}", self.0)))
    }
}

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        value(d, "an integer", |v| match v {
            toml::Value::Integer(i) => Ok(Int(i)),
            other => Err(other),
        })
    }
}

/// `true` or `false`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Flag(pub(super) bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        value(d, "true or false", |v| match v {
            toml::Value::Boolean(b) => Ok(Flag(b)),
            other => Err(other),
        })
    }
}

/// A humantime duration string: `"30s"`, `"10m"`, `"1h 30m"`, `"7days"`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = value(d, "a duration string like \"10m\"", |v| match v {
            toml::Value::String(s) => Ok(s),
            other => Err(other),
        })?;
        humantime::parse_duration(text.trim())
            .map(Dur)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration `{text}`: {e} (expected e.g. \"30s\", \"10m\", \"1h\")"
                ))
            })
    }
}

/// A TOML table (the namespace, the set of classes, one class).
#[derive(Debug)]
pub(super) struct Table(pub(super) toml::Table);

impl<'de> Deserialize<'de> for Table {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        value(d, "a table", |v| match v {
            toml::Value::Table(t) => Ok(Table(t)),
            other => Err(other),
        })
    }
}

/// `Some(value)` of a required field, or the error naming it.
pub(super) fn required<T>(field: &'static str, value: Option<T>) -> Result<T, super::FieldError> {
    value.ok_or((field, "missing required field".to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Raw {
        ttl: Option<Dur>,
        on: Option<Flag>,
        n: Option<Int>,
        name: Option<Text>,
    }

    fn table(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[track_caller]
    fn invalid(text: &str) -> (Option<String>, String) {
        match deserialize_table::<Raw>(table(text)).unwrap_err() {
            TableError::Invalid { field, message } => (field, message),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn type_errors_name_the_field_and_the_found_type() {
        assert_eq!(
            invalid("ttl = 3"),
            (
                Some("ttl".into()),
                "expected a duration string like \"10m\", found integer".into()
            )
        );
        assert_eq!(
            invalid("on = \"yes\""),
            (
                Some("on".into()),
                "expected true or false, found string".into()
            )
        );
        assert_eq!(
            invalid("n = 1.5"),
            (Some("n".into()), "expected an integer, found float".into())
        );
        assert_eq!(
            invalid("name = [1]"),
            (Some("name".into()), "expected a string, found array".into())
        );
        let (field, message) = invalid("ttl = \"soon\"");
        assert_eq!(field.as_deref(), Some("ttl"));
        assert!(message.starts_with("invalid duration `soon`"), "{message}");
    }

    #[test]
    fn unknown_field_is_found_by_key_even_with_odd_characters() {
        for key in ["tll", "\"a`b\"", "\"x, expected\""] {
            match deserialize_table::<Raw>(table(&format!("ttl = \"1s\"\n{key} = 1"))).unwrap_err()
            {
                TableError::Unknown { field, accepted } => {
                    assert_eq!(field, key.trim_matches('"'));
                    assert_eq!(accepted, ["ttl", "on", "n", "name"]);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn good_values_parse() {
        let raw: Raw =
            deserialize_table(table("ttl = \"1m 30s\"\non = true\nn = -4\nname = \"x\"")).unwrap();
        assert_eq!(raw.ttl.unwrap().0, Duration::from_secs(90));
        assert!(raw.on.unwrap().0);
        assert_eq!(raw.n.unwrap().0, -4);
        assert_eq!(raw.name.unwrap().0, "x");
        assert_eq!(
            Int(-4).to::<u32>("n", "a positive integer").unwrap_err(),
            ("n", "must be a positive integer, got -4".to_owned())
        );
    }
}
