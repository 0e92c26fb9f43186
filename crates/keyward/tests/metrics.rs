//! The cache reports what happened through the `metrics` facade, per class.

use std::time::Duration;

use keyward::Keyward;
use keyward::policy::{CacheClass, Policy};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

/// (metric name, labels, counter value)
type Counted = (String, Vec<(String, String)>, u64);

fn counter(snapshot: &[Counted], name: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(n, labels, _)| {
            n == name && labels.iter().any(|(k, v)| k == "class" && v == "product")
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

    let snapshot: Vec<Counted> = snapshotter
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
        .collect();
    assert_eq!(counter(&snapshot, "keyward_cache_hits_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_misses_total"), 3);
    assert_eq!(counter(&snapshot, "keyward_cache_loader_calls_total"), 2);
    assert_eq!(counter(&snapshot, "keyward_cache_loader_errors_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_decode_errors_total"), 1);
    assert_eq!(counter(&snapshot, "keyward_cache_fills_refused_total"), 0);
}
