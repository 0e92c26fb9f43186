//! Connections of their own, next to the shared multiplexed one: a typed channel's subscriptions (and, later,
//! blocking stream reads) must never share a connection with the calls every request makes, because a flood
//! of pushes (or a `BLOCK`) on it would delay their replies.
//!
//! [`Dial`] remembers how the handle reached its server, so a dedicated connection goes where the shared one
//! goes: the same URL and TLS material (standalone), the master the sentinels name *now* (Sentinel), or a
//! cluster client of its own (Cluster, where commands and sharded subscriptions are routed by slot).

use std::sync::Arc;

use redis::aio::{AsyncPushSender, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, RedisResult};

use super::sentinel::Follower;
use super::{client_for, cluster};
use crate::backend::ConnectOptions;
use crate::error::{Error, Result};

/// How to reach the handle's server again.
pub(crate) enum Dial {
    Single {
        url: String,
        options: ConnectOptions,
    },
    Sentinel(Arc<Follower>),
    Cluster {
        url: String,
        seeds: Vec<String>,
        options: ConnectOptions,
    },
    /// A lazy handle's: the connected backend's dial once there is one, a connect error before.
    Lazy {
        lazy: std::sync::Weak<crate::backend::lazy::Lazy>,
        connect_timeout: std::time::Duration,
        response_timeout: std::time::Duration,
    },
}

/// A connection of its own (RESP3, pushes to the given sender).
#[derive(Clone)]
pub(crate) enum Dedicated {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Dial {
    /// Open a new connection whose pushes (messages, `Disconnection`) go to `push`.
    ///
    /// # Errors
    /// [`Error::Connect`] when the server cannot be reached within the connect timeout.
    pub(crate) async fn open(&self, push: impl AsyncPushSender) -> Result<Dedicated> {
        match self {
            Dial::Single { url, options } => single(url, options, push).await,
            Dial::Sentinel(follower) => {
                let (host, port) = follower.current_master();
                let opened = single(
                    &follower.url.data_url(&host, port),
                    follower.options(),
                    push,
                )
                .await;
                if opened.is_err() {
                    // The master may have moved: ask the sentinels again (coalesced with the handle's own).
                    follower.trigger();
                }
                opened
            }
            Dial::Cluster {
                url,
                seeds,
                options,
            } => {
                let client = cluster::client(url, seeds, options, push)?;
                let conn =
                    tokio::time::timeout(options.connect_timeout, client.get_async_connection())
                        .await
                        .map_err(|_| connect_err(url, "no answer within the connect timeout"))?
                        .map_err(|e| connect_err(url, &e.to_string()))?;
                Ok(Dedicated::Cluster(conn))
            }
            Dial::Lazy { lazy, .. } => {
                let lazy = lazy.upgrade().ok_or_else(|| Error::Connect {
                    server: "redis".to_owned(),
                    reason: "the handle was dropped".to_owned(),
                })?;
                let dial = match lazy.get() {
                    Some(backend) => backend.dial(),
                    None => return Err(lazy.not_connected("subscribe")),
                };
                drop(lazy);
                Box::pin(dial.open(push)).await
            }
        }
    }

    /// How long opening a connection may take.
    pub(crate) fn connect_timeout(&self) -> std::time::Duration {
        match self {
            Dial::Single { options, .. } | Dial::Cluster { options, .. } => options.connect_timeout,
            Dial::Sentinel(f) => f.options().connect_timeout,
            Dial::Lazy {
                connect_timeout, ..
            } => *connect_timeout,
        }
    }

    /// The response timeout every call on a dedicated connection is bounded by.
    pub(crate) fn response_timeout(&self) -> std::time::Duration {
        match self {
            Dial::Single { options, .. } | Dial::Cluster { options, .. } => {
                options.response_timeout
            }
            Dial::Sentinel(f) => f.options().response_timeout,
            Dial::Lazy {
                response_timeout, ..
            } => *response_timeout,
        }
    }
}

fn connect_err(url: &str, reason: &str) -> Error {
    Error::Connect {
        server: super::redact(url),
        reason: super::scrub(url, reason),
    }
}

async fn single(
    url: &str,
    options: &ConnectOptions,
    push: impl AsyncPushSender,
) -> Result<Dedicated> {
    let (client, server) = client_for(url, options)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(options.connect_timeout))
        .set_response_timeout(Some(options.response_timeout))
        .set_push_sender(push);
    let conn = tokio::time::timeout(
        options.connect_timeout,
        client.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| Error::Connect {
        server: server.clone(),
        reason: format!("no answer within {:?}", options.connect_timeout),
    })?
    .map_err(|e| Error::Connect {
        server,
        reason: super::scrub(url, &e.to_string()),
    })?;
    Ok(Dedicated::Single(conn))
}

impl Dedicated {
    /// `SUBSCRIBE` (standalone, Sentinel) or `SSUBSCRIBE` (Cluster: the channel's shard).
    pub(crate) async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Dedicated::Single(c) => c.subscribe(channel).await,
            Dedicated::Cluster(c) => c.ssubscribe(channel).await,
        }
    }

    /// `UNSUBSCRIBE` / `SUNSUBSCRIBE`.
    pub(crate) async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Dedicated::Single(c) => c.unsubscribe(channel).await,
            Dedicated::Cluster(c) => c.sunsubscribe(channel).await,
        }
    }

    /// `PING`: whether the server still answers on this connection (a black-holed server closes nothing).
    pub(crate) async fn ping(&mut self) -> RedisResult<()> {
        let ping = redis::cmd("PING");
        match self {
            Dedicated::Single(c) => ping.query_async::<()>(c).await,
            Dedicated::Cluster(c) => ping.query_async::<()>(c).await,
        }
    }
}
