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
#[derive(Debug, Clone, Copy, Default)]
pub struct Json;

impl Codec for Json {
    const NAME: &'static str = "json";
    fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, BoxError> {
        Ok(serde_json::to_vec(value)?)
    }
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
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
