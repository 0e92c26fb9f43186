//! Distributed locks with fencing tokens: a tour.
//!
//!     cargo run --example lock                                    # embedded backend
//!     REDIS_URL=redis://127.0.0.1:6379 cargo run --example lock   # a real Redis
//!
//! Three workers race for the monthly invoice run; the lock lets one through at a time, a release wakes the
//! next at once, and a worker that stalls past its lease is refused by the fenced write even though it still
//! believes it holds the lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use keyward::Keyward;
use keyward::lock::{FencedWrite, LockOptions};
use keyward::policy::{LockClass, Policy};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::builder("dev", "shop")
        .lock(
            "invoice_run",
            LockClass::new(Duration::from_secs(10)).wait(Duration::from_secs(5)),
        )
        .build()?;
    let kw = Keyward::from_env(policy).await?;
    let locks = kw.locks("invoice_run")?;
    println!("backend: {:?}", kw.backend());

    // 1. Mutual exclusion, with wake-up on release.
    let inside = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..3 {
        let locks = locks.clone();
        let inside = Arc::clone(&inside);
        workers.push(tokio::spawn(async move {
            let guard = locks.lock("2026-11").await?.expect("acquired within 5 s");
            assert_eq!(
                inside.fetch_add(1, Ordering::SeqCst),
                0,
                "never two at once"
            );
            println!("worker {w}: holds the lock, fence {}", guard.fence());
            tokio::time::sleep(Duration::from_millis(50)).await;
            inside.fetch_sub(1, Ordering::SeqCst);
            guard.release().await?;
            Ok::<_, keyward::Error>(())
        }));
    }
    for w in workers {
        w.await??;
    }

    // 2. A holder that stalls past its lease: the lock moves on, and fencing refuses the stale write.
    let short = LockOptions::new().ttl(Duration::from_millis(200));
    let stalled = locks
        .lock_with("2026-12", short.clone())
        .await?
        .expect("free");
    println!(
        "stalled worker: fence {}, then a 400 ms pause (GC, a stopped VM…)",
        stalled.fence()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    stalled.lost().await; // resolved: the lease ran out while it was paused
    let next = locks.try_lock("2026-12").await?.expect("the lease expired");
    println!("next worker: fence {}", next.fence());
    assert_eq!(
        next.fenced_write(b"invoices sent by next").await?,
        FencedWrite::Applied
    );
    match stalled.fenced_write(b"invoices sent by stalled").await? {
        FencedWrite::Stale { highest } => {
            println!("stalled worker's write refused: its fence is below {highest}")
        }
        other => panic!("a stale holder must be refused, got {other:?}"),
    }
    println!(
        "stalled worker's release: {} (it no longer holds the lock)",
        stalled.release().await?
    );
    let (fence, value) = locks.fenced_read("2026-12").await?.expect("written");
    println!(
        "stored: {:?} at fence {fence}",
        String::from_utf8_lossy(&value)
    );
    next.release().await?;

    // 3. A watchdog keeps a short lease alive for as long as the guard lives.
    let guard = locks
        .lock_with("2027-01", short.watchdog(true))
        .await?
        .expect("free");
    tokio::time::sleep(Duration::from_millis(700)).await;
    println!(
        "watchdog: after 3.5 lease lengths the lock is still held: {}",
        locks.try_lock("2027-01").await?.is_none() && !guard.is_lost()
    );
    guard.release().await?;
    Ok(())
}
