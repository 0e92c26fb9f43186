//! Tags (dependency sets): invalidate every entry that depends on `product:42`, in any class of the
//! namespace, with one O(1) write.
//!
//! **The decision: a tag is a group epoch, like a class's or the namespace's.** Its state is one field,
//! `t:<tag>`, of the namespace's epochs hash. [`Keyward::invalidate_tag`] bumps it (`bump.lua`: to
//! `max(current + 1, server time in µs)`, so a tag's versions never repeat, even after the hash expired or was
//! deleted). A fill records, in its entry's envelope (`V2`, see `envelope.rs`), the epoch of each of its tags
//! as read *when its lease was granted*, before the loader ran; a read treats the entry as a miss if any
//! recorded epoch is below the current one. So:
//! - invalidation is O(1) in the number of tagged entries: no member sets to maintain or walk, no `SCAN`;
//! - a fill leased before the invalidation can never become visible: it may still commit (the bump does not
//!   touch its lease), but it carries the older epoch and reads as a miss, exactly like a fill that raced a
//!   class invalidation; a caller arriving after [`Keyward::invalidate_tag`] returned never shares a load
//!   started before it (in-process single-flights are detached);
//! - an entry is judged by the tags it *carries*: reading it through [`Cache::get`] or
//!   [`Cache::get_or_set`] still honours them (on a single server, a tagged entry read through an untagged
//!   call goes through the atomic script instead of the two-command fast path: use the tagged calls, with the
//!   same tags, on hot tagged entries);
//! - on Redis Cluster, tag epochs come from the handle's bounded view of the epochs hash (the one group
//!   epochs use): no read of a hot key per tag, and the same bound,
//!   [`ConnectOptions::group_invalidation_bound`](crate::ConnectOptions::group_invalidation_bound), holds for
//!   tags. The view's periodic full read grows with the number of live tag fields (see pruning).
//!
//! **Pruning.** A tag field must not live forever (tags like `product:<id>` are unbounded). Every bump
//! examines 16 fields at random and deletes the tag fields whose epoch is older than the epochs' lifetime (the
//! longest entry lifetime of the namespace, lease + ttl + jitter, plus a minute). That is safe: an epoch is at
//! least the server time of its bump, so every entry leased before it — the only entries it makes stale — has
//! expired; the entries still alive carry that epoch or a later one, and read the same against a missing
//! field (0); the next bump takes the server clock again, above every epoch issued before. The whole hash also
//! expires a lifetime after its last bump. So the hash holds about the tags invalidated within one lifetime.
//!
//! **Remove and expire.** [`Keyward::invalidate_tag`] *removes*: entries carrying the tag are misses from then
//! on. [`Keyward::expire_tag`] *expires*: entries carrying the tag are no longer fresh — the next read refills
//! them — but in a class with `stale_grace` the old value stays usable as the fail-safe fallback (served if
//! the refill fails or passes its soft timeout, exactly like a value within its grace). In a class without
//! `stale_grace` nothing keeps old values, and expiring is removing. Expiry is a second field per tag,
//! `x:<tag>`: both bumps take `max(t:<tag>, x:<tag>) + 1` (and the server clock) as their floor, so the two
//! fields draw from one increasing sequence; a fill records the larger of the two; a recorded epoch below
//! `t:<tag>` is removed, one below only `x:<tag>` is expired. A removal always wins over an expiry, of the
//! same tag or of another tag the entry carries. Pruning treats `x:` fields as it treats `t:` fields.
//!
//! **The top of the range.** A tag field that cannot go higher (2^53 − 1, reachable only by writing the hash
//! behind keyward's back) is re-based: deleted, with `*` bumped instead, so every older entry is gone and the
//! tag starts again from the clock; no fill ever records the top for a tag ("Exhaustion" in `epochs.lua`).
//!
//! Limits: at most 32 tags per entry (`MAX_TAGS`), each 1 to 128 bytes (`MAX_TAG_BYTES`) without whitespace
//! or control characters; duplicates are ignored. Every call on one entry should name the same tags: an entry
//! records the tags of the fill (or set) that stored it, and a caller sharing another's load shares its tags.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::store::{self, expiry_field, tag_field};
use super::{Cache, CacheLookup, Seen};
use crate::Keyward;
use crate::codec::Codec;
use crate::error::{BoxError, Error, Result};
use crate::flight::Flights;
use crate::key::IdParts;

