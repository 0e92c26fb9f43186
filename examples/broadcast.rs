//! A broadcast on a typed channel: one instance announces catalog changes, the others drop what they derived
//! from the catalog. Channels may lose messages (Redis pub/sub keeps nothing), so a subscriber also re-reads
//! its source whenever the subscription reports a `Gap`.
//!
//!     cargo run --example broadcast                                   # embedded backend
//!     REDIS_URL=redis://127.0.0.1:6379 cargo run --example broadcast   # Redis
//!
//! The run lasts about 0.3 s. A `Gap` appears after the subscription's connection drops:
//! `crates/keyward/tests/channel.rs` kills it with `CLIENT KILL TYPE pubsub` and checks that the subscriber
//! gets the `Gap`, is re-subscribed, and hears the next message.

use std::time::Duration;

use futures_util::StreamExt;
use keyward::policy::{ChannelClass, Policy};
use keyward::{ChannelEvent, Keyward};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct CatalogChanged {
    product: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::builder("dev", "broadcast")
        .channel("catalog_changes", ChannelClass::new())
        .build()?;
    let (announcer, listener) = match std::env::var("REDIS_URL") {
        Ok(url) => (
            Keyward::connect(&url, policy.clone()).await?,
            Keyward::connect(&url, policy).await?,
        ),
        Err(_) => {
            let kw = Keyward::embedded(policy);
            (kw.clone(), kw)
        }
    };
    let mut changes = listener
        .channel::<CatalogChanged>("catalog_changes")?
        .subscribe()
        .await?;
    let listening = tokio::spawn(async move {
        let mut seen = 0;
        while let Some(event) = changes.next().await {
            match event {
                Ok(ChannelEvent::Message(change)) => {
                    println!(
                        "listener: product {} changed: dropping what I derived from it",
                        change.product
                    );
                    seen += 1;
                    if seen == 3 {
                        break;
                    }
                }
                Ok(ChannelEvent::Gap) => {
                    println!("listener: messages may have been missed: re-reading the catalog")
                }
                Ok(_) => {}
                Err(e) => println!("listener: undecodable message: {e}"),
            }
        }
    });
    let channel = announcer.channel::<CatalogChanged>("catalog_changes")?;
    for product in [42, 7, 42] {
        let receivers = channel.publish(&CatalogChanged { product }).await?;
        println!("announcer: product {product} changed ({receivers} subscription(s) heard it)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::timeout(Duration::from_secs(10), listening).await??;
    Ok(())
}
