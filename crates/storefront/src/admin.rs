//! Admin writes to the catalog: price, stock, publish/unpublish — SQLite first, then the cache.
//!
//! **The one decision to know:** the order is *commit, then invalidate* (the source-of-truth write comes
//! first; the cache follows it), through [`Catalog::product_changed`](crate::Catalog::product_changed):
//! the tags `product:{id}` and `category:{id}` are bumped, and the categories list is invalidated when the
//! publish flag changed. A fill that read the old row before the commit is fenced off by the bump and
//! never lands. If the invalidation fails after the commit, the answer is a `500` without `Retry-After`
//! whose detail says the change was saved
//! ([`keyward::Error::CacheAfterSource`]): the write happened and must not be repeated blindly; the
//! stale entries end with their TTL.
//!
//! Admin routes need `Authorization: Bearer <admin token>` (compared in constant time). Without a
//! configured token they answer `401` to everyone.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, header};
use rusqlite::params;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::catalog::{Product, read_product};
use crate::db::DbError;
use crate::error::AppError;
use crate::extract::PathParam;

/// The highest price an admin may set, in cents (one million).
pub const MAX_PRICE_CENTS: i64 = 100_000_000;
/// The highest stock an admin may set.
pub const MAX_STOCK: i64 = 1_000_000_000;

/// The token admin routes require. Its `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(String);

impl AdminToken {
    /// A token; `None` if it is shorter than 16 characters (too easy to guess).
    pub fn new(token: impl Into<String>) -> Option<AdminToken> {
        let token = token.into();
        (token.len() >= 16).then_some(AdminToken(token))
    }

    /// Whether `candidate` is this token (in constant time for equal lengths).
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }

    /// The token itself, for a client that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(…)")
    }
}

/// The body of `PATCH /admin/products/{id}`: any of the three fields, at least one.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ProductUpdate {
    /// The new price per unit, in cents (0 to [`MAX_PRICE_CENTS`]).
    pub price_cents: Option<i64>,
    /// The new stock (0 to [`MAX_STOCK`]).
    pub stock: Option<i64>,
    /// Show (`true`) or hide (`false`) the product.
    pub published: Option<bool>,
}

impl ProductUpdate {
    /// Set the price, in cents.
    #[must_use]
    pub fn price_cents(mut self, cents: i64) -> Self {
        self.price_cents = Some(cents);
        self
    }

    /// Set the stock.
    #[must_use]
    pub fn stock(mut self, units: i64) -> Self {
        self.stock = Some(units);
        self
    }

    /// Publish or unpublish.
    #[must_use]
    pub fn published(mut self, yes: bool) -> Self {
        self.published = Some(yes);
        self
    }

    fn check(&self) -> Result<(), DbError> {
        let invalid = |what, reason: String| Err(DbError::Invalid { what, reason });
        if self.price_cents.is_none() && self.stock.is_none() && self.published.is_none() {
            return invalid(
                "update",
                "name at least one of price_cents, stock, published".into(),
            );
        }
        if let Some(cents) = self.price_cents
            && !(0..=MAX_PRICE_CENTS).contains(&cents)
        {
            return invalid("price_cents", format!("0 to {MAX_PRICE_CENTS}"));
        }
        if let Some(stock) = self.stock
            && !(0..=MAX_STOCK).contains(&stock)
        {
            return invalid("stock", format!("0 to {MAX_STOCK}"));
        }
        Ok(())
    }
}

/// Apply `update` to product `id` in one SQLite transaction, then invalidate what showed the old row
/// ([`Catalog::product_changed`](crate::catalog::Catalog::product_changed)). Returns the product as
/// written.
///
/// # Errors
/// [`AppError::NotFound`] for an unknown product, [`AppError::BadRequest`] for an update out of range
/// (nothing written); [`AppError::Db`] if the write failed; [`AppError::Store`] holding
/// [`keyward::Error::CacheAfterSource`] if the write committed but the invalidation failed.
pub async fn update_product(
    state: &AppState,
    id: i64,
    update: ProductUpdate,
) -> Result<Product, AppError> {
    update.check()?;
    let (before, after) = state
        .db
        .write(move |tx| {
            let before = read_product(tx, id)?;
            tx.execute(
                "UPDATE products SET price_cents = COALESCE(?2, price_cents), \
                 stock = COALESCE(?3, stock), published = COALESCE(?4, published) WHERE id = ?1",
                params![id, update.price_cents, update.stock, update.published],
            )
            .map_err(DbError::query("update a product"))?;
            let after = read_product(tx, id)?;
            Ok::<_, DbError>((before, after))
        })
        .await?;
    state.catalog.product_changed(&before, &after).await?;
    Ok(after)
}

/// `PATCH /admin/products/{id}` with a JSON [`ProductUpdate`].
pub(crate) async fn patch_product(
    State(state): State<AppState>,
    id: Result<PathParam<i64>, AppError>,
    headers: HeaderMap,
    body: Result<Json<ProductUpdate>, JsonRejection>,
) -> Result<Json<Product>, AppError> {
    // Who asks comes first: without the token, a malformed path says nothing but 401.
    authorize(&state, &headers)?;
    let PathParam(id) = id?;
    let Json(update) = body.map_err(|e| AppError::BadRequest(e.body_text()))?;
    Ok(Json(update_product(&state, id, update).await?))
}

pub(crate) fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    let Some(token) = &state.admin_token else {
        return Err(AppError::Unauthorized);
    };
    let sent = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer`, `BEARER`.
        .and_then(|v| {
            v.split_once(' ')
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token)
        });
    match sent {
        Some(sent) if token.matches(sent.trim()) => Ok(()),
        _ => Err(AppError::Unauthorized),
    }
}
