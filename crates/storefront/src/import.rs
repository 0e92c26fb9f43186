//! The first-start import: the Northwind CSV files into SQLite, and the seed step that gives every customer
//! a password.
//!
//! **The one decision to know:** the whole import is one transaction that ends by writing the marker
//! `meta.northwind_imported`. A start that finds the marker imports nothing; a start that fails half-way
//! (a bad CSV line, a crash) leaves no rows behind and the next start tries again; two instances starting
//! at once on one file queue on SQLite's write lock and the second finds the marker.
//!
//! Every value is checked as it is read, and an error names the file, the line and the column
//! ([`ImportError::Field`]); references between files (a product's category, an order line's product) are
//! checked too, with the line of the row that points nowhere.
//!
//! The CSV files are compiled into the binary ([`DataSource::Embedded`]), so the shop starts from any
//! directory; [`DataSource::Dir`] reads another copy (the tests feed it broken files).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use argon2::password_hash::{PasswordHasher, SaltString, rand_core::OsRng};
use argon2::{Algorithm, Argon2, Params, Version};
use rusqlite::{Transaction, params};

use crate::db::{Db, DbError};

/// The marker row in `meta` that says the import ran.
const IMPORTED_MARKER: &str = "northwind_imported";

/// The Northwind files, as compiled in.
const EMBEDDED: [(&str, &str); 7] = [
    (
        "categories.csv",
        include_str!("../data/northwind/categories.csv"),
    ),
    (
        "suppliers.csv",
        include_str!("../data/northwind/suppliers.csv"),
    ),
    (
        "shippers.csv",
        include_str!("../data/northwind/shippers.csv"),
    ),
    (
        "products.csv",
        include_str!("../data/northwind/products.csv"),
    ),
    (
        "customers.csv",
        include_str!("../data/northwind/customers.csv"),
    ),
    ("orders.csv", include_str!("../data/northwind/orders.csv")),
    (
        "order_details.csv",
        include_str!("../data/northwind/order_details.csv"),
    ),
];

/// Where the Northwind CSV files come from.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub enum DataSource {
    /// The copy compiled into the binary (`crates/storefront/data/northwind/`).
    #[default]
    Embedded,
    /// A directory holding `categories.csv`, `suppliers.csv`, `shippers.csv`, `products.csv`,
    /// `customers.csv`, `orders.csv` and `order_details.csv`.
    Dir(PathBuf),
}

impl DataSource {
    /// The name errors use for `file`: its path for a directory, `northwind/<file>` for the embedded copy.
    fn name(&self, file: &str) -> String {
        match self {
            DataSource::Embedded => format!("northwind/{file}"),
            DataSource::Dir(dir) => dir.join(file).display().to_string(),
        }
    }

    fn read(&self, file: &'static str) -> Result<Cow<'static, str>, ImportError> {
        match self {
            DataSource::Embedded => EMBEDDED
                .iter()
                .find(|(name, _)| *name == file)
                .map(|(_, text)| Cow::Borrowed(*text))
                .ok_or_else(|| ImportError::Read {
                    file: self.name(file),
                    source: std::io::Error::new(std::io::ErrorKind::NotFound, "not embedded"),
                }),
            DataSource::Dir(dir) => std::fs::read_to_string(dir.join(file))
                .map(Cow::Owned)
                .map_err(|source| ImportError::Read {
                    file: self.name(file),
                    source,
                }),
        }
    }
}

/// How expensive the seeded password hashes are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordCost {
    /// Argon2id with the parameters OWASP recommends (19 MiB, 2 passes, 1 lane): about 15 ms per hash
    /// on one core, 1.5 s for the 93 customers.
    #[default]
    Recommended,
    /// Argon2id at its minimum (8 KiB, 1 pass): **for tests only**, where 93 hashes per fresh database
    /// would cost more than the test. Far too cheap for a real password.
    Minimal,
}

impl PasswordCost {
    /// The Argon2id hasher for this cost.
    pub fn hasher(self) -> Argon2<'static> {
        let params = match self {
            PasswordCost::Recommended => Params::default(),
            PasswordCost::Minimal => {
                Params::new(Params::MIN_M_COST, Params::MIN_T_COST, 1, None).unwrap_or_default()
            }
        };
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
    }
}

