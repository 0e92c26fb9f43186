//! The cache reports what happened through the `metrics` facade, per class.

use std::time::Duration;

use keyward::Keyward;
use keyward::policy::{CacheClass, Policy};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// (metric name, labels, counter value)
type Counted = (String, Vec<(String, String)>, u64);

fn counters(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<Counted> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(v) => {
                let labels = key
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                Some((key.key().name().to_owned(), labels, v))
            }
            _ => None,
        })
        .collect()
}

fn counter(snapshot: &[Counted], name: &str) -> u64 {
    counter_of(snapshot, name, "product")
}

fn counter_of(snapshot: &[Counted], name: &str, class: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(n, labels, _)| {
            n == name && labels.iter().any(|(k, v)| k == "class" && v == class)
        })
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test]
async fn counters_follow_what_the_cache_did() {
    let policy = Policy::builder("test", "metrics")
        .cache("product", CacheClass::new(Duration::from_secs(60), "tests"))
        .build()
        .unwrap();
    let kw = Keyward::embedded(policy);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // Handles are registered when the cache handle is made; they keep reporting to this recorder.
    let text = metrics::with_local_recorder(&recorder, || kw.cache::<String>("product")).unwrap();
    let number = metrics::with_local_recorder(&recorder, || kw.cache::<u64>("product")).unwrap();

    text.get_or_set("a", || async { Ok::<_, std::io::Error>("x".to_owned()) })
        .await
        .unwrap(); // miss + loader call
    text.get_or_set("a", || async { Ok::<_, std::io::Error>("y".to_owned()) })
        .await
        .unwrap(); // hit
    let _ = text
        .get_or_set("b", || async {
            Err::<String, _>(std::io::Error::other("down"))
        })
        .await; // miss + loader call + loader error
    assert_eq!(number.get("a").await.unwrap(), None); // decode error (healed) + miss

    let snapshot = counters(&snapshotter);
    assert_eq!(counter(&snapshot, "keyward_cache_hits_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_misses_total"), 3);
    assert_eq!(counter(&snapshot, "keyward_cache_loader_calls_total"), 2);
    assert_eq!(counter(&snapshot, "keyward_cache_loader_errors_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_decode_errors_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_fills_refused_total"), 0);
}

#[test]
fn rate_limit_counters_follow_the_decisions() {
    use keyward::policy::{Algorithm, RateLimitClass};
    let policy = Policy::builder("test", "metrics")
        .rate_limit(
            "login",
            RateLimitClass::new(Algorithm::Gcra, 2, Duration::from_secs(60)).block_cache(true),
        )
        .rate_limit(
            "trial",
            RateLimitClass::new(Algorithm::FixedWindow, 1, Duration::from_secs(60)).shadow(true),
        )
        .build()
        .unwrap();
    let kw = Keyward::embedded(policy);
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The checks run on this thread (current-thread runtime), so the thread-local recorder sees them.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    metrics::with_local_recorder(&recorder, || {
        rt.block_on(async {
            let login = kw.rate_limiter("login").unwrap();
            let trial = kw.rate_limiter("trial").unwrap();
            for _ in 0..5 {
                login.check("u").await.unwrap(); // 2 allowed, 1 limited by the store, 2 by the block cache
                trial.check("u").await.unwrap(); // 1 allowed, 4 would-have-been-limited
            }
            login.peek("u").await.unwrap(); // peeks are not counted
        })
    });
    let snapshot = counters(&snapshotter);
    assert_eq!(
        counter_of(&snapshot, "keyward_ratelimit_allowed_total", "login"),
        2
    );
    assert_eq!(
        counter_of(&snapshot, "keyward_ratelimit_limited_total", "login"),
        1
    );
    assert_eq!(
        counter_of(
            &snapshot,
            "keyward_ratelimit_blocked_locally_total",
            "login"
        ),
        2
    );
    assert_eq!(
        counter_of(&snapshot, "keyward_ratelimit_allowed_total", "trial"),
        0
    );
    assert_eq!(
        counter_of(&snapshot, "keyward_ratelimit_shadow_limited_total", "trial"),
        4
    );
    assert_eq!(
        counter_of(&snapshot, "keyward_ratelimit_errors_total", "login"),
        0
    );
}
