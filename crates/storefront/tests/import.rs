//! The first-start import: every Northwind row lands once, a second start imports nothing, and a broken
//! CSV file is refused with its file, line and column, leaving nothing behind.

use std::path::{Path, PathBuf};

use argon2::password_hash::{PasswordHash, PasswordVerifier};
use storefront::import::{self, Counts, DataSource, ImportError, ImportReport, PasswordCost};
use storefront::{Db, StartError};

use crate::util::{DbDir, Shop, config};

fn northwind_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/northwind")
}

fn count(conn: &rusqlite::Connection, table: &str) -> i64 {
    conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |r| r.get(0))
        .expect("count rows")
}

/// A copy of the Northwind files in a temporary directory, with `file` replaced by `edit(file's text)`.
fn broken_copy(file: &str, edit: impl FnOnce(&str) -> String) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for entry in std::fs::read_dir(northwind_dir()).expect("the data directory") {
        let entry = entry.expect("an entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy a file");
    }
    let path = dir.path().join(file);
    let text = std::fs::read_to_string(&path).expect("read the file");
    std::fs::write(&path, edit(&text)).expect("write the broken file");
    dir
}

/// `text` with line `line` (1-based, the header is 1) replaced by `with`.
fn replace_line(text: &str, line: usize, with: &str) -> String {
    text.lines()
        .enumerate()
        .map(|(i, l)| if i + 1 == line { with } else { l })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn import_from(dir: &DbDir, data: DataSource) -> Result<ImportReport, ImportError> {
    let db = Db::open(&dir.db_file(), 1).expect("open");
    import::ensure_imported(&db, data, PasswordCost::Minimal).await
}

#[tokio::test]
async fn the_first_start_imports_every_row_and_a_second_start_imports_nothing() {
    let dir = DbDir::new();
    let first = import_from(&dir, DataSource::Embedded)
        .await
        .expect("import");
    let ImportReport::Imported(counts) = first else {
        panic!("a fresh database is imported into, got {first:?}");
    };
    let expected = {
        let mut c = Counts::default();
        c.categories = 8;
        c.suppliers = 29;
        c.shippers = 3;
        c.products = 77;
        c.customers = 93;
        c.orders = 830;
        c.order_lines = 2155;
        c
    };
    assert_eq!(counts, expected);

    let conn = dir.sqlite();
    for (table, rows) in [
        ("categories", 8),
        ("suppliers", 29),
        ("shippers", 3),
        ("products", 77),
        ("customers", 93),
        ("orders", 830),
        ("order_lines", 2155),
    ] {
        assert_eq!(count(&conn, table), rows, "{table}");
    }
    // Values land exactly: money in cents, discounts in basis points, quoted commas kept.
    let (name, price, stock): (String, i64, i64) = conn
        .query_row(
            "SELECT name, price_cents, stock FROM products WHERE id = 38",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!((name.as_str(), price, stock), ("Côte de Blaye", 26350, 17));
    let line: (i64, i64, i64) = conn
        .query_row(
            "SELECT unit_price_cents, quantity, discount_bp FROM order_lines WHERE order_id = 10248 AND product_id = 42",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    assert_eq!(line, (980, 10, 0));
    let description: String = conn
        .query_row("SELECT description FROM categories WHERE id = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(description, "Soft drinks, coffees, teas, beers, and ales");

    // The seed step: every customer has a hash of their demo password, and only of it.
    let hashes: Vec<(String, Option<String>)> = conn
        .prepare("SELECT id, password_hash FROM customers ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(hashes.len(), 93);
    let argon2 = PasswordCost::Minimal.hasher();
    for (id, hash) in &hashes[..3] {
        let hash = hash
            .as_deref()
            .unwrap_or_else(|| panic!("{id} has no password"));
        let parsed = PasswordHash::new(hash).expect("a PHC string");
        assert!(
            argon2
                .verify_password(import::demo_password(id).as_bytes(), &parsed)
                .is_ok()
        );
        assert!(argon2.verify_password(b"wrong", &parsed).is_err());
    }
    assert!(
        hashes
            .iter()
            .all(|(_, h)| h.as_deref().is_some_and(|h| h.starts_with("$argon2id$")))
    );

    // A second start (a new pool, as after a restart) finds the marker and writes nothing.
    conn.execute("UPDATE products SET stock = 1234 WHERE id = 1", [])
        .unwrap();
    let second = import_from(&dir, DataSource::Embedded)
        .await
        .expect("second start");
    assert_eq!(second, ImportReport::AlreadyImported);
    assert_eq!(count(&conn, "orders"), 830);
    let stock: i64 = conn
        .query_row("SELECT stock FROM products WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(
        stock, 1234,
        "a second start must not re-import over the live data"
    );
}

#[tokio::test]
async fn two_instances_starting_at_once_import_once() {
    let dir = DbDir::new();
    let (a, b) = tokio::join!(
        import_from(&dir, DataSource::Embedded),
        import_from(&dir, DataSource::Embedded)
    );
    let reports = [a.expect("a"), b.expect("b")];
    assert_eq!(
        reports
            .iter()
            .filter(|r| matches!(r, ImportReport::Imported(_)))
            .count(),
        1,
        "{reports:?}"
    );
    assert_eq!(count(&dir.sqlite(), "order_lines"), 2155);
}

/// Asserts a field error at `file`:`line` column `field`, whose message contains `says`, and that
/// nothing was imported.
fn assert_field_error(
    error: &ImportError,
    dir: &DbDir,
    file: &str,
    line: u64,
    field: &str,
    says: &str,
) {
    match error {
        ImportError::Field {
            file: f,
            line: l,
            field: c,
            reason,
        } => {
            assert!(f.ends_with(file), "{error}");
            assert_eq!((*l, *c), (line, field), "{error}");
            assert!(reason.contains(says), "{error}");
        }
        other => panic!("expected a field error, got {other:?}"),
    }
    let message = error.to_string();
    assert!(
        message.contains(&format!("{file}:{line}")) && message.contains(field),
        "{message}"
    );
    let conn = dir.sqlite();
    for table in ["categories", "products", "customers", "orders", "meta"] {
        assert_eq!(
            count(&conn, table),
            0,
            "{table}: a failed import leaves nothing behind"
        );
    }
}

#[tokio::test]
async fn a_bad_value_is_refused_naming_file_line_and_column_and_nothing_is_imported() {
    // Line 5 of products.csv is product 4; its UnitPrice becomes text.
    let data = broken_copy("products.csv", |t| {
        replace_line(
            t,
            5,
            "4,Chef Anton's Cajun Seasoning,2,2,48 - 6 oz jars,twenty-two,53,0,0,0",
        )
    });
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    assert_field_error(
        &error,
        &dir,
        "products.csv",
        5,
        "UnitPrice",
        "\"twenty-two\"",
    );

    // The same database imports once the file is fixed: the failed start left no marker.
    let report = import_from(&dir, DataSource::Dir(northwind_dir()))
        .await
        .expect("import");
    assert!(matches!(report, ImportReport::Imported(_)));
}

#[tokio::test]
async fn a_reference_to_a_missing_row_is_refused_with_its_line() {
    // order_details.csv line 3 (order 10248's second line) names product 999.
    let data = broken_copy("order_details.csv", |t| {
        replace_line(t, 3, "10248,999,9.8,10,0.0")
    });
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    assert_field_error(
        &error,
        &dir,
        "order_details.csv",
        3,
        "ProductID",
        "no such row in products.csv",
    );

    let data = broken_copy("categories.csv", |t| {
        replace_line(t, 4, "2,Again,Duplicate id")
    });
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    assert_field_error(&error, &dir, "categories.csv", 4, "CategoryID", "duplicate");

    let data = broken_copy("orders.csv", |t| {
        replace_line(
            t,
            2,
            "10248,VINET,5,1996-13-04 00:00:00.000,1996-08-01 00:00:00.000,,3,32.38,Vins,59 rue,Reims,,51100,France",
        )
    });
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    assert_field_error(&error, &dir, "orders.csv", 2, "OrderDate", "not a date");
}

#[tokio::test]
async fn malformed_csv_and_a_missing_column_are_refused() {
    // A record with a field too few: the CSV parser's error, with the line.
    let data = broken_copy("shippers.csv", |t| replace_line(t, 3, "2,United Package"));
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    match &error {
        ImportError::Csv { file, line, .. } => {
            assert!(file.ends_with("shippers.csv"), "{error}");
            assert_eq!(*line, 3, "{error}");
        }
        other => panic!("expected a CSV error, got {other:?}"),
    }
    assert_eq!(count(&dir.sqlite(), "categories"), 0);

    let data = broken_copy("customers.csv", |t| t.replacen("CompanyName", "Company", 1));
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(data.path().to_owned()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ImportError::MissingColumn { file, column: "CompanyName" } if file.ends_with("customers.csv")),
        "{error:?}"
    );

    let missing = tempfile::tempdir().unwrap();
    let dir = DbDir::new();
    let error = import_from(&dir, DataSource::Dir(missing.path().to_owned()))
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ImportError::Read { file, .. } if file.ends_with("categories.csv")),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_failed_import_stops_the_start() {
    let data = broken_copy("products.csv", |t| {
        replace_line(t, 2, "1,Chai,1,1,10 boxes x 20 bags,18,-39,0,10,0")
    });
    let dir = DbDir::new();
    let error = storefront::start(config(&dir).data(DataSource::Dir(data.path().to_owned())))
        .await
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(
            error,
            StartError::Import(ImportError::Field {
                field: "UnitsInStock",
                line: 2,
                ..
            })
        ),
        "{error:?}"
    );
    // And a good start afterwards works on the same file.
    let shop = Shop::embedded(&dir).await;
    shop.get_ok("/products/1").await;
}
