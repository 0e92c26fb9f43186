//! The Redis servers a run counts commands on: the one server of a `redis://` URL, or every primary of a
//! `redis+cluster://` URL.
//!
//! The one decision: **on Cluster, every figure is a sum over the primaries**, each read through a plain
//! connection of its own (`INFO commandstats` for `redis_cmds`, `MONITOR` for `redis_client_cmds`), exactly as
//! on one server. The primaries are found once, before the measured phase, with `CLUSTER NODES` on the first
//! seed that answers; a topology change during the run (a failover) is not followed, so figures from such a
//! run are incomplete. Replicas are left out: what they replay is not a cost an operation imposes on the
//! nodes it is sent to.
//!
//! A Cluster URL is split into its seeds as keyward itself does (`redis+cluster://[user:pass@]h1:p1,h2:p2[/][?…]`,
//! `rediss+cluster://` for TLS): one `redis://` (or `rediss://`) URL per node, with the same user-info and
//! query, so the bench's connections authenticate like keyward's.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

use crate::error::UsageError;
use crate::stats::{self, ClientAudit, CommandStats, Counts};

/// How long the discovery connection may take to connect and to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// The servers of one URL.
#[derive(Debug, Clone)]
pub(crate) struct Servers {
    cluster: bool,
    /// One per server: its address (`host:port`, as a label in the report) and a URL for a plain connection.
    nodes: Vec<Node>,
}

#[derive(Debug, Clone)]
struct Node {
    addr: String,
    url: String,
}

impl Servers {
    /// The server of a standalone URL, or the primaries of a Cluster URL (asked of its seeds).
    ///
    /// # Errors
    /// A [`UsageError`] for a malformed Cluster URL; otherwise when no seed answers `CLUSTER NODES` or the
    /// answer names no primary serving slots.
    pub(crate) async fn discover(url: &str) -> anyhow::Result<Self> {
        let Some(seeds) = cluster_seeds(url)? else {
            return Ok(Self {
                cluster: false,
                nodes: vec![Node {
                    addr: String::new(),
                    url: url.to_owned(),
                }],
            });
        };
        let mut last_error = anyhow!("the URL names no seed");
        for seed in &seeds {
            match cluster_nodes(&seed.url).await {
                Ok(text) => {
                    let primaries = parse_primaries(&text, &seed.host)
                        .with_context(|| format!("CLUSTER NODES on seed {}", seed.addr()))?;
                    let nodes = primaries
                        .into_iter()
                        .map(|(host, port)| Node {
                            addr: format!("{host}:{port}"),
                            url: seed.with_node(&host, port),
                        })
                        .collect();
                    return Ok(Self {
                        cluster: true,
                        nodes,
                    });
                }
                // A seed that will not let us in: the others share its credentials; say it plainly.
                Err(e) if e.is::<crate::redis_url::AuthError>() => return Err(e),
                Err(e) => last_error = e.context(format!("seed {}", seed.addr())),
            }
        }
        Err(anyhow!(
            "cannot find the Cluster's primaries (CLUSTER NODES on every seed): {} — {}",
            crate::error::one_line(&last_error),
            crate::redis_url::HINT
        ))
    }

    /// Whether the URL named a Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// How many servers the figures are summed over (1 for a standalone server).
    pub(crate) fn count(&self) -> usize {
        self.nodes.len()
    }

    /// Each server's label (`host:port` on Cluster, empty for a standalone server) and the URL of a plain
    /// connection to it.
    pub(crate) fn urls(&self) -> impl Iterator<Item = (&str, &str)> {
        self.nodes.iter().map(|n| (n.addr.as_str(), n.url.as_str()))
    }
}

/// `INFO commandstats` on every server.
pub(crate) struct ServerStats {
    conns: Vec<CommandStats>,
}

/// Cumulative calls per command, per server (in the order of [`Servers`]).
pub(crate) struct Snapshot(Vec<Counts>);

