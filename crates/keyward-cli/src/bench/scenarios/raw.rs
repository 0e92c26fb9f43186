//! A plain redis-rs connection of the client type keyward holds for the same URL ([`Raw`]): what the `get`
//! baseline reads through, and what the L1 scenarios keep their source of truth in.
//!
//! The one decision: it is `ConnectionManager` on one server and redis-rs's async cluster client on a
//! Cluster, cloned per call as keyward's backend does, so that a figure measured through it compares with
//! keyward's own calls on the same footing.

use anyhow::Context as _;

/// A plain connection: what keyward's backend holds for the same URL.
#[derive(Clone)]
pub(crate) enum Raw {
    Server(redis::aio::ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    /// Connect to the server, or to the Cluster of a `redis+cluster://` URL.
    ///
    /// # Errors
    /// A malformed Cluster URL, or when connecting fails.
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Self> {
        if let Some(seeds) = crate::bench::servers::cluster_seeds(url)? {
            let client = redis::cluster::ClusterClient::new(
                seeds.into_iter().map(|s| s.url).collect::<Vec<_>>(),
            )
            .context("cannot open the baseline cluster client")?;
            let con = client
                .get_async_connection()
                .await
                .context("cannot connect the baseline cluster client")?;
            return Ok(Self::Cluster(con));
        }
        let client = redis::Client::open(url).context("cannot open the baseline client")?;
        let con = client
            .get_connection_manager()
            .await
            .context("cannot connect the baseline client")?;
        Ok(Self::Server(con))
    }
}

impl redis::aio::ConnectionLike for Raw {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
