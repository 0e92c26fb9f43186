//! Typed pub/sub channels: fire-and-forget broadcasts between instances (a "catalog changed" hint, a cache
//! warm-up signal), serde-typed, on a connection of their own.
//!
//! **The decision a reader must know: a channel may lose messages, and says so.** Redis pub/sub delivers a
//! message to the subscribers connected at that moment and keeps nothing, so a subscriber that was
//! disconnected (a network blip, a failover, a restart of Redis) or fell behind misses what was published
//! meanwhile. keyward cannot prevent that, so it reports it: after any such moment the subscription yields
//! [`ChannelEvent::Gap`] before the next message, and a subscriber that keeps state derived from the messages
//! (an in-process copy, a counter) re-reads its source of truth when it sees one. Anything that drives a side
//! effect (an email, a payment, a webhook) belongs on a stream, which keeps each entry until a handler
//! acknowledged it, not on a channel.
//!
//! - **Names** follow the key layout: `{env}:{app}:{class}:v{n}`, so one ACL channel rule (`&{env}:{app}:*`)
//!   covers them, and bumping the class's `version` separates incompatible message types.
//! - **Transport**: `PUBLISH`, or `SPUBLISH` on Redis Cluster (sharded pub/sub: the message goes only to the
//!   shard owning the channel's slot, not to every node). Publishing goes through the shared connection and
//!   is bounded by the response timeout like every call; subscriptions of one handle share one dedicated
//!   connection (`SUBSCRIBE` / `SSUBSCRIBE`), re-made and re-subscribed after a disconnect, and checked with a
//!   `PING` every second so a server that vanished without closing the socket is noticed.
//! - **Embedded backend**: an in-process broadcast with the same deliveries (a `Gap` when a subscriber lags
//!   more than 1,024 messages behind).
//!
//! Source: Redis pub/sub semantics, <https://redis.io/docs/latest/develop/interact/pubsub/> ("at-most-once"
//! delivery; sharded pub/sub since 7.0).

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use futures_util::stream::BoxStream;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Keyward;
use crate::backend::channels::Delivery;
use crate::codec::{Codec, Json};
use crate::error::{Error, Result};
use crate::policy::ChannelClass;

/// A typed channel of one `channel` class: publish `M`s, subscribe to them. Cheap to clone.
///
/// ```
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use futures_util::StreamExt;
/// use keyward::{ChannelEvent, Keyward, policy::{ChannelClass, Policy}};
///
/// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
/// struct CatalogChanged { product: u32 }
///
/// let policy = Policy::builder("dev", "shop").channel("catalog_changes", ChannelClass::new()).build()?;
/// let kw = Keyward::embedded(policy);
/// let changes = kw.channel::<CatalogChanged>("catalog_changes")?;
/// let mut sub = changes.subscribe().await?;
/// changes.publish(&CatalogChanged { product: 42 }).await?;
/// match sub.next().await {
///     Some(Ok(ChannelEvent::Message(m))) => assert_eq!(m, CatalogChanged { product: 42 }),
///     Some(Ok(ChannelEvent::Gap)) => { /* messages may have been missed: re-read the source */ }
///     other => panic!("{other:?}"),
/// }
/// # Ok(()) }
/// ```
pub struct Channel<M, C = Json> {
    kw: Keyward,
    class: Arc<ChannelInfo>,
    _types: PhantomData<fn(M, C)>,
}

struct ChannelInfo {
    name: String,
    channel: String,
    policy: ChannelClass,
}

impl<M, C> Clone for Channel<M, C> {
    fn clone(&self) -> Self {
        Channel {
            kw: self.kw.clone(),
            class: Arc::clone(&self.class),
            _types: PhantomData,
        }
    }
}

impl<M, C> std::fmt::Debug for Channel<M, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("class", &self.class.name)
            .field("channel", &self.class.channel)
            .finish_non_exhaustive()
    }
}

/// What a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ChannelEvent<M> {
    /// A message, in the order the server delivered them.
    Message(M),
    /// Messages may have been missed since the previous event: the subscription's connection was lost (it
    /// is being re-made, and messages flow again once it is), the subscription was not yet live when
    /// `subscribe` returned, or the subscriber fell more than 1,024 messages behind. Re-read whatever state
    /// you derive from the messages.
    Gap,
}

impl Keyward {
    /// The typed channel of `class` (a `channel` class of the policy), with JSON messages.
    ///
    /// # Errors
    /// [`Error::UnknownClass`], or [`Error::WrongKind`] if `class` is not a `channel` class.
    pub fn channel<M>(&self, class: &str) -> Result<Channel<M>>
    where
        M: Serialize + DeserializeOwned + Send + 'static,
    {
        self.channel_with_codec::<M, Json>(class)
    }

