//! Tests of [`RedisCluster`] against real `redis-server --cluster-enabled yes` nodes. One cluster per test.

use std::net::{Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

use redis::cluster::ClusterClient;
use redis::{Commands, Connection};

use crate::{ClusterOptions, MASTERS, NodeRole, RedisCluster, SLOTS};

/// A plain (non-cluster) connection to one node.
fn node_connection(cluster: &RedisCluster, port: u16) -> Connection {
    cluster
        .server(port)
        .expect("port of a cluster node")
        .connection()
}

fn cluster_info(con: &mut Connection) -> String {
    redis::cmd("CLUSTER").arg("INFO").query(con).unwrap()
}

#[test]
fn three_masters_form_a_cluster_that_every_node_reports_ok_and_drop_stops_them() {
    let mut cluster = RedisCluster::spawn();
    println!("cluster spawn (3 masters): {:?}", cluster.spawn_time());

    let ports = cluster.ports();
    assert_eq!(ports.len(), MASTERS);
    for port in &ports {
        let info = cluster_info(&mut node_connection(&cluster, *port));
        assert!(info.contains("cluster_state:ok"), "node {port}: {info}");
        assert!(
            info.contains(&format!("cluster_slots_assigned:{SLOTS}")),
            "node {port}: {info}"
        );
        let enabled: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("cluster-enabled")
            .query(&mut node_connection(&cluster, *port))
            .unwrap();
        assert_eq!(enabled, ["cluster-enabled", "yes"]);
    }

    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), MASTERS);
    assert!(
        nodes
            .iter()
            .all(|node| node.role == NodeRole::Master && !node.failed)
    );
    let slots: u32 = nodes
        .iter()
        .flat_map(|node| node.slots.iter())
        .map(|range| u32::from(*range.end()) - u32::from(*range.start()) + 1)
        .sum();
    assert_eq!(slots, SLOTS);

    let urls = cluster.urls();
    assert_eq!(
        urls,
        ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
    );
    let seed = cluster.seed_url();
    let expected: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    assert_eq!(seed, format!("redis+cluster://{}", expected.join(",")));

    // A paused node answers nothing; resumed, it answers and the cluster is ok again.
    let paused = ports[0];
    cluster.pause(paused);
    let mut con = cluster
        .server(paused)
        .unwrap()
        .client()
        .get_connection_with_timeout(Duration::from_millis(200));
    if let Ok(con) = con.as_mut() {
        con.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let answer: redis::RedisResult<String> = redis::cmd("PING").query(con);
        assert!(answer.is_err(), "a paused node answered {answer:?}");
    }
    cluster.resume(paused);
    cluster.wait_until_ok(Duration::from_secs(10));
    assert!(cluster_info(&mut node_connection(&cluster, paused)).contains("cluster_state:ok"));

    drop(cluster);
    for port in ports {
        assert!(
            TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err(),
            "node {port} still accepts connections after drop"
        );
    }
}

#[test]
fn keys_are_on_the_master_for_key_and_a_cluster_client_follows_moved() {
    let cluster = RedisCluster::spawn();
    let key = "{user:42}:profile";
    let owner = cluster.master_for_key(key);
    assert_eq!(owner.role, NodeRole::Master);
    let slot = cluster.slot_of(key);
    assert!(owner.serves(slot));
    assert_eq!(
        cluster.slot_of("{user:42}:other"),
        slot,
        "hash tags share a slot"
    );

    // Another master answers with a redirect to the owner.
    let other = cluster
        .nodes()
        .into_iter()
        .find(|node| node.port != owner.port)
        .unwrap();
    let err = node_connection(&cluster, other.port)
        .set::<_, _, ()>(key, "x")
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.to_ascii_uppercase().contains("MOVED")
            && text.contains(&format!("127.0.0.1:{}", owner.port)),
        "{text}"
    );

    // Set through the owning node directly, read through a cluster client seeded with every node.
    let _: () = node_connection(&cluster, owner.port)
        .set(key, "alice")
        .unwrap();
    let client = ClusterClient::new(cluster.urls()).unwrap();
    let mut con = client.get_connection().unwrap();
    let read: Option<String> = con.get(key).unwrap();
    assert_eq!(read.as_deref(), Some("alice"));
    let _: () = con.set("{user:42}:other", "bob").unwrap();
    let both: Vec<Option<String>> = redis::cmd("MGET")
        .arg(key)
        .arg("{user:42}:other")
        .query(&mut con)
        .unwrap();
    assert_eq!(both, [Some("alice".to_owned()), Some("bob".to_owned())]);

    // Keys written through the cluster client land on the node master_for_key names, spread over all masters.
    let mut owners = std::collections::HashSet::new();
    for i in 0..30 {
        let key = format!("{{tag{i}}}:k");
        let _: () = con.set(&key, i).unwrap();
        let owner = cluster.master_for_key(&key);
        let direct: Option<i64> = node_connection(&cluster, owner.port).get(&key).unwrap();
        assert_eq!(direct, Some(i), "{key} not on port {}", owner.port);
        owners.insert(owner.port);
    }
    assert_eq!(owners.len(), MASTERS, "30 tags all hashed to {owners:?}");
}

