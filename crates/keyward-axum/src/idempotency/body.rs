//! Buffering bodies up to a limit, and handing back what was read when the limit is passed.
//!
//! **The one decision to know:** nothing read is ever lost. A body over the limit (or one that fails, or
//! carries trailers) comes back as a [`Resumed`] body that yields the bytes already read, then the frame
//! that stopped the buffering, then the rest of the original body, so the client still gets the whole
//! response.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

/// What buffering a body found.
pub(crate) enum Buffered {
    /// The whole body (data only), within the limit.
    Whole(Bytes),
    /// The body could not be kept: over the limit, failed, or with trailers.
    Unstorable {
        /// Why, for the log.
        why: Unstorable,
        /// The same body, from its first byte.
        body: Body,
    },
}

/// Why a body was not buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unstorable {
    TooLarge,
    Failed,
    Trailers,
}

/// Reads `body` while it stays within `limit` bytes.
pub(crate) async fn buffer(mut body: Body, limit: usize) -> Buffered {
    if body.size_hint().lower() > limit as u64 {
        return Buffered::Unstorable {
            why: Unstorable::TooLarge,
            body,
        };
    }
    let mut data = Vec::new();
    loop {
        let (why, pending) = match body.frame().await {
            None => return Buffered::Whole(Bytes::from(data)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(chunk) if data.len() + chunk.len() <= limit => {
                    data.extend_from_slice(&chunk);
                    continue;
                }
                Ok(chunk) => (Unstorable::TooLarge, Ok(Frame::data(chunk))),
                Err(frame) => (Unstorable::Trailers, Ok(frame)),
            },
            Some(Err(error)) => (Unstorable::Failed, Err(error)),
        };
        return Buffered::Unstorable {
            why,
            body: Body::new(Resumed {
                prefix: (!data.is_empty()).then(|| Bytes::from(data)),
                pending: Some(pending),
                rest: body,
            }),
        };
    }
}

/// A body resumed after buffering stopped: the bytes read so far, the frame (or error) that stopped it,
/// then the rest of the original body.
pub(crate) struct Resumed {
    pub(crate) prefix: Option<Bytes>,
    pub(crate) pending: Option<Result<Frame<Bytes>, axum::Error>>,
    pub(crate) rest: Body,
}

impl HttpBody for Resumed {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        if let Some(prefix) = self.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        if let Some(pending) = self.pending.take() {
            return Poll::Ready(Some(pending));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.pending.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.rest.size_hint();
        let head = self.prefix.as_ref().map_or(0, |p| p.len() as u64)
            + match &self.pending {
                Some(Ok(frame)) => frame.data_ref().map_or(0, |d| d.len() as u64),
                _ => 0,
            };
        // Build the new hint from both bounds: raising the lower bound first would trip `SizeHint`'s
        // `lower <= upper` assertion when the rest of the body reports an exact size.
        let lower = hint.lower().saturating_add(head);
        let upper = hint.upper().map(|u| u.saturating_add(head));
        let mut out = SizeHint::new();
        if let Some(upper) = upper {
            out.set_upper(upper);
        }
        out.set_lower(lower);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rest of a body reporting an exact size (e.g. a length-delimited upstream body) must not make the
    /// resumed body's size hint panic.
    #[test]
    fn size_hint_of_an_exact_rest_does_not_panic() {
        let resumed = Resumed {
            prefix: Some(Bytes::from_static(b"head")),
            pending: None,
            rest: Body::new(http_body_util::Full::new(Bytes::from_static(b"tail!"))),
        };
        let hint = resumed.size_hint();
        assert_eq!(hint.exact(), Some(9));
    }

    /// A body in the given chunks, with no length hint.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl HttpBody for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|c| Ok(Frame::data(c))))
        }
    }

    fn chunked(chunks: &[&'static [u8]]) -> Body {
        Body::new(Chunks(
            chunks.iter().map(|c| Bytes::from_static(c)).collect(),
        ))
    }

    async fn all(body: Body) -> Vec<u8> {
        body.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn within_the_limit_is_whole() {
        let Buffered::Whole(b) = buffer(chunked(&[b"ab", b"cd"]), 4).await else {
            panic!("not whole")
        };
        assert_eq!(&b[..], b"abcd");
        let Buffered::Whole(b) = buffer(Body::empty(), 0).await else {
            panic!("not whole")
        };
        assert!(b.is_empty());
    }

    #[tokio::test]
    async fn over_the_limit_comes_back_whole() {
        let Buffered::Unstorable { why, body } = buffer(chunked(&[b"ab", b"cd", b"ef"]), 3).await
        else {
            panic!("buffered")
        };
        assert_eq!(why, Unstorable::TooLarge);
        assert_eq!(all(body).await, b"abcdef");
        // A known length over the limit is not read at all.
        let Buffered::Unstorable { why, body } = buffer(Body::from("abcdef"), 3).await else {
            panic!("buffered")
        };
        assert_eq!(why, Unstorable::TooLarge);
        assert_eq!(all(body).await, b"abcdef");
    }
}
