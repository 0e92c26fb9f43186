//! The classic product-list demo: the first call loads from the "database", the second is a cache hit, and an
//! update invalidates — after the database write, never before.
//!
//! Run it on the embedded backend:       `cargo run --example quickstart`
//! or against Redis:  `REDIS_URL=redis://127.0.0.1:6379 cargo run --example quickstart`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keyward::Keyward;
use keyward::policy::Policy;
use serde::{Deserialize, Serialize};
use tokio::sync::RwLock;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Product {
    id: u32,
    name: String,
    price_cents: u32,
}

/// A stand-in for the real database: slow reads, and a count of how often it was asked.
#[derive(Default)]
struct Database {
    products: RwLock<Vec<Product>>,
    queries: AtomicUsize,
}

impl Database {
    async fn list_products(&self) -> Result<Vec<Product>, std::io::Error> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await; // a slow query
        Ok(self.products.read().await.clone())
    }

    async fn insert(&self, p: Product) -> Result<(), std::io::Error> {
        self.products.write().await.push(p);
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let policy = Policy::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/policy.toml"
    ))?
    // KEYWARD_ENV / KEYWARD_APP, when set, pick the namespace (as they do for the `keyward` CLI).
    .with_env_overrides()?;
    let kw = Keyward::from_env(policy).await?;
    println!("connected: {kw:?}");

    let db = Arc::new(Database::default());
    db.insert(Product {
        id: 1,
        name: "apple".into(),
        price_cents: 120,
    })
    .await?;
    let products = kw.cache::<Vec<Product>>("product_list")?;
    // Start from a clean slate when run repeatedly against the same Redis.
    products.invalidate("all").await?;

    for attempt in ["first call", "second call"] {
        let t = Instant::now();
        let list = products.get_or_set("all", || db.list_products()).await?;
        println!(
            "{attempt}: {} product(s) in {:?} (database queries so far: {})",
            list.len(),
            t.elapsed(),
            db.queries.load(Ordering::SeqCst)
        );
    }

    // An update: write the source of truth, then invalidate (invalidate_after does both, in that order).
    products
        .invalidate_after(
            "all",
            db.insert(Product {
                id: 2,
                name: "pear".into(),
                price_cents: 90,
            }),
        )
        .await?;
    let t = Instant::now();
    let list = products.get_or_set("all", || db.list_products()).await?;
    println!(
        "after update: {} product(s) in {:?} (database queries so far: {})",
        list.len(),
        t.elapsed(),
        db.queries.load(Ordering::SeqCst)
    );

    // A stampede: 100 concurrent requests on a cold key load once.
    products.invalidate("all").await?;
    let before = db.queries.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (products, db) = (products.clone(), db.clone());
        tasks.push(tokio::spawn(async move {
            products.get_or_set("all", || db.list_products()).await
        }));
    }
    for t in tasks {
        t.await??;
    }
    println!(
        "100 concurrent requests on a cold key: {} database query",
        db.queries.load(Ordering::SeqCst) - before
    );

    // Personal data stays out of the shared cache unless the class says so.
    match kw.cache::<String>("user_profile") {
        Err(e) => println!("refused as designed: {e}"),
        Ok(_) => unreachable!("the policy marks user_profile personal"),
    }
    Ok(())
}
