//! An order-placed event sent to an email worker through a stream: the event is published in the same script
//! that applies the stream's retention; the worker acknowledges it only after the "email" was sent, retries a
//! failure with backoff, and dead-letters an event that keeps failing.
//!
//!     cargo run --example order_events                                   # embedded backend
//!     REDIS_URL=redis://127.0.0.1:6379 cargo run --example order_events   # Redis

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keyward::Keyward;
use keyward::policy::{Backoff, Policy, Retention, StreamClass};
use keyward::stream::Message;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u64,
    email: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::builder("dev", "order-events")
        .stream(
            "order_events",
            StreamClass::new(Retention::maxlen(100_000))
                .max_deliveries(3)
                .backoff(Backoff::new(
                    Duration::from_millis(50),
                    2.0,
                    Duration::from_secs(1),
                ))
                .claim_idle(Duration::from_secs(5)),
        )
        .build()?;
    let kw = match std::env::var("REDIS_URL") {
        Ok(url) => Keyward::connect(&url, policy).await?,
        Err(_) => Keyward::embedded(policy),
    };
    let events = kw.stream::<OrderPlaced>("order_events")?;

    // The web handler's side: publish after the order's database transaction committed.
    let mut bad_entry = None;
    for order in 1..=5 {
        let email = if order == 4 {
            "not-an-address".to_owned() // this one will never send
        } else {
            format!("buyer{order}@example.com")
        };
        let id = events.publish(&OrderPlaced { order, email }).await?;
        println!("published order {order} as entry {id}");
        if order == 4 {
            bad_entry = Some(id);
        }
    }
    let bad_entry = bad_entry.expect("order 4 was published");

    // The email worker: at least once, so sending must be idempotent in a real service (key it by the order
    // id with keyward's idempotency keys).
    let sent = Arc::new(AtomicU32::new(0));
    let all_done = Arc::new(Notify::new());
    let worker = {
        let (sent, all_done) = (sent.clone(), all_done.clone());
        events
            .worker("mailer", move |m: Message<OrderPlaced>| {
                let (sent, all_done) = (sent.clone(), all_done.clone());
                async move {
                    if !m.event.email.contains('@') {
                        println!(
                            "order {}: delivery {} failed (bad address)",
                            m.event.order, m.deliveries
                        );
                        return Err(format!("cannot send to {:?}", m.event.email));
                    }
                    println!("order {}: email sent to {}", m.event.order, m.event.email);
                    if sent.fetch_add(1, Ordering::SeqCst) + 1 == 4 {
                        all_done.notify_one();
                    }
                    Ok(())
                }
            })
            .concurrency(4)
            .shutdown_grace(Duration::from_secs(2))
    };
    let stop = Arc::new(Notify::new());
    let run = {
        let stop = stop.clone();
        tokio::spawn(worker.run(async move { stop.notified().await }))
    };
    all_done.notified().await;
    // Wait for this run's bad order to reach the dead letters (3 deliveries with backoff), then shut down.
    // On Redis the dead letters of earlier runs are still there (they are kept for 14 days), so look for
    // this run's entry, not for any dead letter.
    let dead = loop {
        let dead: Vec<_> = events
            .dead_letters(10_000)
            .await?
            .into_iter()
            .filter(|d| d.id == bad_entry)
            .collect();
        if !dead.is_empty() {
            break dead;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.notify_one();
    let report = run.await??;
    println!("worker: {report:?}");
    for d in dead {
        println!(
            "dead letter: entry {} after {} deliveries, last error: {}",
            d.id, d.deliveries, d.error
        );
    }
    Ok(())
}
