//! `crates/storefront/policy.toml`: valid, as `keyward policy check` sees it, declaring every class the
//! storefront needs, with invalidation sentences that name functions that exist.

use std::path::Path;

use keyward::Keyward;
use keyward::policy::Policy;

fn policy_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policy.toml")
}

#[test]
fn the_policy_passes_keyward_policy_check() {
    // `keyward policy check FILE` is `Policy::from_file(FILE)` and then prints the policy's `Display`
    // (crates/keyward-cli/src/policy_cmd.rs): the same two steps, on the file in the repository.
    let policy = Policy::from_file(policy_file()).unwrap_or_else(|e| panic!("{e}"));
    let printed = policy.to_string();
    for class in [
        "catalog_categories",
        "catalog_product_list",
        "catalog_product",
        "my_orders",
        "login_per_ip",
        "login_per_account",
        "web_session",
        "order_request",
        "order_events",
        "nightly_restock",
    ] {
        assert!(policy.class(class).is_some(), "the policy declares {class}");
        assert!(printed.contains(class), "`policy check` prints {class}");
    }
    // The compiled-in copy is this file.
    assert_eq!(
        storefront::POLICY_TOML,
        std::fs::read_to_string(policy_file()).unwrap()
    );
}

#[test]
fn catalog_classes_have_an_l1_jitter_and_a_bound() {
    let policy = storefront::policy().unwrap();
    for class in [
        "catalog_categories",
        "catalog_product_list",
        "catalog_product",
    ] {
        let cache = policy
            .class(class)
            .and_then(|c| c.as_cache())
            .unwrap_or_else(|| panic!("{class} is a cache"));
        let l1 = cache
            .l1_value()
            .unwrap_or_else(|| panic!("{class} has an L1 tier"));
        assert!(l1.ttl() <= cache.ttl_value(), "{class}");
        assert!(
            cache.l1_max_stale_value() <= std::time::Duration::from_secs(1),
            "{class}"
        );
        assert!(!cache.is_personal(), "{class}");
    }
}

#[test]
fn every_invalidation_names_functions_that_exist() {
    let policy = storefront::policy().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for class in policy.classes() {
        let name = class.name();
        let Some(cache) = class.as_cache() else {
            continue;
        };
        let sentence = cache.invalidation_value();
        // `module::function` or `Type::method`: the function must be defined in the crate's sources.
        let named: Vec<&str> = sentence
            .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.contains("::"))
            .collect();
        if cache.is_personal() {
            continue;
        }
        assert!(
            !named.is_empty(),
            "class {name}: the invalidation names no call site: {sentence:?}"
        );
        for path in named {
            let function = path.rsplit("::").next().unwrap();
            let defined = std::fs::read_dir(&src).unwrap().any(|f| {
                let text = std::fs::read_to_string(f.unwrap().path()).unwrap_or_default();
                text.contains(&format!("fn {function}("))
            });
            assert!(
                defined,
                "class {name}: `{path}` in its invalidation is not a function of the crate"
            );
        }
    }
}

#[tokio::test]
async fn personal_orders_stay_out_of_the_shared_cache() {
    let kw = Keyward::embedded(storefront::policy().unwrap());
    let refused = kw
        .cache::<serde_json::Value>("my_orders")
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(refused, keyward::Error::PersonalData { .. }),
        "{refused:?}"
    );
}
