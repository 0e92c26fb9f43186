//! How typed values become bytes: JSON by default, MessagePack behind the `msgpack` feature.
//!
//! A codec only turns values into bytes and back; the envelope around those bytes (format version, epochs)
//! belongs to keyward and is the same whatever the codec.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::BoxError;

/// Turns values into bytes and back. Implement it to plug in another format.
///
/// ```
/// use keyward::codec::{Codec, Json};
/// let bytes = Json::encode(&vec![1, 2, 3]).unwrap();
/// let back: Vec<i32> = Json::decode(&bytes).unwrap();
/// assert_eq!(back, [1, 2, 3]);
/// ```
pub trait Codec: Send + Sync + 'static {
    /// A short name for logs and metrics.
    const NAME: &'static str;
    /// Serialize a value.
    ///
    /// # Errors
    /// When the value cannot be represented in this format.
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, BoxError>;
    /// Deserialize a value.
    ///
    /// # Errors
    /// When the bytes are not a valid `T` in this format.
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BoxError>;
}

/// JSON via `serde_json` (the default codec).
///
/// A value holding a non-finite float (`NaN`, `±inf`) is refused at encode: JSON has no such numbers and
/// `serde_json` would write `null`, which then fails to decode as a float — a value stored once and read back
/// as a miss forever after. Refusing it at write keeps "what you store is what you read" true.
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const NAME: &'static str = "json";
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, BoxError> {
        let bytes = serde_json::to_vec(value)?;
        // A non-finite float can only have come out as `null`: values without one skip the check.
        if memchr_null(&bytes) {
            value.serialize(finite::Check)?;
        }
        Ok(bytes)
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// Whether the encoded JSON contains `null` anywhere (a vectorized substring search: this runs on every
/// encode, and a byte-window scan cost several percent of a publish's client CPU).
fn memchr_null(bytes: &[u8]) -> bool {
    memchr::memmem::find(bytes, b"null").is_some()
}

/// A serializer that writes nothing and fails on the first non-finite float.
mod finite {
    use serde::ser::{self, Serialize};

    #[derive(Debug)]
    pub(super) struct NonFinite(String);

    impl std::fmt::Display for NonFinite {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for NonFinite {}

    impl ser::Error for NonFinite {
        fn custom<T: std::fmt::Display>(msg: T) -> Self {
            NonFinite(msg.to_string())
        }
    }

    fn float(v: f64) -> Result<(), NonFinite> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(NonFinite(format!(
                "JSON cannot represent the non-finite float {v} (it would be stored as null and never read back)"
            )))
        }
    }

    #[derive(Clone, Copy)]
    pub(super) struct Check;

    type R = Result<(), NonFinite>;

    macro_rules! ok {
        ($($name:ident($ty:ty)),* $(,)?) => {
            $(fn $name(self, _: $ty) -> R { Ok(()) })*
        };
    }

    impl ser::Serializer for Check {
        type Ok = ();
        type Error = NonFinite;
        type SerializeSeq = Self;
        type SerializeTuple = Self;
        type SerializeTupleStruct = Self;
        type SerializeTupleVariant = Self;
        type SerializeMap = Self;
        type SerializeStruct = Self;
        type SerializeStructVariant = Self;

        ok!(
            serialize_bool(bool),
            serialize_i8(i8),
            serialize_i16(i16),
            serialize_i32(i32),
            serialize_i64(i64),
            serialize_i128(i128),
            serialize_u8(u8),
            serialize_u16(u16),
            serialize_u32(u32),
            serialize_u64(u64),
            serialize_u128(u128),
            serialize_char(char),
            serialize_str(&str),
            serialize_bytes(&[u8])
        );

        fn serialize_f32(self, v: f32) -> R {
            float(f64::from(v))
        }
        fn serialize_f64(self, v: f64) -> R {
            float(v)
        }
        fn serialize_none(self) -> R {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
            v.serialize(self)
        }
        fn serialize_unit(self) -> R {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> R {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            v: &T,
        ) -> R {
            v.serialize(self)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple(self, _: usize) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, NonFinite> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, NonFinite> {
            Ok(self)
        }
    }

    macro_rules! compound {
        ($($trait:ident :: $method:ident),* $(,)?) => {
            $(impl ser::$trait for Check {
                type Ok = ();
                type Error = NonFinite;
                fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
                    v.serialize(*self)
                }
                fn end(self) -> R {
                    Ok(())
                }
            })*
        };
    }

    compound!(
        SerializeSeq::serialize_element,
        SerializeTuple::serialize_element,
        SerializeTupleStruct::serialize_field,
        SerializeTupleVariant::serialize_field,
    );

    impl ser::SerializeMap for Check {
        type Ok = ();
        type Error = NonFinite;
        fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
            k.serialize(*self)
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
            v.serialize(*self)
        }
        fn end(self) -> R {
            Ok(())
        }
    }

    impl ser::SerializeStruct for Check {
        type Ok = ();
        type Error = NonFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
            v.serialize(*self)
        }
        fn end(self) -> R {
            Ok(())
        }
    }

    impl ser::SerializeStructVariant for Check {
        type Ok = ();
        type Error = NonFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
            v.serialize(*self)
        }
        fn end(self) -> R {
            Ok(())
        }
    }
}

/// MessagePack via `rmp-serde`, with struct fields as maps so adding a field stays compatible.
#[cfg(feature = "msgpack")]
#[derive(Debug, Clone, Copy, Default)]
pub struct MsgPack;

#[cfg(feature = "msgpack")]
impl Codec for MsgPack {
    const NAME: &'static str = "msgpack";
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, BoxError> {
        Ok(rmp_serde::to_vec_named(value)?)
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BoxError> {
        Ok(rmp_serde::from_slice(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Product {
        id: u32,
        name: String,
        tags: Vec<String>,
    }

    fn sample() -> Product {
        Product {
            id: 7,
            name: "pear".into(),
            tags: vec!["fruit".into()],
        }
    }

    #[test]
    fn json_round_trip_and_bad_bytes() {
        let bytes = Json::encode(&sample()).unwrap();
        assert_eq!(Json::decode::<Product>(&bytes).unwrap(), sample());
        assert!(Json::decode::<Product>(b"{not json").is_err());
    }

    #[test]
    fn json_refuses_non_finite_floats_at_write() {
        #[derive(serde::Serialize)]
        struct Price {
            amount: f64,
            history: Vec<Option<f32>>,
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let err = Json::encode(&Price {
                amount: bad,
                history: vec![],
            })
            .unwrap_err();
            assert!(err.to_string().contains("non-finite"), "{err}");
        }
        let err = Json::encode(&Price {
            amount: 1.0,
            history: vec![None, Some(f32::NAN)],
        })
        .unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        // Real nulls and finite floats still encode.
        let ok = Json::encode(&Price {
            amount: -0.5,
            history: vec![None, Some(2.5)],
        })
        .unwrap();
        assert_eq!(ok, br#"{"amount":-0.5,"history":[null,2.5]}"#);
        let map = std::collections::BTreeMap::from([("x", f64::NAN)]);
        assert!(Json::encode(&map).is_err());
    }

    #[cfg(feature = "msgpack")]
    #[test]
    fn msgpack_round_trip_and_bad_bytes() {
        let bytes = MsgPack::encode(&sample()).unwrap();
        assert_eq!(MsgPack::decode::<Product>(&bytes).unwrap(), sample());
        assert!(MsgPack::decode::<Product>(&[0xc1]).is_err());
        // Named fields: smaller than JSON, and a reader with an extra optional field still decodes.
        assert!(bytes.len() < Json::encode(&sample()).unwrap().len());
    }
}