    /// The typed channel of `class` with messages in codec `C`.
    ///
    /// # Errors
    /// As [`channel`](Self::channel).
    pub fn channel_with_codec<M, C>(&self, class: &str) -> Result<Channel<M, C>>
    where
        M: Serialize + DeserializeOwned + Send + 'static,
        C: Codec,
    {
        let (declared, _) = self.declared(class)?;
        let Some(policy) = declared.as_channel() else {
            return Err(Error::WrongKind {
                class: class.to_owned(),
                expected: "channel",
                found: declared.kind().name(),
            });
        };
        let p = self.policy();
        let channel = format!(
            "{}:{}:{}:v{}",
            p.env(),
            p.app(),
            declared.name(),
            policy.version_value()
        );
        Ok(Channel {
            kw: self.clone(),
            class: Arc::new(ChannelInfo {
                name: class.to_owned(),
                channel,
                policy: policy.clone(),
            }),
            _types: PhantomData,
        })
    }
}

impl<M, C> Channel<M, C>
where
    M: Serialize + DeserializeOwned + Send + 'static,
    C: Codec,
{
    /// The class name.
    pub fn class(&self) -> &str {
        &self.class.name
    }

    /// The pub/sub channel's name on the server: `{env}:{app}:{class}:v{n}`.
    pub fn channel_name(&self) -> &str {
        &self.class.channel
    }

    /// Publish `message` to every current subscriber (of every instance). Returns how many subscriptions
    /// received it, as the server counts them: connections, not [`Subscription`]s (one per instance that
    /// subscribes), and on Redis Cluster only those on the channel's shard. Nobody listening is not an error.
    ///
    /// # Errors
    /// [`Error::Encode`]; [`Error::ValueTooLarge`] (field `max_message_bytes`, with the encoded size) for a
    /// message larger than the class allows; backend failures ([`Error::Timeout`], [`Error::CircuitOpen`],
    /// [`Error::Redis`]) — a message that failed to publish is not retried.
    pub async fn publish(&self, message: &M) -> Result<u64> {
        let bytes = C::encode(message).map_err(|e| Error::Encode {
            class: self.class.name.clone(),
            source: Arc::new(e),
        })?;
        let max = self.class.policy.max_message_bytes_value();
        if bytes.len() > max {
            return Err(Error::ValueTooLarge {
                class: self.class.name.clone(),
                field: "max_message_bytes",
                size: bytes.len(),
                max,
            });
        }
        let receivers = self
            .kw
            .inner
            .backend
            .publish_channel(&self.class.channel, Bytes::from(bytes))
            .await?;
        metrics::counter!("keyward_channel_published_total", "class" => self.class.name.clone())
            .increment(1);
        Ok(receivers)
    }

    /// Subscribe: a [`Stream`](https://docs.rs/futures-core/0.3/futures_core/stream/trait.Stream.html) of [`ChannelEvent`]s, from now on, until it is dropped. On Redis it rides the
    /// handle's dedicated channel connection, opened by the first subscription. If Redis cannot be reached
    /// now, this still returns: the first event is a [`ChannelEvent::Gap`], and messages flow once the
    /// connection is made (it is retried with backoff for as long as the subscription lives).
    ///
    /// A message that does not decode as `M` (another version of the service published it) is yielded as an
    /// [`Error::Decode`] naming the class; the subscription goes on.
    ///
    /// # Errors
    /// None today; the `Result` leaves room for refusing a subscription.
    pub async fn subscribe(&self) -> Result<Subscription<M>> {
        let (inner, _live) = self
            .kw
            .inner
            .backend
            .subscribe_channel(&self.class.channel)
            .await;
        let class = self.class.name.clone();
        let stream =
            futures_util::stream::unfold((inner, class), |(mut inner, class)| async move {
                let delivery = inner.recv().await?;
                let event = match delivery {
                    Delivery::Gap => {
                        metrics::counter!("keyward_channel_gaps_total", "class" => class.clone())
                            .increment(1);
                        Ok(ChannelEvent::Gap)
                    }
                    Delivery::Message(bytes) => C::decode::<M>(&bytes)
                        .map(ChannelEvent::Message)
                        .map_err(|e| Error::Decode {
                            class: class.clone(),
                            source: Arc::new(e),
                        }),
                };
                Some((event, (inner, class)))
            });
        Ok(Subscription {
            inner: Box::pin(stream),
        })
    }
}

/// A live subscription to a [`Channel`]: a [`Stream`](https://docs.rs/futures-core/0.3/futures_core/stream/trait.Stream.html) of `Result<ChannelEvent<M>>` (use
/// `futures_util::StreamExt::next`). Dropping it unsubscribes (the connection unsubscribes the channel once its
/// last subscription in this handle is gone).
pub struct Subscription<M> {
    inner: BoxStream<'static, Result<ChannelEvent<M>>>,
}

impl<M> std::fmt::Debug for Subscription<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}

impl<M> Stream for Subscription<M> {
    type Item = Result<ChannelEvent<M>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