/// The password the seed step gives customer `customer_id` (e.g. `ALFKI` → `alfki@northwind`).
///
/// Northwind is public sample data and so are these passwords: they exist so that the replay and the
/// tests can log in as any customer. A real shop never seeds passwords.
pub fn demo_password(customer_id: &str) -> String {
    format!("{}@northwind", customer_id.to_ascii_lowercase())
}

/// A failed import. Nothing was written (the import is one transaction).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImportError {
    /// A file could not be read.
    #[error("{file}: cannot read: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not valid CSV (an unclosed quote, the wrong number of fields).
    #[error("{file}:{line}: not valid CSV: {source}")]
    Csv {
        /// The file.
        file: String,
        /// The line (1-based; the header is line 1).
        line: u64,
        /// The parser's error.
        #[source]
        source: csv::Error,
    },
    /// The header lacks a column the import needs.
    #[error("{file}: the header has no column `{column}`")]
    MissingColumn {
        /// The file.
        file: String,
        /// The missing column.
        column: &'static str,
    },
    /// A value that cannot be used: not a number, out of range, empty where required, a duplicate id, or
    /// a reference to a row that does not exist.
    #[error("{file}:{line}: column `{field}`: {reason}")]
    Field {
        /// The file.
        file: String,
        /// The line (1-based; the header is line 1).
        line: u64,
        /// The column.
        field: &'static str,
        /// What is wrong, with the value (cut to 40 characters).
        reason: String,
    },
    /// A password hash could not be made.
    #[error("seeding the password of customer {customer}: {reason}")]
    Seed {
        /// The customer id.
        customer: String,
        /// Argon2's error.
        reason: String,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// What [`ensure_imported`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImportReport {
    /// The database already held the import; nothing was read or written.
    AlreadyImported,
    /// The import ran; the rows written per table.
    Imported(Counts),
}

/// Rows written per table by an import.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Counts {
    /// `categories`.
    pub categories: usize,
    /// `suppliers`.
    pub suppliers: usize,
    /// `shippers`.
    pub shippers: usize,
    /// `products`.
    pub products: usize,
    /// `customers` (each with a seeded password).
    pub customers: usize,
    /// `orders`.
    pub orders: usize,
    /// `order_lines`.
    pub order_lines: usize,
}

/// Import the Northwind data into `db` unless it already holds it, and seed every customer's password
/// ([`demo_password`], hashed at `cost`).
///
/// # Errors
/// [`ImportError`] naming the file, line and column of a bad value; nothing is written then.
pub async fn ensure_imported(
    db: &Db,
    source: DataSource,
    cost: PasswordCost,
) -> Result<ImportReport, ImportError> {
    db.write(move |tx| {
        let done: bool = tx
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM meta WHERE key = ?1)",
                [IMPORTED_MARKER],
                |row| row.get(0),
            )
            .map_err(DbError::query("read the import marker"))?;
        if done {
            return Ok(ImportReport::AlreadyImported);
        }
        let counts = import(tx, &source, cost)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, datetime('now'))",
            [IMPORTED_MARKER],
        )
        .map_err(DbError::query("write the import marker"))?;
        Ok(ImportReport::Imported(counts))
    })
    .await
}

