//! `/dashboard` in a real headless browser: Debian's `chromium`, driven over WebDriver (`chromedriver`,
//! from `chromium-driver`) by `fantoccini`. The shop is served on a real TCP listener; the page must fill
//! its tables and draw its charts after its first poll, and its numbers must move after catalog reads, a
//! login and an order sent over HTTP.
//!
//! **Without chromium or chromedriver this test fails** (with the command that installs them); it never
//! passes without having run. `scripts/test` installs both when it can. Chromium runs as CI runs it: as
//! root, so `--no-sandbox`, `--headless=new`, `--disable-dev-shm-usage`. chromedriver starts in its own
//! process group, and the whole group (chromedriver and every chromium process it started) is killed when
//! the test ends, passing or failing.
//!
//! `STOREFRONT_DASHBOARD_SCREENSHOT=FILE` saves a screenshot of the dashboard with numbers on it (after
//! a few more rounds of traffic, so the charts have lines): that is how `docs/storefront-dashboard.png`
//! was made.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use fantoccini::{Client as WebDriver, ClientBuilder};
use http::StatusCode;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Value, json};

use crate::util::{DbDir, HttpClient, Shop};

const INSTALL_HELP: &str = "the dashboard's browser test needs Debian's chromium and chromedriver: \
     `apt-get install -y chromium chromium-driver` (as root; scripts/test installs them when it can)";

/// How long the page may take to show what the shop did (it polls every 3 s).
const PAGE_DEADLINE: Duration = Duration::from_secs(30);

/// The first of `names` found on `PATH` or in the usual Debian places.
fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/lib/chromium", "/usr/local/bin"].map(PathBuf::from));
    let dirs: Vec<PathBuf> = dirs.collect();
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|dir| dir.join(name))
            .find(|file| file.is_file())
    })
}

/// chromedriver, in its own process group; dropping it kills the group (chromedriver and the chromium
/// processes it started), then reaps chromedriver.
struct ChromeDriver {
    child: Child,
    port: u16,
}

impl ChromeDriver {
    fn start(binary: &Path) -> ChromeDriver {
        let mut child = Command::new(binary)
            // Port 0: chromedriver picks a free port and prints it.
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|error| {
                panic!("cannot run {}: {error}; {INSTALL_HELP}", binary.display())
            });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut driver = ChromeDriver { child, port: 0 };
        let (tx, rx) = mpsc::channel();
        // Keeps reading until chromedriver exits, so its pipe never fills.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut printed = Vec::new();
        driver.port = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromedriver printed no port within 30 s: {printed:?}")
            });
            if let Some(port) = line
                .split("started successfully on port ")
                .nth(1)
                .and_then(|rest| rest.trim_end_matches('.').trim().parse().ok())
            {
                break port;
            }
            printed.push(line);
        };
        driver
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The group's id is chromedriver's pid (`process_group(0)`); chromium's processes inherit it.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless chromium session. Close it with [`Browser::close`]; dropping it kills the processes.
struct Browser {
    webdriver: WebDriver,
    // Dropped after `webdriver`'s session: the profile directory, then the processes.
    _driver: ChromeDriver,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless chromium session; fails the test with the install command if
    /// either is missing.
    async fn start() -> Browser {
        let chromium = find_binary(&["chromium", "chromium-browser"])
            .unwrap_or_else(|| panic!("chromium not found; {INSTALL_HELP}"));
        let chromedriver = find_binary(&["chromedriver"])
            .unwrap_or_else(|| panic!("chromedriver not found; {INSTALL_HELP}"));
        let driver = ChromeDriver::start(&chromedriver);
        let profile = tempfile::tempdir().expect("a profile directory");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless=new",
                    // CI runs as root, where chromium's sandbox refuses to start.
                    "--no-sandbox",
                    // Containers often have a tiny /dev/shm.
                    "--disable-dev-shm-usage",
                    "--disable-gpu",
                    "--no-first-run",
                    "--window-size=1440,900",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let webdriver = ClientBuilder::new(HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{}", driver.port))
            .await
            .unwrap_or_else(|error| {
                panic!(
                    "no WebDriver session with {} driving {}: {error}",
                    chromedriver.display(),
                    chromium.display()
                )
            });
        Browser {
            webdriver,
            _driver: driver,
            _profile: profile,
        }
    }

    /// Ends the session (chromedriver quits chromium), then kills what is left.
    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(10), self.webdriver.clone().close()).await;
    }
}

