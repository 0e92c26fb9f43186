//! Typed pub/sub channels on every backend: messages arrive in order and typed, across handles; oversized,
//! undecodable and wrong-kind cases are typed errors; a dropped subscription stops listening; and on Redis a
//! lost connection (killed, black-holed, a restarted server) yields a `Gap`, after which messages flow again.

#![allow(unreachable_pub)]

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use keyward::{ChannelEvent, Error, Keyward};
use keyward_testkit::RedisServer;
use keyward_testkit::TcpProxy;

use crate::common::Harness;

conformance!(
    messages_arrive_in_order_and_typed_across_handles,
    an_oversized_message_is_refused_naming_class_and_size,
    an_undecodable_message_is_an_error_and_the_subscription_goes_on,
    wrong_kind_and_unknown_class_are_typed_errors,
    every_subscription_gets_every_message_and_dropping_one_stops_it,
    a_subscriber_that_falls_behind_gets_a_gap_without_another_message,
);

/// Long enough for any delivery on a healthy server; a test waits at most this long for one.
const DELIVERY: Duration = Duration::from_secs(10);

async fn next<M: std::fmt::Debug>(sub: &mut keyward::channel::Subscription<M>) -> ChannelEvent<M> {
    tokio::time::timeout(DELIVERY, sub.next())
        .await
        .expect("no delivery within 10 s")
        .expect("the subscription ended")
        .expect("a delivery that decodes")
}

mod cases {
    use super::*;

    pub async fn messages_arrive_in_order_and_typed_across_handles(h: Harness) {
        let handles = h.handles(2).await;
        let rx = handles[0].channel::<(u32, String)>("news").unwrap();
        let tx = handles[1].channel::<(u32, String)>("news").unwrap();
        assert_eq!(rx.channel_name(), format!("test:{}:news:v1", h.app()));
        let mut sub = rx.subscribe().await.unwrap();
        for i in 0..100u32 {
            tx.publish(&(i, format!("m{i}"))).await.unwrap();
        }
        for i in 0..100u32 {
            assert_eq!(
                next(&mut sub).await,
                ChannelEvent::Message((i, format!("m{i}")))
            );
        }
    }

    pub async fn an_oversized_message_is_refused_naming_class_and_size(h: Harness) {
        let kw = h.keyward().await;
        let news = kw.channel::<String>("news").unwrap();
        let err = news.publish(&"x".repeat(300)).await.unwrap_err();
        assert!(
            matches!(&err, Error::ValueTooLarge { class, field: "max_message_bytes", size: 302, max: 256 } if class == "news"),
            "{err:?}"
        );
        assert!(err.to_string().contains("news"), "{err}");
        news.publish(&"x".repeat(254)).await.unwrap();
    }