/// The commands the servers ran between two snapshots.
pub(crate) struct Commands {
    /// Per command, summed over every server.
    pub(crate) total: Counts,
    /// On Cluster: every call, per primary (`host:port`); `None` for a standalone server.
    pub(crate) by_primary: Option<BTreeMap<String, u64>>,
}

impl ServerStats {
    /// One stats connection per server.
    ///
    /// # Errors
    /// When one of them cannot connect (naming the primary on Cluster).
    pub(crate) async fn connect(servers: &Servers) -> anyhow::Result<Self> {
        let mut conns = Vec::with_capacity(servers.nodes.len());
        for node in &servers.nodes {
            let conn = CommandStats::connect(&node.url).await;
            conns.push(if servers.cluster {
                conn.with_context(|| format!("primary {}", node.addr))?
            } else {
                conn?
            });
        }
        Ok(Self { conns })
    }

    /// Every server's counts, one after the other.
    ///
    /// # Errors
    /// When `INFO commandstats` fails on one of them.
    pub(crate) async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let mut counts = Vec::with_capacity(self.conns.len());
        for conn in &mut self.conns {
            counts.push(conn.snapshot().await?);
        }
        Ok(Snapshot(counts))
    }
}

/// What ran between `before` and `after`, summed over the servers of `servers`.
pub(crate) fn delta(servers: &Servers, before: &Snapshot, after: &Snapshot) -> Commands {
    let mut total = Counts::new();
    let mut by_primary = BTreeMap::new();
    for ((node, b), a) in servers.nodes.iter().zip(&before.0).zip(&after.0) {
        let d = stats::delta(b, a);
        by_primary.insert(node.addr.clone(), d.values().sum::<u64>());
        add(&mut total, &d);
    }
    Commands {
        total,
        by_primary: servers.cluster.then_some(by_primary),
    }
}

fn add(total: &mut Counts, more: &Counts) {
    for (name, calls) in more {
        *total.entry(name.clone()).or_default() += calls;
    }
}

/// `MONITOR` on every server (see [`ClientAudit`]).
pub(crate) struct ServerAudit(Vec<ClientAudit>);

impl ServerAudit {
    /// Start counting on every server.
    ///
    /// # Errors
    /// When one server refuses `MONITOR` or does not answer.
    pub(crate) async fn start(servers: &Servers) -> anyhow::Result<Self> {
        let mut audits = Vec::with_capacity(servers.nodes.len());
        for node in &servers.nodes {
            let audit = ClientAudit::start(&node.url).await;
            audits.push(if servers.cluster {
                audit.with_context(|| format!("primary {}", node.addr))?
            } else {
                audit?
            });
        }
        Ok(Self(audits))
    }

    /// What clients sent to all the servers since [`start`](Self::start), per command.
    ///
    /// # Errors
    /// As [`ClientAudit::finish`].
    pub(crate) async fn finish(self) -> anyhow::Result<Counts> {
        let mut total = Counts::new();
        for audit in self.0 {
            add(&mut total, &audit.finish().await?);
        }
        Ok(total)
    }
}

/// One seed of a Cluster URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Seed {
    /// `redis` or `rediss`.
    scheme: &'static str,
    /// `user:pass@`, or empty.
    auth: String,
    host: String,
    port: u16,
    /// `?…` (the URL's query), or empty.
    query: String,
    /// The seed's own URL: `scheme://auth host:port/query`.
    pub(crate) url: String,
}

impl Seed {
    fn addr(&self) -> String {
        host_port(&self.host, self.port)
    }

    /// A URL for a plain connection to another node of the same Cluster, with this seed's credentials.
    fn with_node(&self, host: &str, port: u16) -> String {
        format!(
            "{}://{}{}/{}",
            self.scheme,
            self.auth,
            host_port(host, port),
            self.query
        )
    }
}