/// What the page shows, read in one script.
const READ_PAGE: &str = r##"
const t = (id) => document.getElementById(id).textContent;
const polylines = (id) => Array.from(document.querySelectorAll(`#${id} polyline`))
  .map((p) => p.getAttribute("points").trim().split(/\s+/).length);
return {
  updated: t("updated"),
  error: t("error"),
  backend: t("backend"),
  breaker: t("breaker"),
  rows: Array.from(document.querySelectorAll("#caches tbody tr"))
    .map((tr) => Array.from(tr.cells).map((c) => c.textContent)),
  db_queries: t("db-queries"),
  db_saved: t("db-saved"),
  login_allowed: t("login-allowed"),
  login_limited: t("login-limited"),
  login_unavailable: t("login-unavailable"),
  stream_name: t("stream-name"),
  stream_pending: t("stream-pending"),
  stream_lag: t("stream-lag"),
  stream_dead: t("stream-dead"),
  chart_hit: polylines("chart-hit"),
  chart_l1: polylines("chart-l1"),
  chart_db: polylines("chart-db"),
};
"##;

/// The page's figures (as text, the way a reader sees them).
#[derive(Debug, serde::Deserialize)]
struct Page {
    updated: String,
    error: String,
    backend: String,
    breaker: String,
    /// `#caches tbody`: class, hits, L1 hits, misses, loads, hit ratio.
    rows: Vec<Vec<String>>,
    db_queries: String,
    db_saved: String,
    login_allowed: String,
    login_limited: String,
    login_unavailable: String,
    stream_name: String,
    stream_pending: String,
    stream_lag: String,
    stream_dead: String,
    /// Points per polyline in each chart.
    chart_hit: Vec<usize>,
    chart_l1: Vec<usize>,
    chart_db: Vec<usize>,
}

impl Page {
    async fn read(webdriver: &WebDriver) -> Page {
        let value = webdriver
            .execute(READ_PAGE, vec![])
            .await
            .expect("the page's figures");
        serde_json::from_value(value.clone())
            .unwrap_or_else(|error| panic!("unexpected figures {value}: {error}"))
    }

