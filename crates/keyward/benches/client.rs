//! Client-side micro-benchmarks: the work keyward does in process on every call, measured without a Redis.
//!
//! Run: `cargo bench -p keyward --bench client` (add `-- --quick` for a short run, a name filter such as
//! `-- embedded/` for one group, `--features msgpack` for the MessagePack codec). `cargo test --all-targets`
//! runs each benchmark once as a smoke test.
//!
//! Groups:
//! - `key/*` — building an entry key from a policy ([`KeySpace::key`], as every capability does), with and
//!   without characters that need escaping, single and composite ids;
//! - `envelope/*` — the stored value's header: encode (what a fill writes), parse, and the hit decision
//!   (`judge`), through `keyward::__bench` (crate-private code; that module is not API) and the public
//!   `inspect::cache_entry`;
//! - `codec/*` — encode/decode of a ~1 KiB struct with each codec;
//! - `embedded/*` — whole operations through the public API on the embedded backend (`Keyward::embedded`),
//!   one `block_on` of a current-thread Tokio runtime per call: cache `get` and `get_or_set` hits, `set`,
//!   `invalidate`, a GCRA rate-limit check, a lock acquire + release, a session load.
//!
//! The one decision: everything goes through the public API except the envelope, so a figure moves only when
//! what callers pay moves; the embedded figures include the runtime's `block_on` (a few tens of ns), the same
//! for every operation.

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use keyward::__bench::{BenchStamp, envelope_is_current, envelope_parse};
use keyward::Keyward;
use keyward::codec::{Codec, Json};
use keyward::key::{KeySpace, escape_part};
use keyward::policy::Policy;
use keyward::session::SessionSecrets;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;

const POLICY: &str = r#"
[namespace]
env = "prod"
app = "shop"

[classes.product]
kind = "cache"
ttl = "10m"
invalidation = "catalog service, after every product write"

[classes.api]
kind = "rate_limit"
algorithm = "gcra"
# A burst of 10^9 (the maximum) is never used up in a run: the allowed path is the one measured.
limit = 1000000000
window = "1h"

[classes.invoice_run]
kind = "lock"
ttl = "30s"
watchdog = false

[classes.web_session]
kind = "session"
idle = "2h"
absolute = "12h"
# No extension (a write) during a run: a load is a read.
extend_after = "1h"
"#;

fn policy() -> Policy {
    Policy::from_toml_str(POLICY).expect("the benchmark policy is valid")
}

/// A catalogue entry of about 1 KiB in JSON: the size of a typical cached value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u64,
    sku: String,
    name: String,
    description: String,
    price_cents: u32,
    currency: String,
    in_stock: u32,
    categories: Vec<String>,
    attributes: Vec<(String, String)>,
    rating: f64,
    updated_at: String,
}

fn product() -> Product {
    Product {
        id: 10042,
        sku: "NW-CHAI-10042".into(),
        name: "Chai — 10 boxes × 20 bags".into(),
        description: "A spiced black tea from Assam, blended with cardamom, cinnamon, ginger and clove. \
            Each box holds twenty individually wrapped bags; brew for four minutes in freshly boiled water \
            and add milk and sugar to taste. Sourced from a single estate and packed in recyclable card. \
            Store in a cool, dry place away from strong odours; best before the date printed on the base."
            .into(),
        price_cents: 1800,
        currency: "EUR".into(),
        in_stock: 39,
        categories: vec!["beverages".into(), "tea".into(), "spiced".into(), "gifts".into()],
        attributes: (0..8)
            .map(|i| (format!("attribute_{i}"), format!("value number {i} of the product")))
            .collect(),
        rating: 4.6,
        updated_at: "2026-11-30T22:15:03Z".into(),
    }
}