#[test]
fn killing_the_master_of_a_key_fails_over_to_its_replica_and_the_key_survives() {
    let mut cluster = RedisCluster::spawn_with(ClusterOptions::default().replicas(1));
    println!(
        "cluster spawn (3 masters + 3 replicas): {:?}",
        cluster.spawn_time()
    );

    let nodes = cluster.nodes();
    assert_eq!(nodes.len(), 2 * MASTERS);
    let masters: Vec<_> = nodes
        .iter()
        .filter(|n| n.role == NodeRole::Master)
        .collect();
    let replicas: Vec<_> = nodes
        .iter()
        .filter(|n| n.role == NodeRole::Replica)
        .collect();
    assert_eq!((masters.len(), replicas.len()), (MASTERS, MASTERS));
    for master in &masters {
        let followers = replicas
            .iter()
            .filter(|r| r.master_id.as_deref() == Some(master.id.as_str()))
            .count();
        assert_eq!(
            followers, 1,
            "master {} has {followers} replicas",
            master.port
        );
    }

    let key = "{order:7}:state";
    let owner = cluster.master_for_key(key);
    let replica = replicas
        .iter()
        .find(|r| r.master_id.as_deref() == Some(owner.id.as_str()))
        .unwrap()
        .port;
    let mut direct = node_connection(&cluster, owner.port);
    let _: () = direct.set(key, "paid").unwrap();
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut direct)
        .unwrap();
    assert_eq!(acked, 1, "the replica did not acknowledge the write");
    drop(direct);

    let killed = cluster.kill_master_of(key);
    let killed_at = Instant::now();
    assert_eq!(killed.port, owner.port);
    let recovered_at = cluster.wait_for_failover(Duration::from_secs(30));
    println!(
        "failover after SIGKILL of master {} (node timeout 1 s): {:?}",
        killed.port,
        recovered_at - killed_at
    );

    let new_owner = cluster.master_for_key(key);
    assert_eq!(
        new_owner.port, replica,
        "the key's replica did not take over"
    );
    let after = cluster.nodes();
    let dead = after.iter().find(|n| n.port == killed.port).unwrap();
    assert!(dead.failed && dead.slots.is_empty(), "{dead:?}");

    let client = ClusterClient::new(cluster.urls()).unwrap();
    let mut con = client.get_connection().unwrap();
    let read: Option<String> = con.get(key).unwrap();
    assert_eq!(read.as_deref(), Some("paid"));
    let _: () = con.set("{order:7}:note", "after failover").unwrap();
    let note: Option<String> = node_connection(&cluster, replica)
        .get("{order:7}:note")
        .unwrap();
    assert_eq!(note.as_deref(), Some("after failover"));
}

#[test]
fn without_replicas_a_killed_master_is_not_failed_over_and_the_wait_panics_with_every_log() {
    let mut cluster = RedisCluster::spawn();
    let killed = cluster.kill_master_of("{lonely}:key");
    assert!(
        TcpStream::connect((Ipv4Addr::LOCALHOST, killed.port)).is_err(),
        "the killed master still accepts connections"
    );
    let payload = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cluster.wait_for_failover(Duration::from_millis(1500))
    }))
    .expect_err("no replica can take over, yet the wait returned");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("not ok within"), "{message}");
    assert!(
        message.contains("--- redis-cli --cluster create ---"),
        "{message}"
    );
    for port in cluster.ports() {
        assert!(
            message.contains(&format!("--- node 127.0.0.1:{port} ")),
            "log of node {port} missing: {message}"
        );
    }
    assert!(message.contains("Cluster state changed: ok"), "{message}");
}