fn import(
    tx: &Transaction<'_>,
    source: &DataSource,
    cost: PasswordCost,
) -> Result<Counts, ImportError> {
    let mut counts = Counts::default();

    let mut categories = HashSet::new();
    counts.categories = each_row(
        source,
        "categories.csv",
        &["CategoryID", "CategoryName", "Description"],
        |row| {
            let id = row.id("CategoryID", &mut categories)?;
            tx.execute(
                "INSERT INTO categories (id, name, description) VALUES (?1, ?2, ?3)",
                params![id, row.required("CategoryName")?, row.text("Description")?],
            )
            .map_err(DbError::query("insert a category"))?;
            Ok(())
        },
    )?;

    let mut suppliers = HashSet::new();
    counts.suppliers = each_row(
        source,
        "suppliers.csv",
        &[
            "SupplierID",
            "CompanyName",
            "ContactName",
            "ContactTitle",
            "Address",
            "City",
            "Region",
            "PostalCode",
            "Country",
            "Phone",
            "Fax",
            "HomePage",
        ],
        |row| {
            let id = row.id("SupplierID", &mut suppliers)?;
            tx.execute(
                "INSERT INTO suppliers (id, company_name, contact_name, contact_title, address, city, region, \
                 postal_code, country, phone, fax, home_page) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    id,
                    row.required("CompanyName")?,
                    row.text("ContactName")?,
                    row.text("ContactTitle")?,
                    row.text("Address")?,
                    row.text("City")?,
                    row.text("Region")?,
                    row.text("PostalCode")?,
                    row.text("Country")?,
                    row.text("Phone")?,
                    row.text("Fax")?,
                    row.text("HomePage")?,
                ],
            )
            .map_err(DbError::query("insert a supplier"))?;
            Ok(())
        },
    )?;

    let mut shippers = HashSet::new();
    counts.shippers = each_row(
        source,
        "shippers.csv",
        &["ShipperID", "CompanyName", "Phone"],
        |row| {
            let id = row.id("ShipperID", &mut shippers)?;
            tx.execute(
                "INSERT INTO shippers (id, company_name, phone) VALUES (?1, ?2, ?3)",
                params![id, row.required("CompanyName")?, row.text("Phone")?],
            )
            .map_err(DbError::query("insert a shipper"))?;
            Ok(())
        },
    )?;

    let mut products = HashSet::new();
    counts.products = each_row(
        source,
        "products.csv",
        &[
            "ProductID",
            "ProductName",
            "SupplierID",
            "CategoryID",
            "QuantityPerUnit",
            "UnitPrice",
            "UnitsInStock",
            "UnitsOnOrder",
            "ReorderLevel",
            "Discontinued",
        ],
        |row| {
            let id = row.id("ProductID", &mut products)?;
            let supplier = row.reference("SupplierID", &suppliers, "suppliers.csv")?;
            let category = row.reference("CategoryID", &categories, "categories.csv")?;
            // Every product starts published: Northwind's `Discontinued` is kept as data, and the
            // history's orders include discontinued products the replay must be able to buy.
            tx.execute(
                "INSERT INTO products (id, name, supplier_id, category_id, quantity_per_unit, price_cents, \
                 stock, units_on_order, reorder_level, discontinued, published) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 1)",
                params![
                    id,
                    row.required("ProductName")?,
                    supplier,
                    category,
                    row.text("QuantityPerUnit")?,
                    row.decimal("UnitPrice", 2)?,
                    row.count("UnitsInStock")?,
                    row.count("UnitsOnOrder")?,
                    row.count("ReorderLevel")?,
                    row.flag("Discontinued")?,
                ],
            )
            .map_err(DbError::query("insert a product"))?;
            Ok(())
        },
    )?;

    let mut customers: HashSet<String> = HashSet::new();
    counts.customers = each_row(
        source,
        "customers.csv",
        &[
            "CustomerID",
            "CompanyName",
            "ContactName",
            "ContactTitle",
            "Address",
            "City",
            "Region",
            "PostalCode",
            "Country",
            "Phone",
            "Fax",
        ],
        |row| {
            let id = row.customer_id("CustomerID")?;
            if !customers.insert(id.to_owned()) {
                return Err(row.invalid("CustomerID", "a duplicate id"));
            }
            let hash = cost
                .hasher()
                .hash_password(
                    demo_password(id).as_bytes(),
                    &SaltString::generate(&mut OsRng),
                )
                .map_err(|e| ImportError::Seed {
                    customer: id.to_owned(),
                    reason: e.to_string(),
                })?
                .to_string();
            tx.execute(
                "INSERT INTO customers (id, company_name, contact_name, contact_title, address, city, region, \
                 postal_code, country, phone, fax, password_hash) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    id,
                    row.required("CompanyName")?,
                    row.text("ContactName")?,
                    row.text("ContactTitle")?,
                    row.text("Address")?,
                    row.text("City")?,
                    row.text("Region")?,
                    row.text("PostalCode")?,
                    row.text("Country")?,
                    row.text("Phone")?,
                    row.text("Fax")?,
                    hash,
                ],
            )
            .map_err(DbError::query("insert a customer"))?;
            Ok(())
        },
    )?;

    let mut orders = HashSet::new();
    counts.orders = each_row(
        source,
        "orders.csv",
        &[
            "OrderID",
            "CustomerID",
            "EmployeeID",
            "OrderDate",
            "RequiredDate",
            "ShippedDate",
            "ShipVia",
            "Freight",
            "ShipName",
            "ShipAddress",
            "ShipCity",
            "ShipRegion",
            "ShipPostalCode",
            "ShipCountry",
        ],
        |row| {
            let id = row.id("OrderID", &mut orders)?;
            let customer = row.customer_id("CustomerID")?;
            if !customers.contains(customer) {
                return Err(row.invalid("CustomerID", "no such row in customers.csv"));
            }
            let ship_via = match row.optional("ShipVia")? {
                None => None,
                Some(_) => Some(row.reference("ShipVia", &shippers, "shippers.csv")?),
            };
            tx.execute(
                "INSERT INTO orders (id, customer_id, employee_id, order_date, required_date, shipped_date, \
                 ship_via, freight_cents, ship_name, ship_address, ship_city, ship_region, ship_postal_code, \
                 ship_country, origin) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'northwind')",
                params![
                    id,
                    customer,
                    row.optional_int("EmployeeID")?,
                    row.date("OrderDate")?,
                    row.optional_date("RequiredDate")?,
                    row.optional_date("ShippedDate")?,
                    ship_via,
                    row.decimal("Freight", 2)?,
                    row.text("ShipName")?,
                    row.text("ShipAddress")?,
                    row.text("ShipCity")?,
                    row.text("ShipRegion")?,
                    row.text("ShipPostalCode")?,
                    row.text("ShipCountry")?,
                ],
            )
            .map_err(DbError::query("insert an order"))?;
            Ok(())
        },
    )?;

    let mut lines = HashSet::new();
    counts.order_lines = each_row(
        source,
        "order_details.csv",
        &["OrderID", "ProductID", "UnitPrice", "Quantity", "Discount"],
        |row| {
            let order = row.reference("OrderID", &orders, "orders.csv")?;
            let product = row.reference("ProductID", &products, "products.csv")?;
            if !lines.insert((order, product)) {
                return Err(row.invalid("ProductID", "a second line for this product in the order"));
            }
            let quantity = row.count("Quantity")?;
            if quantity == 0 {
                return Err(row.invalid("Quantity", "must be at least 1"));
            }
            let discount = row.decimal("Discount", 4)?;
            if discount > 10_000 {
                return Err(row.invalid("Discount", "more than 1 (100 %)"));
            }
            tx.execute(
                "INSERT INTO order_lines (order_id, product_id, unit_price_cents, quantity, discount_bp) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    order,
                    product,
                    row.decimal("UnitPrice", 2)?,
                    quantity,
                    discount
                ],
            )
            .map_err(DbError::query("insert an order line"))?;
            Ok(())
        },
    )?;

    Ok(counts)
}

