//! The catalog: categories, a category's products page by page, and a product's detail — cache-aside on
//! keyward (L1 + Redis or the embedded store) in front of SQLite.
//!
//! **The one decision to know:** every entry carries the tags of what it shows, known *before* it is
//! loaded (a fill records the tags' epochs when its lease is granted): a product's detail carries
//! `product:{id}`, a page of a category's products carries `category:{id}`. A write to a product bumps both
//! tags of that product ([`crate::admin::update_product`]), which removes its detail and every page of its
//! category, fleet-wide, in O(1) — and a fill that started before the write never lands after it. The
//! categories list (with its published-product counts) is one entry, `all`, invalidated by key when a
//! publish flag changes. All reads use the tagged calls with the same tags as the fill.
//!
//! | class | id | tags | what |
//! | --- | --- | --- | --- |
//! | `catalog_categories` | `all` | — | every category with its count of published products |
//! | `catalog_product_list` | `(category, page, per_page)` | `category:{id}` | one page of published products |
//! | `catalog_product` | product id | `product:{id}` | one product, published or not (`404` if not) |
//!
//! Pages past the last one are a `404` and never cached, so the number of cached pages is bounded by the
//! catalog, not by what clients ask for.
//!
//! [`Catalog::without_cache`] (the binary's `--no-cache`) turns the reads into direct loader calls, for
//! load tests that compare the shop with and without keyward in front of SQLite; invalidations still
//! run (other instances sharing the store may hold entries).

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::QueryRejection;

use axum::extract::{Query, State};
use keyward::{Cache, Keyward};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::db::{Db, DbError};
use crate::error::AppError;
use crate::extract::PathParam;

/// Cache class of the categories list.
pub const CATEGORIES_CLASS: &str = "catalog_categories";
/// Cache class of product pages.
pub const PRODUCT_LIST_CLASS: &str = "catalog_product_list";
/// Cache class of product details.
pub const PRODUCT_CLASS: &str = "catalog_product";

/// The id of the one categories-list entry.
pub const ALL_CATEGORIES: &str = "all";

/// Products per page when the request does not say.
pub const DEFAULT_PER_PAGE: u32 = 20;
/// The most products one page may hold.
pub const MAX_PER_PAGE: u32 = 30;

/// The tag every entry showing product `id` carries.
pub fn product_tag(id: i64) -> String {
    format!("product:{id}")
}

/// The tag every entry showing the contents of category `id` carries.
pub fn category_tag(id: i64) -> String {
    format!("category:{id}")
}

/// A category, with how many published products it has.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Category {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// Published products in it.
    pub product_count: i64,
}

/// A product as a list shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductSummary {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// The unit it is sold in (`"24 - 12 oz bottles"`).
    pub quantity_per_unit: String,
    /// Its price per unit, in cents.
    pub price_cents: i64,
    /// Whether any are in stock.
    pub in_stock: bool,
}

/// One page of a category's published products, by id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductPage {
    /// The category's id.
    pub category_id: i64,
    /// The category's name.
    pub category_name: String,
    /// The page, from 1.
    pub page: u32,
    /// Products per page.
    pub per_page: u32,
    /// Published products in the category.
    pub total: i64,
    /// This page's products.
    pub products: Vec<ProductSummary>,
}

/// A product's detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
    /// Its category's id.
    pub category_id: i64,
    /// Its category's name.
    pub category_name: String,
    /// Its supplier's id.
    pub supplier_id: i64,
    /// Its supplier's company name.
    pub supplier_name: String,
    /// The unit it is sold in.
    pub quantity_per_unit: String,
    /// Its price per unit, in cents.
    pub price_cents: i64,
    /// Units in stock.
    pub stock: i64,
    /// Whether the shop shows it (an unpublished product is a `404` to customers).
    pub published: bool,
    /// Northwind's flag: no longer ordered from the supplier.
    pub discontinued: bool,
}

/// The catalog's caches and the database behind them. Cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    db: Db,
    /// `false`: reads call the loaders directly ([`Catalog::without_cache`]).
    cached: bool,
    categories: Cache<Vec<Category>>,
    lists: Cache<ProductPage>,
    products: Cache<Product>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("cached", &self.cached)
            .finish_non_exhaustive()
    }
}