/// `host:port`, with an IPv6 host in brackets.
fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The seeds of `redis+cluster://[user:pass@]host[:port][,host[:port]…][/][?query]` (port 6379 when left
/// out), `None` for any other URL.
///
/// # Errors
/// A [`UsageError`] for an empty node, a bad port or a database other than 0. Its message names the URL
/// without its credentials.
pub(crate) fn cluster_seeds(url: &str) -> anyhow::Result<Option<Vec<Seed>>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else if let Some(rest) = url.strip_prefix("rediss+cluster://") {
        ("rediss", rest)
    } else {
        return Ok(None);
    };
    let (auth, rest) = match rest.rfind('@') {
        Some(at) => (format!("{}@", &rest[..at]), &rest[at + 1..]),
        None => (String::new(), rest),
    };
    let shown = format!("{}+cluster://{rest}", scheme);
    let invalid = |detail: &str| UsageError(format!("invalid Cluster URL {shown}: {detail}"));
    let (hosts, tail) = match rest.find(['/', '?', '#']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let tail = tail.strip_prefix('/').unwrap_or(tail);
    let query = tail.strip_prefix('0').unwrap_or(tail);
    if !(query.is_empty() || query.starts_with(['?', '#'])) {
        bail!(invalid("a Cluster has only database 0"));
    }
    let mut seeds = Vec::new();
    for node in hosts.split(',').map(str::trim) {
        if node.is_empty() {
            bail!(invalid("an empty node in the list"));
        }
        let (host, port) = match node.rsplit_once(':') {
            // `[::1]` alone: a bracketed IPv6 host without a port.
            Some((host, port)) if !node.ends_with(']') => (
                host,
                port.parse::<u16>()
                    .map_err(|_| invalid(&format!("bad port in {node:?}")))?,
            ),
            _ => (node, 6379),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let mut seed = Seed {
            scheme,
            auth: auth.clone(),
            host,
            port,
            query: query.to_owned(),
            url: String::new(),
        };
        seed.url = seed.with_node(&seed.host, seed.port);
        seeds.push(seed);
    }
    Ok(Some(seeds))
}

/// `CLUSTER NODES` on one node, over a plain connection that is closed afterwards.
async fn cluster_nodes(url: &str) -> anyhow::Result<String> {
    // redis-rs enables rustls without a crypto provider; for `rediss://` use ring's unless one is set.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = redis::Client::open(url).map_err(|e| anyhow!("invalid node URL: {e}"))?;
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async::<String>(&mut conn)
            .await
    };
    tokio::time::timeout(TIMEOUT, ask)
        .await
        .with_context(|| format!("no answer within {TIMEOUT:?}"))?
        .map_err(|e| match crate::redis_url::AuthFailure::of(&e) {
            // Said as every command says it, and passed on as it is by `discover`.
            Some(failure) => match crate::redis_url::server_label(url) {
                Ok(label) => crate::redis_url::AuthError::new(&label, failure).into(),
                Err(usage) => usage.into(),
            },
            None => anyhow!("CLUSTER NODES failed: {e}"),
        })
}

/// The primaries of a `CLUSTER NODES` reply that serve slots and are not flagged failed, as `(host, port)`
/// sorted by address; `seed_host` stands in for a node that announces no address.
///
/// A line is `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>…`.
fn parse_primaries(text: &str, seed_host: &str) -> anyhow::Result<Vec<(String, u16)>> {
    let mut primaries = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(addr), Some(flags)) = (fields.get(1), fields.get(2)) else {
            bail!("a line without address and flags: {line:?}");
        };
        let flags: Vec<&str> = flags.split(',').collect();
        let serves_slots = fields.len() > 8;
        if !flags.contains(&"master")
            || flags.iter().any(|f| f.starts_with("fail"))
            || !serves_slots
        {
            continue;
        }
        let addr = addr.split(['@', ',']).next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            bail!("an address without a port: {line:?}");
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| anyhow!("a bad port: {line:?}"))?;
        let host = match host.trim_start_matches('[').trim_end_matches(']') {
            "" => seed_host,
            h => h,
        };
        primaries.push((host.to_owned(), port));
    }
    if primaries.is_empty() {
        bail!("no primary serves slots");
    }
    primaries.sort();
    Ok(primaries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_urls_are_not_cluster_urls() {
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://h/1",
            "redis+unix:///tmp/r.sock",
        ] {
            assert!(cluster_seeds(url).unwrap().is_none(), "{url}");
        }
    }

    #[test]
    fn cluster_urls_split_into_one_url_per_seed_with_credentials_and_query() {
        let seeds = cluster_seeds("redis+cluster://u:p%40w@a:7000,b,[::1]:7002/?protocol=3")
            .unwrap()
            .unwrap();
        let urls: Vec<&str> = seeds.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                "redis://u:p%40w@a:7000/?protocol=3",
                "redis://u:p%40w@b:6379/?protocol=3",
                "redis://u:p%40w@[::1]:7002/?protocol=3",
            ]
        );
        let tls = cluster_seeds("rediss+cluster://h:1/0").unwrap().unwrap();
        assert_eq!(tls[0].url, "rediss://h:1/");
        assert_eq!(
            tls[0].with_node("10.0.0.2", 7001),
            "rediss://10.0.0.2:7001/"
        );
    }

    #[test]
    fn malformed_cluster_urls_are_usage_errors_without_the_password() {
        for url in [
            "redis+cluster://u:s3cret@a:1,,b:2",
            "redis+cluster://u:s3cret@a:1/2",
            "redis+cluster://u:s3cret@a:port",
        ] {
            let e = cluster_seeds(url).unwrap_err();
            assert!(e.downcast_ref::<UsageError>().is_some(), "{url}: {e}");
            assert!(!e.to_string().contains("s3cret"), "{url}: {e}");
        }
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003,node-3 master - 0 1426238318243 3 connected 10923-16383
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca :30001@31001 myself,master - 0 0 1 connected 0-5460 [5461->-67ed]
824fe116063bc5fcf9f4ffd895bc17aee7731ac3 127.0.0.1:30006@31006 master - 0 1426238317741 6 connected
";

    #[test]
    fn primaries_are_the_masters_serving_slots() {
        let primaries = parse_primaries(NODES, "seed.local").unwrap();
        assert_eq!(
            primaries,
            [
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30003),
                ("seed.local".to_owned(), 30001),
            ]
        );
        assert!(parse_primaries("", "h").is_err());
        assert!(parse_primaries("x", "h").is_err());
    }

    fn servers(cluster: bool, addrs: &[&str]) -> Servers {
        Servers {
            cluster,
            nodes: addrs
                .iter()
                .map(|a| Node {
                    addr: (*a).to_owned(),
                    url: format!("redis://{a}"),
                })
                .collect(),
        }
    }

    fn counts(pairs: &[(&str, u64)]) -> Counts {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn cluster_deltas_sum_over_the_primaries_and_keep_each_primarys_share() {
        let s = servers(true, &["a:1", "b:2"]);
        let before = Snapshot(vec![counts(&[("get", 5)]), counts(&[("set", 1)])]);
        let after = Snapshot(vec![
            counts(&[("get", 8), ("set", 2)]),
            counts(&[("set", 5), ("evalsha", 1)]),
        ]);
        let d = delta(&s, &before, &after);
        assert_eq!(d.total, counts(&[("get", 3), ("set", 6), ("evalsha", 1)]));
        assert_eq!(d.by_primary, Some(counts(&[("a:1", 5), ("b:2", 5)])));
        let one = servers(false, &["a:1"]);
        let d = delta(
            &one,
            &Snapshot(vec![counts(&[])]),
            &Snapshot(vec![counts(&[("get", 2)])]),
        );
        assert_eq!(d.total, counts(&[("get", 2)]));
        assert_eq!(d.by_primary, None);
    }
}