fn config() -> Criterion {
    // Shorter than the defaults (3 s + 5 s per benchmark): about a minute for the whole file.
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn keys(c: &mut Criterion) {
    let policy = policy();
    let keys = KeySpace::new(&policy, "product").expect("declared class");
    let mut g = c.benchmark_group("key");
    g.bench_function("plain", |b| b.iter(|| keys.key(black_box("NW-CHAI-10042"))));
    g.bench_function("escaped", |b| {
        b.iter(|| keys.key(black_box("user:42 {admin}*?")))
    });
    g.bench_function("composite_int", |b| {
        b.iter(|| keys.key(black_box(&("eu", 10042u64))))
    });
    g.bench_function("composite_escaped", |b| {
        b.iter(|| keys.key(black_box(&("tenant:7", "a b", 10042u64))))
    });
    g.bench_function("escape_part_escaped", |b| {
        b.iter(|| escape_part(black_box("user:42 {admin}*?")).len())
    });
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let payload = Json::encode(&product()).expect("encodes");
    let untagged = BenchStamp::new(3, 17, &[]);
    let tagged = BenchStamp::new(3, 17, &[("product:10042", 5), ("supplier:7", 9)]);
    let v1 = untagged.encode(Some(&payload));
    let v2 = tagged.encode(Some(&payload));
    let mut g = c.benchmark_group("envelope");
    g.bench_function("encode_v1_1k", |b| {
        b.iter(|| untagged.encode(Some(black_box(&payload))))
    });
    g.bench_function("encode_v2_2tags_1k", |b| {
        b.iter(|| tagged.encode(Some(black_box(&payload))))
    });
    g.bench_function("parse_v1", |b| b.iter(|| envelope_parse(black_box(&v1))));
    g.bench_function("parse_v2_2tags", |b| {
        b.iter(|| envelope_parse(black_box(&v2)))
    });
    g.bench_function("judge_v1", |b| {
        b.iter(|| envelope_is_current(black_box(&v1), 3, 17))
    });
    g.bench_function("inspect_cache_entry_v1", |b| {
        b.iter(|| keyward::inspect::cache_entry(black_box(&v1)).is_some())
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    let value = product();
    let json = Json::encode(&value).expect("encodes");
    assert!(
        (900..=1300).contains(&json.len()),
        "the sample should be about 1 KiB of JSON, is {} bytes",
        json.len()
    );
    let mut g = c.benchmark_group("codec");
    g.bench_function("json_encode_1k", |b| {
        b.iter(|| Json::encode(black_box(&value)))
    });
    g.bench_function("json_decode_1k", |b| {
        b.iter(|| Json::decode::<Product>(black_box(&json)))
    });
    #[cfg(feature = "msgpack")]
    {
        use keyward::codec::MsgPack;
        let packed = MsgPack::encode(&value).expect("encodes");
        g.bench_function("msgpack_encode_1k", |b| {
            b.iter(|| MsgPack::encode(black_box(&value)))
        });
        g.bench_function("msgpack_decode_1k", |b| {
            b.iter(|| MsgPack::decode::<Product>(black_box(&packed)))
        });
    }
    g.finish();
}

/// What a session holds in the benchmark: a small cart.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cart {
    items: Vec<(String, u32)>,
    currency: String,
}

fn embedded(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a Tokio runtime");
    let kw = rt.block_on(async { Keyward::embedded(policy()) });
    let value = product();
    let mut g = c.benchmark_group("embedded");

    let cache = kw.cache::<Product>("product").expect("cache class");
    let id = ("eu", 10042u64);
    block(&rt, cache.set(&id, &value)).expect("set");
    g.bench_function("cache_get_hit", |b| {
        b.iter(|| {
            let got = block(&rt, cache.get(black_box(&id))).expect("get");
            assert!(got.is_some(), "a hit");
        })
    });
    g.bench_function("cache_get_or_set_hit", |b| {
        b.iter(|| {
            block(
                &rt,
                cache.get_or_set(black_box(&id), || async {
                    Err::<Product, _>(std::io::Error::other("a hit never loads"))
                }),
            )
            .expect("a hit")
        })
    });
    g.bench_function("cache_set_1k", |b| {
        b.iter(|| block(&rt, cache.set(black_box(&id), &value)).expect("set"))
    });
    g.bench_function("cache_invalidate", |b| {
        b.iter_batched(
            || block(&rt, cache.set(&id, &value)).expect("set"),
            |()| block(&rt, cache.invalidate(black_box(&id))).expect("invalidate"),
            BatchSize::SmallInput,
        )
    });

    let limiter = kw.rate_limiter("api").expect("rate-limit class");
    g.bench_function("ratelimit_check_gcra", |b| {
        b.iter(|| {
            let d = block(&rt, limiter.check(black_box("key_live_42"))).expect("check");
            assert!(d.is_allowed(), "the limit is never reached in a run");
        })
    });

    let locks = kw.locks("invoice_run").expect("lock class");
    g.bench_function("lock_acquire_release", |b| {
        b.iter(|| {
            block(&rt, async {
                let guard = locks
                    .try_lock(black_box("2026-11"))
                    .await
                    .expect("try_lock")
                    .expect("free: released each iteration");
                guard.release().await.expect("release")
            })
        })
    });

    let secrets = SessionSecrets::new([7u8; 32]).expect("32 bytes");
    let sessions = kw
        .sessions::<Cart>("web_session", secrets)
        .expect("session class");
    let cart = Cart {
        items: vec![("NW-CHAI-10042".into(), 2), ("NW-TOFU-10014".into(), 1)],
        currency: "EUR".into(),
    };
    let (token, _) = block(&rt, sessions.create("customer-ALFKI", &cart)).expect("create");
    g.bench_function("session_get", |b| {
        b.iter(|| {
            let s = block(&rt, sessions.get(black_box(token.as_str()))).expect("get");
            assert!(s.is_some(), "a live session");
        })
    });
    g.finish();
}

fn block<F: Future>(rt: &Runtime, f: F) -> F::Output {
    rt.block_on(f)
}

criterion_group! {
    name = benches;
    config = config();
    targets = keys, envelope, codec, embedded
}
criterion_main!(benches);