impl Catalog {
    /// The catalog on `kw`'s three catalog classes, loading from `db`.
    ///
    /// # Errors
    /// [`keyward::Error::UnknownClass`] / [`keyward::Error::WrongKind`] if the policy lacks the classes.
    pub fn new(kw: &Keyward, db: Db) -> keyward::Result<Catalog> {
        Ok(Catalog {
            db,
            cached: true,
            categories: kw.cache(CATEGORIES_CLASS)?,
            lists: kw.cache(PRODUCT_LIST_CLASS)?,
            products: kw.cache(PRODUCT_CLASS)?,
        })
    }

    /// This catalog with caching off: every read calls its loader (SQLite) directly, without keyward, and
    /// a loader's error comes back as the cached path returns it ([`keyward::Error::Loader`] holding the
    /// [`DbError`]), so handlers answer the same. Invalidations still run: instances sharing the store
    /// with caching on must still see writes made here. For load tests (`storefront --no-cache`); the
    /// caches' [`stats`](Cache::stats) then stay at zero.
    #[must_use]
    pub fn without_cache(mut self) -> Catalog {
        self.cached = false;
        self
    }

    /// Whether reads go through keyward (`false` after [`without_cache`](Self::without_cache)).
    pub fn is_cached(&self) -> bool {
        self.cached
    }

    /// The categories-list cache (for invalidation by key).
    pub fn categories_cache(&self) -> &Cache<Vec<Category>> {
        &self.categories
    }

    /// The product-page cache (for its [`stats`](Cache::stats)).
    pub fn lists_cache(&self) -> &Cache<ProductPage> {
        &self.lists
    }

    /// The product-detail cache (for its [`stats`](Cache::stats)).
    pub fn products_cache(&self) -> &Cache<Product> {
        &self.products
    }

    /// Invalidate every entry that showed product `before`, after a committed write turned it into
    /// `after`: the tags `product:{id}` and `category:{id}` (its detail, and every page of its category,
    /// which show its price, stock and presence), and the categories list if the publish flag changed
    /// (its counts). Call it after the SQLite commit, never before.
    ///
    /// # Errors
    /// [`keyward::Error::CacheAfterSource`] (naming the class it could not invalidate): the write stands,
    /// the entries may be stale until their TTL.
    pub async fn product_changed(&self, before: &Product, after: &Product) -> keyward::Result<()> {
        let after_source = |class: &str| {
            let class = class.to_owned();
            move |cause| keyward::Error::CacheAfterSource {
                class,
                cause: Box::new(cause),
            }
        };
        self.products
            .invalidate_tag(&product_tag(after.id))
            .await
            .map_err(after_source(PRODUCT_CLASS))?;
        for category in [before.category_id, after.category_id] {
            self.lists
                .invalidate_tag(&category_tag(category))
                .await
                .map_err(after_source(PRODUCT_LIST_CLASS))?;
            if before.category_id == after.category_id {
                break;
            }
        }
        if before.published != after.published {
            self.categories
                .invalidate(ALL_CATEGORIES)
                .await
                .map_err(after_source(CATEGORIES_CLASS))?;
        }
        Ok(())
    }

    /// Invalidate what showed product `id`'s stock after a committed order took some of it: its detail
    /// **by key** (not its tag: orders are frequent, and a key invalidation drops one entry, where a tag
    /// bump would drop every entry carrying it), and the pages of category `category` (tag
    /// `category:{id}`) only when `stock_after` is 0 — pages show `in_stock`, not the count. Call it
    /// after the SQLite commit, never before.
    ///
    /// # Errors
    /// [`keyward::Error::CacheAfterSource`] (naming the class it could not invalidate): the write stands,
    /// the entries may be stale until their TTL.
    pub async fn stock_changed(
        &self,
        id: i64,
        category: i64,
        stock_after: i64,
    ) -> keyward::Result<()> {
        let after_source = |class: &str| {
            let class = class.to_owned();
            move |cause| keyward::Error::CacheAfterSource {
                class,
                cause: Box::new(cause),
            }
        };
        self.products
            .invalidate(&id)
            .await
            .map_err(after_source(PRODUCT_CLASS))?;
        if stock_after <= 0 {
            self.lists
                .invalidate_tag(&category_tag(category))
                .await
                .map_err(after_source(PRODUCT_LIST_CLASS))?;
        }
        Ok(())
    }