/// Parse `file` (a header row, then records), check that it has `columns`, and call `each` for every
/// record. Returns the number of records.
fn each_row(
    source: &DataSource,
    file: &'static str,
    columns: &[&'static str],
    mut each: impl FnMut(&Row<'_>) -> Result<(), ImportError>,
) -> Result<usize, ImportError> {
    let name = source.name(file);
    let text = source.read(file)?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| ImportError::Csv {
        file: name.clone(),
        line: 1,
        source: e,
    })?;
    let mut index = HashMap::new();
    for &column in columns {
        let at = headers
            .iter()
            .position(|h| h.trim() == column)
            .ok_or_else(|| ImportError::MissingColumn {
                file: name.clone(),
                column,
            })?;
        index.insert(column, at);
    }
    let mut record = csv::StringRecord::new();
    let mut rows = 0;
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                let line = e
                    .position()
                    .map_or_else(|| reader.position().line(), csv::Position::line);
                return Err(ImportError::Csv {
                    file: name,
                    line,
                    source: e,
                });
            }
        }
        let line = record
            .position()
            .map_or_else(|| reader.position().line(), csv::Position::line);
        each(&Row {
            file: &name,
            line,
            index: &index,
            record: &record,
        })?;
        rows += 1;
    }
    Ok(rows)
}

