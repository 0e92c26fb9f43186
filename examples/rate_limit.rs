//! Rate limiting tour: a login limiter that fails closed, two API limits checked together (all or nothing), a
//! cost-weighted quota, and a limit in shadow mode.
//!
//! Run it on the embedded backend:       `cargo run --example rate_limit`
//! or against Redis:  `REDIS_URL=redis://127.0.0.1:6379 cargo run --example rate_limit`
//!
//! On Redis the limits' state outlives the process, as it should: run the tour again within a minute and the
//! logins are refused from the first attempt, and the export quota (100 rows an hour) and the daily API count
//! start where the last run left them.

use keyward::Keyward;
use keyward::policy::Policy;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let policy = Policy::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/policy.toml"
    ))?
    // KEYWARD_ENV / KEYWARD_APP, when set, pick the namespace (as they do for the `keyward` CLI).
    .with_env_overrides()?;
    let kw = Keyward::from_env(policy).await?;
    println!("backend: {:?}\n", kw.backend());

    // 1. Login attempts per client IP: GCRA, 5 per minute, 3 at once.
    let login = kw.rate_limiter("login_per_ip")?;
    for attempt in 1..=5 {
        let d = login.check("203.0.113.7").await?;
        if d.is_allowed() {
            println!(
                "login attempt {attempt}: allowed, {} left right now",
                d.remaining()
            );
        } else {
            println!(
                "login attempt {attempt}: refused, retry in {:.1}s (from {:?})",
                d.retry_after().unwrap_or_default().as_secs_f64(),
                d.source()
            );
        }
    }

    // 2. 10 per second AND 1000 per day for one API key, in one atomic check: a refusal charges neither.
    let api = kw.rate_limiter_group(&["api_per_second", "api_per_day"])?;
    let mut allowed = 0;
    for _ in 0..25 {
        allowed += usize::from(api.check("key_live_42").await?.is_allowed());
    }
    let d = api.peek("key_live_42").await?;
    println!(
        "\napi: {allowed} of 25 back-to-back calls allowed; the binding limit is `{}` ({} of {} left)",
        d.binding().class(),
        d.remaining(),
        d.limit()
    );
    for l in d.limits() {
        println!(
            "  {:<15} {} of {} left",
            l.class(),
            l.remaining(),
            l.limit()
        );
    }

    // 3. A weighted quota: an export of 40 rows costs 40 units of 100 per hour.
    let exports = kw.rate_limiter("export_quota")?;
    for rows in [40, 40, 40] {
        let d = exports.check_cost("tenant_7", rows).await?;
        println!(
            "\nexport of {rows} rows: {} ({} units left)",
            if d.is_allowed() {
                "allowed"
            } else {
                "refused, nothing charged"
            },
            d.remaining()
        );
    }
    // A cost above the whole capacity could never pass: that is an error, not a refusal.
    if let Err(e) = exports.check_cost("tenant_7", 500).await {
        println!("export of 500 rows: {e}");
    }

    // 4. Shadow mode: decide and count, never refuse.
    let search = kw.rate_limiter("new_search_limit")?;
    let mut would_refuse = 0;
    for _ in 0..5 {
        let d = search.check("user_9").await?;
        assert!(d.is_allowed());
        would_refuse += usize::from(d.is_shadow_limited());
    }
    println!("\nshadow limit: 5 searches all allowed; {would_refuse} would have been refused");
    Ok(())
}