use crate::envelope::{MAX_TAG_BYTES, MAX_TAGS};

/// Check and normalise the tags of one call: each non-empty, at most [`MAX_TAG_BYTES`] bytes, no whitespace
/// or control characters; at most [`MAX_TAGS`] distinct ones; duplicates dropped, order kept.
fn validate(class: Option<&str>, tags: &[impl AsRef<str>]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for tag in tags {
        let tag = tag.as_ref();
        check(class, tag)?;
        if !out.iter().any(|t| t == tag) {
            if out.len() == MAX_TAGS {
                return Err(invalid(
                    class,
                    tag,
                    format!("an entry carries at most {MAX_TAGS} tags"),
                ));
            }
            out.push(tag.to_owned());
        }
    }
    Ok(out)
}

fn check(class: Option<&str>, tag: &str) -> Result<()> {
    if tag.is_empty() {
        return Err(invalid(class, tag, "a tag cannot be empty".to_owned()));
    }
    if tag.len() > MAX_TAG_BYTES {
        return Err(invalid(
            class,
            tag,
            format!(
                "{} bytes, more than the {MAX_TAG_BYTES} a tag may have",
                tag.len()
            ),
        ));
    }
    if tag.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            class,
            tag,
            "a tag cannot hold whitespace or control characters".to_owned(),
        ));
    }
    Ok(())
}

fn invalid(class: Option<&str>, tag: &str, reason: String) -> Error {
    Error::InvalidTag {
        class: class.map(str::to_owned),
        tag: tag.chars().take(64).collect(),
        reason,
    }
}

