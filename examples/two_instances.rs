//! Two instances of a service, each with its own in-process tier (L1), staying in sync: instance B serves a
//! product from its own memory, instance A changes the product and invalidates it, and B stops serving the old
//! value within the class's `l1_max_stale`.
//!
//! Against Redis (two handles = two instances, each with its own connection and L1):
//!     `REDIS_URL=redis://127.0.0.1:6379 cargo run --example two_instances`
//! Without `REDIS_URL` both "instances" share one embedded store in this process, where invalidation is
//! immediate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keyward::policy::{CacheClass, L1Tier, Policy};
use keyward::{CacheLookup, Keyward};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::builder("dev", "two-instances")
        .cache(
            "product",
            CacheClass::new(
                Duration::from_secs(600),
                "catalog service, after each product write",
            )
            .l1(L1Tier::new(16 * 1024 * 1024, Duration::from_secs(60)))
            .l1_max_stale(Duration::from_millis(500)),
        )
        .build()?;
    let (a, b) = match std::env::var("REDIS_URL") {
        Ok(url) => (
            Keyward::connect(&url, policy.clone()).await?,
            Keyward::connect(&url, policy).await?,
        ),
        Err(_) => {
            let kw = Keyward::embedded(policy);
            (kw.clone(), kw)
        }
    };
    let (cache_a, cache_b) = (a.cache::<u32>("product")?, b.cache::<u32>("product")?);

    // The "database": the price of product 42, in cents. A previous run left its last price cached in Redis
    // (for the class's TTL): start from a clean entry, so that B loads this run's price.
    let price = Arc::new(AtomicU32::new(1999));
    cache_a.invalidate(&42).await?;
    let load = |price: &Arc<AtomicU32>| {
        let p = price.load(Ordering::SeqCst);
        move || async move { Ok::<_, std::io::Error>(p) }
    };

    // B reads until it serves the price from its own memory (a new instance vouches for its L1 once its
    // first heartbeat came back).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (p, how) = cache_b.get_or_set_with_status(&42, load(&price)).await?;
        println!("B reads {p} ({})", how.as_str());
        if how == CacheLookup::L1Hit {
            break;
        }
        if Instant::now() > deadline {
            return Err("B never served from L1".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A writes the database first, then invalidates: Redis and every instance's L1.
    cache_a
        .invalidate_after(&42, async {
            price.store(1499, Ordering::SeqCst);
            Ok::<_, std::io::Error>(())
        })
        .await?;
    let returned = Instant::now();
    println!("A changed the price to 1499 and invalidated");

    loop {
        let (p, how) = cache_b.get_or_set_with_status(&42, load(&price)).await?;
        if p == 1499 {
            println!(
                "B reads {p} ({}) {:?} after the invalidation returned (bound: 500ms)",
                how.as_str(),
                returned.elapsed()
            );
            break;
        }
        assert!(
            returned.elapsed() < Duration::from_millis(500),
            "B served a stale price past the bound"
        );
    }
    let stats = cache_b.stats();
    println!(
        "B: {} hits, of which {} from L1; {} loads",
        stats.hits, stats.l1_hits, stats.loader_calls
    );
    Ok(())
}