    /// Every category, by id, with its count of published products.
    ///
    /// # Errors
    /// keyward errors; a database failure is an [`keyward::Error::Loader`] holding the [`DbError`].
    pub async fn categories(&self) -> keyward::Result<Arc<Vec<Category>>> {
        let db = self.db.clone();
        if !self.cached {
            return load_categories(db)
                .await
                .map(Arc::new)
                .map_err(direct(CATEGORIES_CLASS));
        }
        self.categories
            .get_or_set_shared(ALL_CATEGORIES, || load_categories(db))
            .await
    }

    /// Page `page` (from 1) of category `category`'s published products, `per_page` of them.
    ///
    /// # Errors
    /// As [`categories`](Self::categories); [`DbError::NotFound`] (inside the loader error) for an unknown
    /// category or a page past the last; [`keyward::Error::InvalidArgument`] for page 0 or a `per_page`
    /// outside 1 to [`MAX_PER_PAGE`].
    pub async fn product_page(
        &self,
        category: i64,
        page: u32,
        per_page: u32,
    ) -> keyward::Result<Arc<ProductPage>> {
        if page == 0 || !(1..=MAX_PER_PAGE).contains(&per_page) {
            return Err(keyward::Error::InvalidArgument {
                what: format!(
                    "page {page} of {per_page}: pages count from 1, per_page is 1 to {MAX_PER_PAGE}"
                ),
            });
        }
        let db = self.db.clone();
        if !self.cached {
            return load_page(db, category, page, per_page)
                .await
                .map(Arc::new)
                .map_err(direct(PRODUCT_LIST_CLASS));
        }
        // Shared: an L1 hit hands out the page decoded once, not a fresh decode per request.
        self.lists
            .get_or_set_tagged_shared(
                &(category, page, per_page),
                &[category_tag(category)],
                || load_page(db, category, page, per_page),
            )
            .await
    }

    /// Product `id`, published or not.
    ///
    /// # Errors
    /// As [`categories`](Self::categories); [`DbError::NotFound`] (inside the loader error) for an unknown id.
    pub async fn product(&self, id: i64) -> keyward::Result<Arc<Product>> {
        let db = self.db.clone();
        if !self.cached {
            return load_product(db, id)
                .await
                .map(Arc::new)
                .map_err(direct(PRODUCT_CLASS));
        }
        self.products
            .get_or_set_tagged_shared(&id, &[product_tag(id)], || load_product(db, id))
            .await
    }
}

/// A loader's error from a direct call, shaped as the cache returns it.
fn direct(class: &'static str) -> impl FnOnce(DbError) -> keyward::Error {
    move |error| keyward::Error::Loader {
        class: class.to_owned(),
        source: std::sync::Arc::new(Box::new(error)),
    }
}