    pub async fn an_undecodable_message_is_an_error_and_the_subscription_goes_on(h: Harness) {
        let kw = h.keyward().await;
        let typed = kw.channel::<u32>("news").unwrap();
        let other = kw.channel::<String>("news").unwrap();
        let mut sub = typed.subscribe().await.unwrap();
        other.publish(&"not a number".to_owned()).await.unwrap();
        typed.publish(&7).await.unwrap();
        let first = tokio::time::timeout(DELIVERY, sub.next())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(&first, Err(Error::Decode { class, .. }) if class == "news"),
            "{first:?}"
        );
        assert_eq!(next(&mut sub).await, ChannelEvent::Message(7));
    }

    pub async fn wrong_kind_and_unknown_class_are_typed_errors(h: Harness) {
        let kw = h.keyward().await;
        let err = kw.channel::<u32>("product").unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongKind {
                    expected: "channel",
                    found: "cache",
                    ..
                }
            ),
            "{err:?}"
        );
        let err = kw.channel::<u32>("nope").unwrap_err();
        assert!(matches!(err, Error::UnknownClass { .. }), "{err:?}");
        let err = kw.cache::<u32>("news").unwrap_err();
        assert!(
            matches!(
                err,
                Error::WrongKind {
                    found: "channel",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    pub async fn every_subscription_gets_every_message_and_dropping_one_stops_it(h: Harness) {
        let kw = h.keyward().await;
        let news = kw.channel::<u32>("news").unwrap();
        let mut a = news.subscribe().await.unwrap();
        let mut b = news.subscribe().await.unwrap();
        let receivers = news.publish(&1).await.unwrap();
        assert!(receivers >= 1, "{receivers}");
        assert_eq!(next(&mut a).await, ChannelEvent::Message(1));
        assert_eq!(next(&mut b).await, ChannelEvent::Message(1));
        drop(a);
        news.publish(&2).await.unwrap();
        assert_eq!(next(&mut b).await, ChannelEvent::Message(2));
        drop(b);
        // Once the last subscription is gone, the server stops counting this handle as a receiver.
        let deadline = Instant::now() + DELIVERY;
        while news.publish(&3).await.unwrap() > 0 {
            assert!(
                Instant::now() < deadline,
                "still subscribed after the last subscription was dropped"
            );
            tokio::task::yield_now().await;
        }
    }
    pub async fn a_subscriber_that_falls_behind_gets_a_gap_without_another_message(h: Harness) {
        // Fails if the gap of an overflow waited for a later message: the publisher goes quiet after the
        // burst, and the subscriber must still learn that it missed some.
        let handles = h.handles(2).await;
        let rx = handles[0].channel::<u32>("news").unwrap();
        let tx = handles[1].channel::<u32>("news").unwrap();
        let mut sub = rx.subscribe().await.unwrap();
        for i in 0..1100u32 {
            tx.publish(&i).await.unwrap();
        }
        let mut got = Vec::new();
        loop {
            match next(&mut sub).await {
                ChannelEvent::Message(m) => got.push(m),
                ChannelEvent::Gap => break,
                other => panic!("{other:?}"),
            }
        }
        assert!(got.len() < 1100, "{} messages before the gap", got.len());
        assert!(
            got.windows(2).all(|w| w[0] < w[1]),
            "in order, each at most once"
        );
        // After the gap, the subscription goes on.
        tx.publish(&5000).await.unwrap();
        loop {
            match next(&mut sub).await {
                ChannelEvent::Message(5000) => break,
                ChannelEvent::Message(m) => assert!(m < 1100),
                ChannelEvent::Gap => {}
                other => panic!("{other:?}"),
            }
        }
    }
}

/// Waits until a message published after the gap arrives (publishing until one does: messages published
/// while the subscription is being re-made are lost, which is what the `Gap` said).
async fn flows_again(
    tx: &keyward::Channel<u32>,
    sub: &mut keyward::channel::Subscription<u32>,
    marker: u32,
) {
    let deadline = Instant::now() + DELIVERY;
    loop {
        assert!(Instant::now() < deadline, "messages never flowed again");
        let _ = tx.publish(&marker).await;
        match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
            Ok(Some(Ok(ChannelEvent::Message(m)))) if m == marker => return,
            Ok(Some(Ok(_))) | Err(_) => {}
            Ok(other) => panic!("{other:?}"),
        }
    }
}

async fn expect_gap(sub: &mut keyward::channel::Subscription<u32>) {
    loop {
        match next(sub).await {
            ChannelEvent::Gap => return,
            ChannelEvent::Message(_) => {}
            other => panic!("{other:?}"),
        }
    }
}

/// `CLIENT KILL TYPE pubsub`: the subscriber gets a `Gap`, the connection is re-made and re-subscribed, and
/// messages flow again; the publishing handle's shared connection is not a pub/sub one and is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_subscription_connection_yields_a_gap_then_flows_again() {
    let h = Harness::redis();
    let kw = h.keyward().await;
    let news = kw.channel::<u32>("news").unwrap();
    let mut sub = news.subscribe().await.unwrap();
    flows_again(&news, &mut sub, 1).await;
    let mut raw = h.server().unwrap().connection();
    for round in 2..5u32 {
        let killed: i64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query(&mut raw)
            .unwrap();
        assert!(killed >= 1, "the dedicated connection is a pub/sub client");
        expect_gap(&mut sub).await;
        flows_again(&news, &mut sub, round).await;
    }
}

/// A server that stops answering without closing the socket (black-holed): the heartbeat notices, the
/// subscriber gets a `Gap`, and once the path is back messages flow again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_server_yields_a_gap_then_flows_again() {
    let server = RedisServer::spawn_tcp();
    let proxy = TcpProxy::to_server(&server);
    let policy = Harness::embedded().policy();
    let options = keyward::ConnectOptions::default().response_timeout(Duration::from_millis(300));
    let subscriber = Keyward::connect_with(&proxy.url(), policy.clone(), options)
        .await
        .unwrap();
    let publisher = Keyward::connect(&server.url(), policy).await.unwrap();
    let rx = subscriber.channel::<u32>("news").unwrap();
    let tx = publisher.channel::<u32>("news").unwrap();
    let mut sub = rx.subscribe().await.unwrap();
    flows_again(&tx, &mut sub, 1).await;
    proxy.blackhole();
    let started = Instant::now();
    expect_gap(&mut sub).await;
    println!("gap after {:?} of silence", started.elapsed());
    proxy.forward();
    flows_again(&tx, &mut sub, 2).await;
}

/// Redis restarted (empty, same port): a `Gap`, then the subscription is made again on the new server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_yields_a_gap_then_flows_again() {
    let mut server = RedisServer::spawn_tcp();
    let policy = Harness::embedded().policy();
    let kw = Keyward::connect(&server.url(), policy).await.unwrap();
    let news = kw.channel::<u32>("news").unwrap();
    let mut sub = news.subscribe().await.unwrap();
    flows_again(&news, &mut sub, 1).await;
    server.restart();
    expect_gap(&mut sub).await;
    flows_again(&news, &mut sub, 2).await;
}

/// Subscribing while Redis is down still returns a subscription: it starts with a `Gap` and is live once the
/// server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_while_redis_is_down_starts_with_a_gap() {
    let server = RedisServer::spawn_tcp();
    let proxy = TcpProxy::to_server(&server);
    let policy = Harness::embedded().policy();
    let options = keyward::ConnectOptions::default().response_timeout(Duration::from_millis(300));
    let kw = Keyward::connect_with(&proxy.url(), policy.clone(), options)
        .await
        .unwrap();
    let publisher = Keyward::connect(&server.url(), policy).await.unwrap();
    let tx = publisher.channel::<u32>("news").unwrap();
    proxy.refuse();
    let mut sub = kw
        .channel::<u32>("news")
        .unwrap()
        .subscribe()
        .await
        .unwrap();
    assert_eq!(next(&mut sub).await, ChannelEvent::Gap);
    proxy.forward();
    flows_again(&tx, &mut sub, 1).await;
}