impl Keyward {
    /// Invalidate every cache entry carrying `tag`, in every class of the namespace, in O(1): bumps the tag's
    /// epoch, so entries filled before it read as misses and fills leased before it never become visible. No
    /// SCAN, no member sets. Call it *after* the source-of-truth write. On Redis Cluster, other handles see it
    /// within [`ConnectOptions::group_invalidation_bound`](crate::ConnectOptions::group_invalidation_bound).
    /// To keep the old values as a fail-safe fallback instead, use [`expire_tag`](Self::expire_tag).
    ///
    /// ```
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use keyward::{Keyward, policy::{CacheClass, Policy}};
    ///
    /// let policy = Policy::builder("dev", "shop")
    ///     .cache("product", CacheClass::new(Duration::from_secs(600), "catalog service, after each write"))
    ///     .cache("listing", CacheClass::new(Duration::from_secs(60), "catalog service, after each write"))
    ///     .build()?;
    /// let kw = Keyward::embedded(policy);
    /// let products = kw.cache::<String>("product")?;
    /// let listings = kw.cache::<Vec<u32>>("listing")?;
    ///
    /// let p = products
    ///     .get_or_set_tagged("42", &["product:42"], || async { Ok::<_, std::io::Error>("apple".to_owned()) })
    ///     .await?;
    /// let l = listings
    ///     .get_or_set_tagged("fruit", &["product:42", "category:7"], || async { Ok::<_, std::io::Error>(vec![42]) })
    ///     .await?;
    /// kw.invalidate_tag("product:42").await?; // after the product was written
    /// assert_eq!(products.get("42").await?, None);
    /// assert_eq!(listings.get("fruit").await?, None);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTag`] for a tag that no entry could carry; backend failures.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        check(None, tag)?;
        self.bump_tag(tag_field(tag)).await
    }

    /// Expire every cache entry carrying `tag`, in every class of the namespace, in O(1): they are no longer
    /// fresh, so the next read of each refills it (one loader fleet-wide, under the fill lease), and a fill
    /// leased before this call never becomes fresh. Unlike [`invalidate_tag`](Self::invalidate_tag), in a
    /// class with `stale_grace` the old value stays the fail-safe fallback: if the refill fails, times out or
    /// passes `soft_timeout`, callers get it (as [`CacheLookup::Stale`]) instead of an error, until the entry's
    /// TTL plus grace runs out. As with any stale value, a failed refill then stores it again as current for
    /// `fail_safe_throttle` (under the refill's lease), so the failing source is asked at most once per
    /// throttle: during the throttle every read, [`Cache::get`] included, returns it as a
    /// [`CacheLookup::Hit`]. Until such a failure, plain reads ([`Cache::get`]) never return an expired value.
    /// In a class without `stale_grace` the entry is simply a miss. In-process copies (L1) are dropped as for a removal.
    /// FusionCache's `Expire` and bentocache's `expire` are the same idea.
    ///
    /// ```
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use keyward::{CacheLookup, Keyward, StaleReason, policy::{CacheClass, Policy}};
    ///
    /// let policy = Policy::builder("dev", "shop")
    ///     .cache(
    ///         "product",
    ///         CacheClass::new(Duration::from_secs(600), "catalog service, after each write")
    ///             .stale_grace(Duration::from_secs(3600)),
    ///     )
    ///     .build()?;
    /// let kw = Keyward::embedded(policy);
    /// let products = kw.cache::<String>("product")?;
    /// products
    ///     .get_or_set_tagged("42", &["product:42"], || async { Ok::<_, std::io::Error>("apple".to_owned()) })
    ///     .await?;
    /// kw.expire_tag("product:42").await?; // the price changed; the catalog database is down
    /// assert_eq!(products.get("42").await?, None, "no longer fresh");
    /// let (p, how) = products
    ///     .get_or_set_tagged_with_status("42", &["product:42"], || async {
    ///         Err::<String, _>(std::io::Error::other("database down"))
    ///     })
    ///     .await?;
    /// assert_eq!((p.as_str(), how), ("apple", CacheLookup::Stale(StaleReason::LoaderError)));
    /// // The failed refill throttles the source: for `fail_safe_throttle` the old value is served as is.
    /// assert_eq!(products.get("42").await?.as_deref(), Some("apple"));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTag`] for a tag that no entry could carry; backend failures.
    pub async fn expire_tag(&self, tag: &str) -> Result<()> {
        check(None, tag)?;
        self.bump_tag(expiry_field(tag)).await
    }

    /// Bump one of a tag's two fields (`t:<tag>` or `x:<tag>`), detach in-process loads, and drop every
    /// instance's L1 copies that carry the tag.
    async fn bump_tag(&self, field: String) -> Result<()> {
        let kw = self.clone();
        let has_l1 = self.has_l1();
        let work = async move {
            store::bump(&kw.inner.backend, &kw.inner.ns, &field).await?;
            // Which loads in flight carry the tag is not known here: none started before may be shared now.
            kw.shared::<Flights>().detach_all();
            if has_l1 {
                // Every instance drops the L1 copies that carry the tag (`cache::l1`, `TagFence`).
                let tag = field.get(2..).unwrap_or_default().to_owned();
                let event = super::l1::Event::Tag { tag };
                super::l1::hub(&kw).publish(&kw, event).await?;
            }
            Ok(())
        };
        super::run_announced(has_l1, work).await
    }
}

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// [`get_or_set`](Self::get_or_set) for a value that depends on `tags` (e.g. `&["product:42",
    /// "category:7"]`): a fill records each tag's current epoch, and [`Keyward::invalidate_tag`] of any of
    /// them makes the entry a miss, in O(1) — a fill whose lease was granted before that invalidation never
    /// becomes visible. A hit costs what an untagged hit costs, plus one hash field per tag in the same round
    /// trip (on Redis Cluster, nothing: the tags' epochs come from the handle's view).
    ///
    /// # Errors
    /// [`Error::InvalidTag`] (naming the class and the tag), and as [`get_or_set`](Self::get_or_set).
    pub async fn get_or_set_tagged<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        tags: &[impl AsRef<str>],
        loader: F,
    ) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        self.get_or_set_tagged_with_status(id, tags, loader)
            .await
            .map(|(v, _)| v)
    }

    /// [`get_or_set_tagged`](Self::get_or_set_tagged), also saying how the call was answered (see
    /// [`get_or_set_with_status`](Self::get_or_set_with_status)).
    ///
    /// # Errors
    /// As [`get_or_set_tagged`](Self::get_or_set_tagged).
    pub async fn get_or_set_tagged_with_status<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        tags: &[impl AsRef<str>],
        loader: F,
    ) -> Result<(V, CacheLookup)>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let tags = validate(Some(&self.class.name), tags)?;
        let seen = Seen::new(0);
        let loaded = self
            .load(
                id,
                &tags,
                false,
                || async { loader().await.map(Some) },
                &seen,
            )
            .await?;
        let lookup = CacheLookup::from_u8(seen.into_inner()).unwrap_or(CacheLookup::Miss);
        loaded.map(|v| (v, lookup)).ok_or_else(|| self.no_value())
    }

    /// [`get_or_set_tagged`](Self::get_or_set_tagged), sharing the value instead of decoding it again, as
    /// [`get_or_set_shared`](Self::get_or_set_shared) does: an entry of the in-process tier (L1) is decoded
    /// once, on its first shared read, and every later shared read of it gets the same [`Arc`]. The read to
    /// use on tagged classes with an L1 (the storefront's product lists: the decode of the L1 copy was the
    /// largest piece of a cached request's own work).
    ///
    /// # Errors
    /// As [`get_or_set_tagged`](Self::get_or_set_tagged).
    pub async fn get_or_set_tagged_shared<F, Fut, E>(
        &self,
        id: &(impl IdParts + ?Sized),
        tags: &[impl AsRef<str>],
        loader: F,
    ) -> Result<Arc<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<V, E>>,
        E: Into<BoxError>,
    {
        let tags = validate(Some(&self.class.name), tags)?;
        let key = self.key(id)?;
        self.load_shared(&key, &tags, loader).await.map(|(v, _)| v)
    }

    /// [`set`](Self::set) for a value that depends on `tags`: it records each tag's current epoch, so a later
    /// [`Keyward::invalidate_tag`] of any of them makes it a miss. Voids any fill in progress for the entry.
    ///
    /// # Errors
    /// [`Error::InvalidTag`] (naming the class and the tag), [`Error::ValueTooLarge`], [`Error::Encode`],
    /// backend failures.
    pub async fn set_tagged(
        &self,
        id: &(impl IdParts + ?Sized),
        value: &V,
        tags: &[impl AsRef<str>],
    ) -> Result<()> {
        let tags = validate(Some(&self.class.name), tags)?;
        let key = self.key(id)?;
        let payload = self.encode(value)?;
        self.store(&key, &payload, &tags).await
    }

    /// The same as [`Keyward::invalidate_tag`]: every entry carrying `tag`, in *every* class of the
    /// namespace, not only this one.
    ///
    /// # Errors
    /// As [`Keyward::invalidate_tag`]; an [`Error::InvalidTag`] names this class.
    pub async fn invalidate_tag(&self, tag: &str) -> Result<()> {
        check(Some(&self.class.name), tag)?;
        self.kw.invalidate_tag(tag).await
    }

    /// The same as [`Keyward::expire_tag`]: every entry carrying `tag`, in *every* class of the namespace,
    /// not only this one.
    ///
    /// # Errors
    /// As [`Keyward::expire_tag`]; an [`Error::InvalidTag`] names this class.
    pub async fn expire_tag(&self, tag: &str) -> Result<()> {
        check(Some(&self.class.name), tag)?;
        self.kw.expire_tag(tag).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked_and_deduplicated() {
        assert_eq!(
            validate(Some("c"), &["a", "b:1", "a"]).unwrap(),
            vec!["a".to_owned(), "b:1".to_owned()]
        );
        assert!(validate(None, &[] as &[&str]).unwrap().is_empty());
        for bad in ["", "a b", "a\nb", "\u{7f}"] {
            let err = validate(Some("c"), &[bad]).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidTag { class: Some(c), tag, .. } if c == "c" && tag == bad),
                "{err:?}"
            );
        }
        let long = "x".repeat(MAX_TAG_BYTES + 1);
        let err = validate(Some("c"), &[long.as_str()]).unwrap_err();
        assert!(err.to_string().contains("class `c`"), "{err}");
        assert!(!err.to_string().contains(&long), "cut: {err}");
        assert!(validate(None, &["x".repeat(MAX_TAG_BYTES)]).is_ok());
        let many: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        let err = validate(Some("c"), &many).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        assert!(validate(Some("c"), &many[..MAX_TAGS]).is_ok());
    }
}