async fn load_categories(db: Db) -> Result<Vec<Category>, DbError> {
    db.read(|conn| {
        let mut stmt = conn
            .prepare_cached(
                "SELECT c.id, c.name, c.description, \
                 (SELECT COUNT(*) FROM products p WHERE p.category_id = c.id AND p.published = 1) \
                 FROM categories c ORDER BY c.id",
            )
            .map_err(DbError::query("list categories"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok(Category {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    description: row.get(2)?,
                    product_count: row.get(3)?,
                })
            })
            .map_err(DbError::query("list categories"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(DbError::query("list categories"))
    })
    .await
}

async fn load_page(
    db: Db,
    category: i64,
    page: u32,
    per_page: u32,
) -> Result<ProductPage, DbError> {
    db.read(move |conn| {
        let what = "list a category's products";
        let found: Option<(String, i64)> = conn
            .query_row(
                "SELECT c.name, \
                 (SELECT COUNT(*) FROM products p WHERE p.category_id = c.id AND p.published = 1) \
                 FROM categories c WHERE c.id = ?1",
                [category],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(DbError::query(what))?;
        let Some((category_name, total)) = found else {
            return Err(DbError::NotFound {
                what: "category",
                id: category.to_string(),
            });
        };
        let offset = i64::from(page.saturating_sub(1)) * i64::from(per_page);
        if page > 1 && offset >= total {
            return Err(DbError::NotFound {
                what: "page",
                id: format!("{page} of category {category}"),
            });
        }
        let mut stmt = conn
            .prepare_cached(
                "SELECT id, name, quantity_per_unit, price_cents, stock FROM products \
                 WHERE category_id = ?1 AND published = 1 ORDER BY id LIMIT ?2 OFFSET ?3",
            )
            .map_err(DbError::query(what))?;
        let products = stmt
            .query_map(params![category, per_page, offset], |row| {
                Ok(ProductSummary {
                    id: row.get(0)?,
                    name: row.get(1)?,
                    quantity_per_unit: row.get(2)?,
                    price_cents: row.get(3)?,
                    in_stock: row.get::<_, i64>(4)? > 0,
                })
            })
            .map_err(DbError::query(what))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(DbError::query(what))?;
        Ok(ProductPage {
            category_id: category,
            category_name,
            page,
            per_page,
            total,
            products,
        })
    })
    .await
}

/// Product `id` from SQLite, published or not (also what admin writes answer with).
pub(crate) fn read_product(conn: &rusqlite::Connection, id: i64) -> Result<Product, DbError> {
    conn.query_row(
        "SELECT p.id, p.name, p.category_id, c.name, p.supplier_id, s.company_name, p.quantity_per_unit, \
         p.price_cents, p.stock, p.published, p.discontinued \
         FROM products p JOIN categories c ON c.id = p.category_id JOIN suppliers s ON s.id = p.supplier_id \
         WHERE p.id = ?1",
        [id],
        |row| {
            Ok(Product {
                id: row.get(0)?,
                name: row.get(1)?,
                category_id: row.get(2)?,
                category_name: row.get(3)?,
                supplier_id: row.get(4)?,
                supplier_name: row.get(5)?,
                quantity_per_unit: row.get(6)?,
                price_cents: row.get(7)?,
                stock: row.get(8)?,
                published: row.get(9)?,
                discontinued: row.get(10)?,
            })
        },
    )
    .optional()
    .map_err(DbError::query("read a product"))?
    .ok_or_else(|| DbError::NotFound {
        what: "product",
        id: id.to_string(),
    })
}

async fn load_product(db: Db, id: i64) -> Result<Product, DbError> {
    db.read(move |conn| read_product(conn, id)).await
}

// The catalog routes' state is the [`Catalog`] alone (`crate::app` mounts them so): axum clones a
// route's whole state for every request, and cloning and dropping the [`AppState`] (a dozen handles,
// each a reference count, one a `Vec`) was a tenth of a cached read's CPU time under load.

/// `GET /categories`.
pub(crate) async fn list_categories(
    State(catalog): State<Catalog>,
) -> Result<Json<Arc<Vec<Category>>>, AppError> {
    Ok(Json(catalog.categories().await?))
}

/// The query of `GET /categories/{id}/products`.
#[derive(Debug, Deserialize)]
pub(crate) struct PageQuery {
    page: Option<u32>,
    per_page: Option<u32>,
}

/// `GET /categories/{id}/products?page=N&per_page=M`.
pub(crate) async fn list_products(
    State(catalog): State<Catalog>,
    PathParam(category): PathParam<i64>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Arc<ProductPage>>, AppError> {
    let Query(query) =
        query.map_err(|_| AppError::BadRequest("page and per_page are whole numbers".into()))?;
    let page = query.page.unwrap_or(1);
    let per_page = query.per_page.unwrap_or(DEFAULT_PER_PAGE);
    if page == 0 {
        return Err(AppError::BadRequest("pages count from 1".into()));
    }
    if !(1..=MAX_PER_PAGE).contains(&per_page) {
        return Err(AppError::BadRequest(format!(
            "per_page is 1 to {MAX_PER_PAGE}"
        )));
    }
    Ok(Json(catalog.product_page(category, page, per_page).await?))
}

/// `GET /products/{id}`: a published product.
pub(crate) async fn show_product(
    State(catalog): State<Catalog>,
    PathParam(id): PathParam<i64>,
) -> Result<Json<Arc<Product>>, AppError> {
    let product = catalog.product(id).await?;
    if !product.published {
        return Err(AppError::NotFound(format!("No product {id}.")));
    }
    Ok(Json(product))
}