    /// Reads the page until `done` holds (every 100 ms, no fixed sleeps), for at most [`PAGE_DEADLINE`].
    async fn until(webdriver: &WebDriver, what: &str, done: impl Fn(&Page) -> bool) -> Page {
        let deadline = Instant::now() + PAGE_DEADLINE;
        loop {
            let page = Page::read(webdriver).await;
            if done(&page) {
                return page;
            }
            assert!(
                Instant::now() < deadline,
                "the dashboard did not show {what} within {PAGE_DEADLINE:?}: {page:#?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A count shown in `#id`'s text.
    fn count(text: &str, what: &str) -> u64 {
        text.parse()
            .unwrap_or_else(|_| panic!("{what} shows {text:?}, not a count"))
    }

    fn row(&self, class: &str) -> &[String] {
        self.rows
            .iter()
            .find(|r| r.first().is_some_and(|c| c == class))
            .unwrap_or_else(|| panic!("no row for {class}: {:?}", self.rows))
    }

    /// Hits (both tiers) of `class`, from its row.
    fn hits(&self, class: &str) -> u64 {
        Page::count(&self.row(class)[1], class)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_fills_in_and_its_numbers_move_with_traffic() {
    let browser = Browser::start().await;

    // The shop on a real listener, with the order worker beside it (as the binary runs them).
    let dir = DbDir::new();
    let shop = Shop::embedded(&dir).await;
    let (kw, db) = (shop.state.kw.clone(), shop.state.db.clone());
    tokio::spawn(async move { storefront::worker::run(&kw, db, std::future::pending()).await });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = shop
        .app
        .clone()
        .into_make_service_with_connect_info::<SocketAddr>();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");

    // The test runs as its own task, so that a failure still closes the browser before it is reported.
    let outcome = tokio::spawn(drive(browser.webdriver.clone(), base)).await;
    browser.close().await;
    if let Err(error) = outcome {
        std::panic::resume_unwind(error.into_panic());
    }
}

async fn drive(webdriver: WebDriver, base: String) {
    let mut http = HttpClient::new(&base);
    // Reads before the page opens, so that its first poll has hit ratios to draw.
    http.get_ok("/categories").await;
    for _ in 0..3 {
        http.get_ok("/products/1").await;
    }

    webdriver
        .goto(&format!("{base}/dashboard"))
        .await
        .expect("the dashboard loads");
    assert_eq!(
        webdriver.title().await.unwrap(),
        "storefront · keyward dashboard"
    );
    let first = Page::until(&webdriver, "its first poll", |p| p.updated != "never").await;
    eprintln!("dashboard after its first poll: {first:#?}");
    assert_eq!(first.error, "", "{first:#?}");
    assert_eq!(first.backend, "Embedded");
    assert_eq!(first.breaker, "closed");
    let classes: Vec<&str> = first.rows.iter().map(|r| r[0].as_str()).collect();
    assert_eq!(
        classes,
        [
            "catalog_categories",
            "catalog_product_list",
            "catalog_product"
        ],
        "#caches tbody: {first:#?}"
    );
    assert!(first.rows.iter().all(|r| r.len() == 6));
    assert_eq!(first.hits("catalog_product"), 2, "3 reads: 1 load, 2 hits");
    assert_eq!(first.row("catalog_product")[5], "66.7 %");
    let queries = Page::count(&first.db_queries, "#db-queries");
    assert!(queries > 0, "the import and the loads queried SQLite");
    assert_eq!(Page::count(&first.db_saved, "#db-saved"), 2);
    for (text, what) in [
        (&first.login_allowed, "#login-allowed"),
        (&first.login_limited, "#login-limited"),
        (&first.login_unavailable, "#login-unavailable"),
    ] {
        assert_eq!(Page::count(text, what), 0);
    }
    assert_eq!(first.stream_name, "order_events / notifier");
    for (text, what) in [
        (&first.stream_pending, "#stream-pending"),
        (&first.stream_dead, "#stream-dead"),
    ] {
        assert_eq!(Page::count(text, what), 0, "{first:#?}");
    }
    assert_ne!(first.stream_lag, "", "{first:#?}");
    // Two classes have been read (one polyline each, in both hit charts); the database chart has its two.
    assert!(
        first.chart_hit.len() >= 2 && first.chart_l1.len() >= 2,
        "{first:#?}"
    );
    assert_eq!(first.chart_db.len(), 2, "made and saved: {first:#?}");

    // Traffic over HTTP: catalog reads, a login, an order.
    traffic(&mut http, "first").await;
    let after = Page::until(&webdriver, "the traffic", |p| {
        p.login_allowed == "1"
            && p.hits("catalog_product") > first.hits("catalog_product")
            && p.db_queries.parse::<u64>().is_ok_and(|q| q > queries)
            && p.db_saved.parse::<u64>().is_ok_and(|s| s > 2)
            && p.chart_db.iter().all(|&points| points > first.chart_db[0])
    })
    .await;
    eprintln!("dashboard after the traffic: {after:#?}");
    assert_eq!(after.error, "");
    assert!(
        after.hits("catalog_product_list") >= 1,
        "the list was read twice: {after:#?}"
    );
    assert_eq!(Page::count(&after.login_limited, "#login-limited"), 0);

    // Trial finding (issue #15): at 1280 px the tables were wider than the window (the page scrolled
    // sideways). At 1280×800 the page fits, each table fits its card, and no cell is cut off.
    fits_at(&webdriver, 1280, 800, None).await;
    // And with the figures of a shop that has run for months: 15-digit counts, long class names.
    let data = exaggerated(http.get_ok("/dashboard/data").await);
    fits_at(&webdriver, 1280, 800, Some(data)).await;

    if let Some(file) = std::env::var_os("STOREFRONT_DASHBOARD_SCREENSHOT") {
        // More rounds (each reading one more product for the first time), so the charts have lines.
        for round in 0..20 {
            http.get_ok(&format!("/products/{}", 10 + round)).await;
            traffic(&mut http, &format!("more-{round}")).await;
            let polls = Page::read(&webdriver).await.chart_db[0];
            Page::until(&webdriver, "another poll", |p| p.chart_db[0] > polls).await;
        }
        let png = webdriver.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
        std::fs::write(&file, &png).expect("write the screenshot");
        eprintln!("screenshot in {}", PathBuf::from(file).display());
    } else {
        let png = webdriver.screenshot().await.expect("a screenshot");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    }
}

/// What the layout measures at the window's size: the page's width against the window's, and each
/// table's against its card's content box; cells whose text overflows them.
const MEASURE_LAYOUT: &str = r##"
const cards = Array.from(document.querySelectorAll(".card"));
return {
  inner_width: window.innerWidth,
  scroll_width: document.documentElement.scrollWidth,
  tables: Array.from(document.querySelectorAll("table")).map((t) => {
    const card = t.closest(".card");
    const style = getComputedStyle(card);
    const content = card.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
    return [t.id || t.closest(".card").querySelector("h2").textContent, t.offsetWidth, content];
  }),
  cut_cells: Array.from(document.querySelectorAll("td, th"))
    .filter((c) => c.scrollWidth > c.clientWidth + 1)
    .map((c) => c.textContent),
  cards: cards.length,
};
"##;

/// `/dashboard/data` as a long-running busy shop would answer it: every count 15 digits, every class
/// name three times as long.
fn exaggerated(data: Value) -> Value {
    match data {
        Value::Number(n) if n.is_u64() || n.is_i64() => json!(123_456_789_012_345_u64),
        Value::Array(items) => Value::Array(items.into_iter().map(exaggerated).collect()),
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    ("class", Value::String(class)) => (k, json!(class.repeat(3))),
                    (_, v) => (k, exaggerated(v)),
                })
                .collect(),
        ),
        other => other,
    }
}

/// Resize the window to `width`×`height` and assert that nothing is wider than it (see
/// [`MEASURE_LAYOUT`]); with `data`, the page first renders it (its own `render`, in the same script,
/// so no poll comes between).
async fn fits_at(webdriver: &WebDriver, width: u32, height: u32, data: Option<Value>) {
    webdriver
        .set_window_size(width, height)
        .await
        .expect("resize the window");
    let layout = match data {
        Some(data) => webdriver
            .execute(
                &format!("render(arguments[0]);\n{MEASURE_LAYOUT}"),
                vec![data],
            )
            .await
            .expect("the layout's figures with the rendered data"),
        None => webdriver
            .execute(MEASURE_LAYOUT, vec![])
            .await
            .expect("the layout's figures"),
    };
    eprintln!("dashboard layout at {width}x{height}: {layout}");
    let inner = layout["inner_width"].as_u64().expect("innerWidth");
    let scroll = layout["scroll_width"].as_u64().expect("scrollWidth");
    assert!(
        inner > 0 && inner <= u64::from(width),
        "the window is {width} px wide: {layout}"
    );
    assert!(
        scroll <= inner,
        "the page is wider than the window at {width} px: {layout}"
    );
    let tables = layout["tables"].as_array().expect("tables");
    assert_eq!(tables.len(), 3, "{layout}");
    for table in tables {
        let (own, room) = (table[1].as_f64().unwrap(), table[2].as_f64().unwrap());
        assert!(own <= room + 1.0, "a table wider than its card: {layout}");
    }
    assert_eq!(layout["cut_cells"], json!([]), "cells cut off: {layout}");
}

/// Catalog reads (repeated, so some hit), one login (at most once per client), one order under `key`.
async fn traffic(http: &mut HttpClient, key: &str) {
    for path in [
        "/categories",
        "/categories/1/products?page=1",
        "/categories/1/products?page=1",
        "/products/1",
        "/products/2",
        "/products/2",
    ] {
        http.get_ok(path).await;
    }
    if http.cookie.is_none() {
        http.login("ALFKI").await;
    }
    // Chai (product 1): 39 in stock, enough for every round.
    let answer = http.order(key, &[(1, 1)]).await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert!(answer.body.get("id").is_some_and(Value::is_i64));
}
