//! Login, logout and "log out everywhere" through the router, and the two login limits: a refused
//! attempt charges neither limit (but for the race the account module documents).

use http::{Method, StatusCode, header};
use keyward_testkit::RedisServer;
use serde_json::{Value, json};
use storefront::account::LoginForm;

use crate::util::{Client, DbDir, Shop};

/// Login regenerates the session, wrong credentials answer one `401`, logout and log out everywhere end
/// what they say. Run on each backend.
async fn sessions_behave(shop: &Shop) {
    let mut alice = Client::at("192.0.2.1");
    // Not logged in.
    assert_eq!(
        alice.get(shop, "/me").await.status,
        StatusCode::UNAUTHORIZED
    );

    // A wrong password and an unknown id get the same answer, and no cookie.
    let wrong = alice.login_with(shop, "ALFKI", "guess").await;
    let unknown = alice.login_with(shop, "NOONE", "guess").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert_eq!(wrong.body, unknown.body);
    assert!(wrong.headers.get(header::SET_COOKIE).is_none());
    assert!(alice.cookie.is_none());

    // The id's case does not matter; the session says who logged in.
    let ok = alice.login_with(shop, "alfki", "alfki@northwind").await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.body);
    assert_eq!(ok.body["id"], json!("ALFKI"));
    let set_cookie = ok.headers[header::SET_COOKIE].to_str().unwrap();
    assert!(set_cookie.starts_with("__Host-session="), "{set_cookie}");
    assert!(set_cookie.contains("HttpOnly"), "{set_cookie}");
    let me = alice.get(shop, "/me").await;
    assert_eq!(
        (me.status, me.body["id"].clone()),
        (StatusCode::OK, json!("ALFKI"))
    );

    // Session fixation: a login made with a cookie gets a new token, and the old one is dead.
    let planted = alice.clone();
    alice.login(shop, "ANATR").await;
    assert_ne!(alice.cookie, planted.cookie, "a login sets a new token");
    assert_eq!(alice.get(shop, "/me").await.body["id"], json!("ANATR"));
    let mut planted = planted;
    assert_eq!(
        planted.get(shop, "/me").await.status,
        StatusCode::UNAUTHORIZED
    );

    // Logout ends the session and clears the cookie.
    let out = alice
        .send(shop, Method::POST, "/logout", Value::Null, &[])
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert!(alice.cookie.is_none());

    // Log out everywhere: both of ALFKI's devices, not ANATR's.
    let (mut phone, mut laptop, mut other) = (
        Client::at("192.0.2.2"),
        Client::at("192.0.2.3"),
        Client::at("192.0.2.4"),
    );
    phone.login(shop, "ALFKI").await;
    laptop.login(shop, "ALFKI").await;
    other.login(shop, "ANATR").await;
    let ended = phone
        .send(shop, Method::POST, "/logout/everywhere", Value::Null, &[])
        .await;
    assert_eq!(ended.status, StatusCode::OK, "{}", ended.body);
    assert_eq!(ended.body["sessions_ended"], json!(2));
    assert!(phone.cookie.is_none(), "this device's cookie is cleared");
    let mut laptop_again = laptop.clone();
    assert_eq!(
        laptop_again.get(shop, "/me").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(other.get(shop, "/me").await.status, StatusCode::OK);
    // Without a session there is nothing to end everywhere.
    let none = phone
        .send(shop, Method::POST, "/logout/everywhere", Value::Null, &[])
        .await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn sessions_on_the_embedded_backend() {
    let dir = DbDir::new();
    sessions_behave(&Shop::embedded(&dir).await).await;
}

#[tokio::test]
async fn sessions_on_redis() {
    let redis = RedisServer::spawn();
    let dir = DbDir::new();
    sessions_behave(&Shop::on_redis(&dir, &redis.url()).await).await;
}

#[tokio::test]
async fn the_account_limit_refuses_from_any_ip_without_charging_the_ip() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let limits = &shop.state.login_limits;
    let per_account = limits.per_account.configs().next().unwrap().1.limit_value();

    // `per_account` wrong guesses, each from another address.
    for i in 0..per_account {
        let mut client = Client::at(&format!("198.51.100.{}", i + 1));
        let answer = client.login_with(&shop, "BERGS", "guess").await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "attempt {i}");
    }
    // Now even the right password, from a fresh address, is refused, with Retry-After.
    let fresh = "203.0.113.9";
    let before = limits.per_ip.peek(fresh).await.unwrap().remaining();
    let mut client = Client::at(fresh);
    let refused = client.login_with(&shop, "BERGS", "bergs@northwind").await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.body
    );
    let retry: u64 = refused.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    assert!(client.cookie.is_none());
    // All or nothing: the refused attempt did not charge the address.
    assert_eq!(limits.per_ip.peek(fresh).await.unwrap().remaining(), before);
    // Other accounts from that address are fine; the canonical id is what is limited.
    client.login(&shop, "BLAUS").await;
    let lower = client.login_with(&shop, "bergs", "bergs@northwind").await;
    assert_eq!(lower.status, StatusCode::TOO_MANY_REQUESTS);
}

#[tokio::test]
async fn the_ip_limit_refuses_without_charging_the_account() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let limits = &shop.state.login_limits;
    let ids: Vec<String> = dir
        .sqlite()
        .prepare("SELECT id FROM customers ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();

    // From one address, one attempt per account until the address is refused.
    let mut client = Client::at("192.0.2.77");
    let mut allowed = 0;
    let refused_on = loop {
        let id = &ids[allowed];
        let answer = client.login_with(&shop, id, "guess").await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            break id.clone();
        }
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{}", answer.body);
        allowed += 1;
        assert!(allowed < 40, "the per-IP limit never refused");
    };
    // GCRA with burst 10 lets about the burst through at once.
    assert!((10..=11).contains(&allowed), "{allowed} attempts allowed");
    // The refused attempt did not charge its account, and the right password from elsewhere works.
    let full = limits.per_account.configs().next().unwrap().1.limit_value();
    assert_eq!(
        limits
            .per_account
            .peek(refused_on.as_str())
            .await
            .unwrap()
            .remaining(),
        full
    );
    Client::at("192.0.2.78").login(&shop, &refused_on).await;
}

#[tokio::test]
async fn malformed_logins_are_refused_and_passwords_stay_out_of_debug() {
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let mut client = Client::at("192.0.2.5");
    for body in [
        json!({"customer_id": "ALF:KI", "password": "x"}),
        json!({"customer_id": "", "password": "x"}),
        json!({"customer_id": "ALFKI"}),
    ] {
        let answer = client
            .send(&shop, Method::POST, "/login", body.clone(), &[])
            .await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{body}");
    }
    let form: LoginForm =
        serde_json::from_value(json!({"customer_id": "ALFKI", "password": "hunter2-secret"}))
            .unwrap();
    assert!(!format!("{form:?}").contains("hunter2"));
}

#[tokio::test]
async fn with_redis_gone_a_login_is_a_503_not_a_429() {
    let mut redis = RedisServer::spawn();
    let dir = DbDir::new();
    let shop = Shop::on_redis(&dir, &redis.url()).await;
    let mut client = Client::at("192.0.2.60");
    client.login(&shop, "ALFKI").await;
    redis.kill();
    // The login classes fail closed (`on_error = "deny"`): refused, but as an outage, with Retry-After.
    let answer = client.login_with(&shop, "ALFKI", "alfki@northwind").await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert!(answer.headers.get(header::RETRY_AFTER).is_some());
    assert!(
        !answer.body.to_string().contains("redis"),
        "no internals in the body: {}",
        answer.body
    );
}