/// One CSV record, with typed, checked access to its columns.
struct Row<'a> {
    file: &'a str,
    line: u64,
    index: &'a HashMap<&'static str, usize>,
    record: &'a csv::StringRecord,
}

impl Row<'_> {
    fn invalid(&self, field: &'static str, reason: impl Into<String>) -> ImportError {
        ImportError::Field {
            file: self.file.to_owned(),
            line: self.line,
            field,
            reason: reason.into(),
        }
    }

    fn bad_value(&self, field: &'static str, value: &str, what: &str) -> ImportError {
        let shown: String = value.chars().take(40).collect();
        self.invalid(field, format!("{shown:?} is not {what}"))
    }

    /// The field as written (may be empty).
    fn text(&self, field: &'static str) -> Result<&str, ImportError> {
        self.index
            .get(field)
            .and_then(|&at| self.record.get(at))
            .ok_or_else(|| self.invalid(field, "missing from this record"))
    }

    /// The field, which must not be empty.
    fn required(&self, field: &'static str) -> Result<&str, ImportError> {
        let value = self.text(field)?;
        if value.trim().is_empty() {
            return Err(self.invalid(field, "empty, but required"));
        }
        Ok(value)
    }

    /// `None` for an empty field.
    fn optional(&self, field: &'static str) -> Result<Option<&str>, ImportError> {
        let value = self.text(field)?.trim();
        Ok((!value.is_empty()).then_some(value))
    }

    /// A non-negative integer.
    fn count(&self, field: &'static str) -> Result<i64, ImportError> {
        let value = self.required(field)?.trim();
        value
            .parse::<u32>()
            .map(i64::from)
            .map_err(|_| self.bad_value(field, value, "a whole number from 0 to 4294967295"))
    }

    fn optional_int(&self, field: &'static str) -> Result<Option<i64>, ImportError> {
        match self.optional(field)? {
            None => Ok(None),
            Some(_) => self.count(field).map(Some),
        }
    }

    /// A positive integer id, not seen before in this file (recorded in `seen`).
    fn id(&self, field: &'static str, seen: &mut HashSet<i64>) -> Result<i64, ImportError> {
        let id = self.count(field)?;
        if id == 0 {
            return Err(self.invalid(field, "an id must be at least 1"));
        }
        if !seen.insert(id) {
            return Err(self.invalid(field, format!("a duplicate id {id}")));
        }
        Ok(id)
    }

    /// An id that must be in `ids` (read from `other`).
    fn reference(
        &self,
        field: &'static str,
        ids: &HashSet<i64>,
        other: &str,
    ) -> Result<i64, ImportError> {
        let id = self.count(field)?;
        if !ids.contains(&id) {
            return Err(self.invalid(field, format!("{id}: no such row in {other}")));
        }
        Ok(id)
    }

    /// A customer id: 1 to 10 ASCII letters or digits.
    fn customer_id(&self, field: &'static str) -> Result<&str, ImportError> {
        let value = self.required(field)?.trim();
        if value.len() > 10 || !value.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(self.bad_value(field, value, "a customer id (1 to 10 letters or digits)"));
        }
        Ok(value)
    }

    /// `0` or `1`.
    fn flag(&self, field: &'static str) -> Result<bool, ImportError> {
        match self.required(field)?.trim() {
            "0" => Ok(false),
            "1" => Ok(true),
            other => Err(self.bad_value(field, other, "0 or 1")),
        }
    }

    /// A non-negative decimal with at most `places` decimal places, as an integer scaled by
    /// 10^`places` (`"9.8"` with 2 places is 980).
    fn decimal(&self, field: &'static str, places: u32) -> Result<i64, ImportError> {
        let value = self.required(field)?.trim();
        parse_scaled(value, places).ok_or_else(|| {
            self.bad_value(
                field,
                value,
                &format!("a non-negative number with at most {places} decimal places"),
            )
        })
    }

    /// A Northwind timestamp, `YYYY-MM-DD HH:MM:SS.mmm` (or a bare `YYYY-MM-DD`).
    fn date(&self, field: &'static str) -> Result<&str, ImportError> {
        let value = self.required(field)?.trim();
        if !is_date(value) {
            return Err(self.bad_value(field, value, "a date (YYYY-MM-DD HH:MM:SS.mmm)"));
        }
        Ok(value)
    }

    fn optional_date(&self, field: &'static str) -> Result<Option<&str>, ImportError> {
        match self.optional(field)? {
            None => Ok(None),
            Some(_) => self.date(field).map(Some),
        }
    }
}

