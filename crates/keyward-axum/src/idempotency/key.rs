//! Reading the `Idempotency-Key` field: a Structured Field String (RFC 9651) by the draft, or for older
//! clients a bare value.
//!
//! **The one decision to know:** with [`KeySyntax::StringOrBare`] (the default) `"abc"` and `abc` are the
//! same key, `abc`: a client that quotes and one that does not cannot get two runs out of one intent.

use http::{HeaderMap, HeaderName};

/// `Idempotency-Key`, the request field of draft-ietf-httpapi-idempotency-key-header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// `Idempotent-Replayed: true` marks a response replayed from the store rather than produced by the
/// handler for this request (the name Stripe uses). Responses of a handler never carry it.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest idempotency key accepted, in bytes (after unquoting). Longer keys get a `400`. UUIDs (36
/// bytes) are what the draft recommends; 255 is the limit payment APIs commonly document.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 255;

/// Which spellings of the `Idempotency-Key` value the layer accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeySyntax {
    /// A Structured Field String (`Idempotency-Key: "8e03978e-40d5-43e8-bc93-6894a57f9324"`, parameters
    /// ignored) or, when the value does not start with `"`, the bare value as it is
    /// (`Idempotency-Key: 8e03978e-40d5-43e8-bc93-6894a57f9324`), as Stripe-style clients send it. A bare
    /// value must be visible ASCII without spaces. The default: clients written before the draft keep
    /// working, and both spellings of one key name the same key.
    #[default]
    StringOrBare,
    /// Only a Structured Field String, as the draft says (its value "MUST be a String"); anything else
    /// gets a `400`.
    StringOnly,
}

/// The idempotency key of the request being run, in its extensions for handlers that want it (to pass on
/// to a payment provider, or to log). Only a request that runs the handler under a key carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(pub(crate) String);

impl IdempotencyKey {
    /// The key as the client meant it (unquoted).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What the request's field says.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Field {
    /// No `Idempotency-Key` field.
    Absent,
    /// A usable key.
    Key(String),
    /// An unusable field; says why, for the 400 body.
    Invalid(String),
}

pub(crate) fn read(headers: &HeaderMap, syntax: KeySyntax) -> Field {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Field::Absent;
    };
    if values.next().is_some() {
        return Field::Invalid(
            "The request carries more than one Idempotency-Key field; send exactly one.".into(),
        );
    }
    let raw = value.as_bytes().trim_ascii();
    let key = if syntax == KeySyntax::StringOrBare && !raw.starts_with(b"\"") {
        if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
            return Field::Invalid(
                "The Idempotency-Key is not visible ASCII without spaces; send it as a Structured \
                 Field String, e.g. Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"."
                    .into(),
            );
        }
        // Only visible ASCII: valid UTF-8.
        String::from_utf8_lossy(raw).into_owned()
    } else {
        match sfv::Parser::new(raw).parse::<sfv::Item>() {
            Ok(item) => match item.bare_item.as_string() {
                Some(s) => s.as_str().to_owned(),
                None => return Field::Invalid(not_a_string()),
            },
            Err(_) => return Field::Invalid(not_a_string()),
        }
    };
    if key.is_empty() {
        return Field::Invalid("The Idempotency-Key is empty.".into());
    }
    if key.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Field::Invalid(format!(
            "The Idempotency-Key is {} bytes long; the longest accepted is {MAX_IDEMPOTENCY_KEY_BYTES}.",
            key.len()
        ));
    }
    Field::Key(key)
}

fn not_a_string() -> String {
    "The Idempotency-Key is not a Structured Field String (RFC 9651); send it quoted, e.g. \
     Idempotency-Key: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"."
        .into()
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn field(values: &[&[u8]], syntax: KeySyntax) -> Field {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(IDEMPOTENCY_KEY, HeaderValue::from_bytes(v).unwrap());
        }
        read(&headers, syntax)
    }

    fn key(s: &str) -> Field {
        Field::Key(s.to_owned())
    }

    #[test]
    fn structured_strings() {
        for syntax in [KeySyntax::StringOrBare, KeySyntax::StringOnly] {
            assert_eq!(field(&[], syntax), Field::Absent);
            assert_eq!(field(&[br#""abc-1""#], syntax), key("abc-1"));
            assert_eq!(field(&[br#"  "abc"  "#], syntax), key("abc"));
            assert_eq!(field(&[br#""a b\"c\\d""#], syntax), key(r#"a b"c\d"#));
            // Parameters are allowed by RFC 9651 and ignored.
            assert_eq!(field(&[br#""abc";v=1"#], syntax), key("abc"));
            for bad in [
                &br#""unterminated"#[..],
                br#""a" "b""#,
                br#""a", "b""#,
                br#""caf\u""#,
                br#""""#,
            ] {
                assert!(
                    matches!(field(&[bad], syntax), Field::Invalid(_)),
                    "{}",
                    String::from_utf8_lossy(bad)
                );
            }
            assert!(matches!(
                field(&[br#""a""#, br#""a""#], syntax),
                Field::Invalid(_)
            ));
        }
    }

    #[test]
    fn bare_values_only_when_allowed() {
        let uuid = b"8e03978e-40d5-43e8-bc93-6894a57f9324";
        assert_eq!(
            field(&[uuid], KeySyntax::StringOrBare),
            key("8e03978e-40d5-43e8-bc93-6894a57f9324")
        );
        assert_eq!(
            field(&[b"a,b;c=1"], KeySyntax::StringOrBare),
            key("a,b;c=1")
        );
        assert!(matches!(
            field(&[b"a b"], KeySyntax::StringOrBare),
            Field::Invalid(_)
        ));
        assert!(matches!(
            field(&[b"caf\xe9"], KeySyntax::StringOrBare),
            Field::Invalid(_)
        ));
        assert!(matches!(
            field(&[uuid], KeySyntax::StringOnly),
            Field::Invalid(_)
        ));
        // A Display String or a token is a Structured Field value, but not a String.
        assert!(matches!(
            field(&[b"%\"display\""], KeySyntax::StringOnly),
            Field::Invalid(_)
        ));
        assert!(matches!(
            field(&[b"abc"], KeySyntax::StringOnly),
            Field::Invalid(_)
        ));
        assert!(matches!(
            field(&[b""], KeySyntax::StringOrBare),
            Field::Invalid(_)
        ));
    }

    #[test]
    fn length_limit() {
        let max = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES);
        let over = "k".repeat(MAX_IDEMPOTENCY_KEY_BYTES + 1);
        for syntax in [KeySyntax::StringOrBare, KeySyntax::StringOnly] {
            assert_eq!(field(&[format!("\"{max}\"").as_bytes()], syntax), key(&max));
            assert!(matches!(
                field(&[format!("\"{over}\"").as_bytes()], syntax),
                Field::Invalid(_)
            ));
        }
        assert!(matches!(
            field(&[over.as_bytes()], KeySyntax::StringOrBare),
            Field::Invalid(_)
        ));
    }
}