/// `value` × 10^`places` exactly, for a plain non-negative decimal; `None` if it is not one, has more
/// places, or overflows.
fn parse_scaled(value: &str, places: u32) -> Option<i64> {
    let (whole, fraction) = value.split_once('.').unwrap_or((value, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits(whole) || !digits(fraction) || fraction.len() > places as usize {
        return None;
    }
    let scale = 10_i64.checked_pow(places)?;
    let mut out = whole.parse::<i64>().ok()?.checked_mul(scale)?;
    if !fraction.is_empty() {
        let missing = places - u32::try_from(fraction.len()).ok()?;
        out = out.checked_add(
            fraction
                .parse::<i64>()
                .ok()?
                .checked_mul(10_i64.pow(missing))?,
        )?;
    }
    Some(out)
}

/// `YYYY-MM-DD`, optionally followed by ` HH:MM:SS` and `.mmm`, with plausible numbers.
fn is_date(value: &str) -> bool {
    let (day, time) = value.split_once(' ').unwrap_or((value, ""));
    let parts: Vec<&str> = day.split('-').collect();
    let number = |s: &str, len: usize, max: u32| {
        s.len() == len
            && s.bytes().all(|b| b.is_ascii_digit())
            && s.parse::<u32>().is_ok_and(|n| n <= max)
    };
    let day_ok = parts.len() == 3
        && number(parts[0], 4, 9999)
        && number(parts[1], 2, 12)
        && number(parts[2], 2, 31)
        && parts[1] != "00"
        && parts[2] != "00";
    if !day_ok {
        return false;
    }
    if time.is_empty() {
        return true;
    }
    let (clock, millis) = time.split_once('.').unwrap_or((time, "000"));
    let hms: Vec<&str> = clock.split(':').collect();
    hms.len() == 3
        && number(hms[0], 2, 23)
        && number(hms[1], 2, 59)
        && number(hms[2], 2, 59)
        && number(millis, 3, 999)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_scale_exactly() {
        assert_eq!(parse_scaled("18", 2), Some(1800));
        assert_eq!(parse_scaled("9.8", 2), Some(980));
        assert_eq!(parse_scaled("32.38", 2), Some(3238));
        assert_eq!(parse_scaled("0.15", 4), Some(1500));
        assert_eq!(parse_scaled("0.0", 4), Some(0));
        for bad in [
            "",
            ".5",
            "1.234",
            "-1",
            "1e3",
            "abc",
            "1.2.3",
            "99999999999999999999",
        ] {
            assert_eq!(parse_scaled(bad, 2), None, "{bad}");
        }
    }

    #[test]
    fn dates_are_checked() {
        assert!(is_date("1996-07-04 00:00:00.000"));
        assert!(is_date("1998-05-06"));
        for bad in [
            "",
            "1996-13-01",
            "1996-07-04 25:00:00.000",
            "July 4",
            "1996-7-4",
        ] {
            assert!(!is_date(bad), "{bad}");
        }
    }

    #[test]
    fn demo_passwords_are_per_customer() {
        assert_eq!(demo_password("ALFKI"), "alfki@northwind");
        assert_ne!(demo_password("ALFKI"), demo_password("ANATR"));
    }
}
