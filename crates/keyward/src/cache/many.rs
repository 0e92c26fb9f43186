//! Batches: [`Cache::get_or_set_many`] reads many entries of one class in one round trip and loads the missing
//! ones with one loader call.
//!
//! The decision a reader must know: **a batch shares round trips and the loader call, never the guarantees.**
//! Each id joins the in-process single-flight on its own (a batch and a `get_or_set` of one id share one
//! fetch), takes or waits for its own fill lease, and commits only while that lease is held: an invalidation of
//! one id during the batch's load refuses that id's fill alone, exactly as for a single load. The round trip is
//! the single-entry fast path repeated in one pipeline (one per Cluster slot, concurrently; see
//! `store/many.rs`); the loader is called once with every id that is neither a hit nor answered by another
//! caller, and again only for ids whose other holder gave its lease back (its loader failed) while this batch
//! waited.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::futures::Notified;
use tracing::Instrument as _;

use super::l1::{L1Value, Ticket};
use super::store::{self, Entry, Fetched};
use super::{
    Cache, Decoded, Fallback, LeaseGuard, MAX_HEALS, Seen, StaleReason, failed, flight_key,
};
use crate::backend::Watch;
use crate::codec::Codec;
use crate::envelope::{self, Stamp};
use crate::error::{BoxError, Error, Result};
use crate::flight::{self, Leader, Outcome, Role, Shared};
use crate::key::IdParts;

/// The source of an [`Error::Loader`] from [`Cache::get_or_set_many`]: the loader's answer had no value for an
/// id it was asked for. Downcast the loader error's source to this type to find the id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the batch loader returned no value for id `{id}`")]
#[non_exhaustive]
pub struct MissingFromBatch {
    /// The id's parts, joined by `:` (unescaped, as the caller gave them).
    pub id: String,
}

/// One batch call's ids: `first[u]` is the index in `ids` (and `keys`) of the first occurrence of the `u`-th
/// distinct entry.
struct Batch<'a, 'i, I> {
    ids: &'i [I],
    keys: &'a [String],
    first: &'a [usize],
    negative_ok: bool,
    /// Per distinct entry, the L1 fence reading taken before the store was asked (classes with L1 only).
    tickets: Vec<Option<Ticket>>,
    /// The class's soft timeout counted from the call's start (classes with `soft_timeout` and `stale_grace`
    /// only): see [`Cache::fill_many`].
    soft_deadline: Option<tokio::time::Instant>,
}

impl<I> Batch<'_, '_, I> {
    fn key(&self, u: usize) -> &str {
        &self.keys[self.first[u]]
    }
}

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// Put what the store holds for entry `u` (a hit, or a fill that committed) into L1, fenced by its ticket.
    async fn l1_insert<I>(
        &self,
        b: &Batch<'_, '_, I>,
        u: usize,
        payload: &Bytes,
        fresh_for: Option<Duration>,
        tags: super::l1::InsertTags<'_>,
    ) {
        if let (Some(l1), Some(Some(t))) = (&self.class.l1, b.tickets.get(u)) {
            l1.insert(
                b.key(u),
                L1Value::Value(payload.clone()),
                *t,
                fresh_for,
                tags,
            )
            .await;
        }
    }
}

/// An entry this call fetches itself (it leads its flight, or fetches without one).
struct Pending {
    u: usize,
    heals: u32,
    /// Registered after the first "wait" answer, as in `Cache::lead`.
    listener: Option<Watch>,
}

/// What became of one distinct entry: the caller's result and, for a value, its encoded payload (to decode a
/// copy for a duplicate id without requiring `V: Clone`).
type Answer<V> = (Result<Option<V>>, Option<Bytes>);

/// An entry whose lease another caller holds: how long that lease has left, the wake-up armed for it, and
/// the value its holder keeps meanwhile (fail-safe), served at the soft timeout.
type Waiting<'n> = (
    Pending,
    Duration,
    Option<Pin<Box<Notified<'n>>>>,
    Option<Fallback>,
);

/// A batch lead's answer for one distinct entry, with the outcome for its flight's followers.
type Led<V> = (usize, Result<Option<V>>, Outcome);

impl<V, C> Cache<V, C>
where
    V: Serialize + DeserializeOwned + Send + Sync + 'static,
    C: Codec,
{
    /// Return the cached values of many ids, in the order of `ids`, loading every missing one with **one**
    /// `loader` call (which receives exactly the missing ids) and caching what it returns.
    ///
    /// All ids are looked up in one round trip (on Redis Cluster: one pipeline per hash slot, run concurrently).
    /// Each id keeps every guarantee of [`get_or_set`](Self::get_or_set): hits are never passed to the loader;
    /// an id another caller is already loading (in this process or elsewhere in the fleet) is waited for and
    /// shared rather than loaded again; an id's value is stored only while this call's fill lease on it is
    /// held, so an id invalidated during the load is returned to this caller but not stored; the class TTL
    /// (with jitter) and `max_value_bytes` apply per value. Duplicate ids are fetched and loaded once and
    /// answered at each position. An empty `ids` returns at once without touching the store.
    ///
    /// The loader may return the values in any order and may return more ids than asked (those are ignored:
    /// this call holds no lease on them). It is called again, for the remaining ids only, in one case: an id
    /// another caller was loading whose load failed (its lease given back) while this call waited for it.
    /// `loader_timeout` bounds each call. With the store unavailable and `on_error = "fail_open"`, every
    /// missing id goes to the loader and nothing is stored. In a class with `refresh_ahead`, an id due for an
    /// eager refresh whose refresh lease this call wins is passed to the loader too and refreshed inline (its
    /// new value returned and stored, with the tags the entry records; if the loader fails or its answer lacks
    /// the id, its current value is returned); everyone else keeps getting the current value meanwhile. With
    /// `soft_timeout` and `stale_grace`, when every id the loader is asked for has a stale value at hand, the
    /// stale values are returned at the soft timeout and the load is abandoned (docs/cache.md, "Fail-safe").
    ///
    /// Counts in [`stats`](Self::stats) are per distinct id (hits, misses, coalesced, lease waits, refused
    /// fills, fail-open answers), except `loader_calls` and `loader_errors`, which count loader calls.
    ///
    /// ```
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::collections::HashMap;
    /// use std::time::Duration;
    /// use keyward::{Keyward, policy::{CacheClass, Policy}};
    ///
    /// let policy = Policy::builder("dev", "shop")
    ///     .cache("product", CacheClass::new(Duration::from_secs(600), "catalog service, after each write"))
    ///     .build()?;
    /// let products = Keyward::embedded(policy).cache::<String>("product")?;
    /// products.set(&2u32, &"cached".to_owned()).await?;
    ///
    /// let names = products
    ///     .get_or_set_many(&[1u32, 2, 3], |missing| async move {
    ///         assert_eq!(missing, [&1, &3]); // 2 is a hit
    ///         // e.g. SELECT id, name FROM product WHERE id IN (…)
    ///         Ok::<_, std::io::Error>(missing.into_iter().map(|&id| (id, format!("product {id}"))).collect::<HashMap<_, _>>())
    ///     })
    ///     .await?;
    /// assert_eq!(names, ["product 1", "cached", "product 3"]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// The error of the first id (in the order of `ids`) that could not be answered; values loaded for the other
    /// ids are still stored. [`Error::Loader`] when the loader fails (every id of that call gets the error, and
    /// their leases are given back at once — except, in a class with `stale_grace`, ids whose stale value was
    /// kept: they count as answered, and their values are stored again for `fail_safe_throttle`, so when every id
    /// was answered the call returns the values, and when one was not it returns the error and the next call
    /// serves the kept ones) or when its answer lacks an id it was asked for (the source is a
    /// [`MissingFromBatch`] naming the id; that id is not cached — use
    /// [`get_or_set_many_opt`](Self::get_or_set_many_opt) to cache absence), [`Error::LoaderTimeout`] (after the
    /// class `loader_timeout`), [`Error::ValueTooLarge`], [`Error::Encode`], [`Error::Key`] for an unusable id
    /// (before anything is fetched), and backend failures (unless the class fails open).
    pub async fn get_or_set_many<'i, I, F, Fut, M, K, E>(
        &self,
        ids: &'i [I],
        loader: F,
    ) -> Result<Vec<V>>
    where
        I: IdParts,
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        let found = self.load_many(ids, false, loader).await?;
        found
            .into_iter()
            .zip(ids)
            .map(|(v, id)| v.ok_or_else(|| self.missing(id)))
            .collect()
    }

    /// [`get_or_set_many`](Self::get_or_set_many) for sources where an entry may not exist: an id the loader's
    /// answer lacks is `None`, and that absence is cached for the class's `negative_ttl` (not at all if the
    /// class sets none), as [`get_or_set_opt`](Self::get_or_set_opt) does for one id.
    ///
    /// # Errors
    /// As [`get_or_set_many`](Self::get_or_set_many), except that a missing id is not an error.
    pub async fn get_or_set_many_opt<'i, I, F, Fut, M, K, E>(
        &self,
        ids: &'i [I],
        loader: F,
    ) -> Result<Vec<Option<V>>>
    where
        I: IdParts,
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        self.load_many(ids, true, loader).await
    }

    /// The loader error for an id its answer lacked.
    fn missing(&self, id: &(impl IdParts + ?Sized)) -> Error {
        let mut parts = Vec::new();
        id.push_parts(&mut parts);
        Error::Loader {
            class: self.class.name.clone(),
            source: Arc::new(Box::new(MissingFromBatch {
                id: parts.join(":"),
            })),
        }
    }

    async fn load_many<'i, I, F, Fut, M, K, E>(
        &self,
        ids: &'i [I],
        negative_ok: bool,
        mut loader: F,
    ) -> Result<Vec<Option<V>>>
    where
        I: IdParts,
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys = ids
            .iter()
            .map(|id| self.key(id))
            .collect::<Result<Vec<_>>>()?;
        // Distinct entries in order of first appearance; `of_id[i]`: the entry of `ids[i]`.
        let mut first = Vec::new();
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(keys.len());
        let of_id: Vec<usize> = keys
            .iter()
            .enumerate()
            .map(|(i, key)| {
                *seen.entry(key.as_str()).or_insert_with(|| {
                    first.push(i);
                    first.len() - 1
                })
            })
            .collect();
        let mut answers: Vec<Option<Answer<V>>> = (0..first.len()).map(|_| None).collect();
        // The in-process tier first: what it serves is never fetched; the rest get their fence readings now.
        let mut tickets = vec![None; first.len()];
        let mut todo: Vec<usize> = Vec::with_capacity(first.len());
        for (u, &i) in first.iter().enumerate() {
            let Some(l1) = &self.class.l1 else {
                todo.push(u);
                continue;
            };
            let key = &keys[i];
            if let Some(L1Value::Value(b)) = l1.get(key).await
                && let Ok(v) = C::decode::<V>(&b)
            {
                self.class.metrics.l1_hit();
                answers[u] = Some((Ok(Some(v)), Some(b)));
                continue;
            }
            tickets[u] = Some(l1.ticket(key));
            todo.push(u);
        }
        let batch = Batch {
            ids,
            keys: &keys,
            first: &first,
            negative_ok,
            tickets,
            soft_deadline: super::soft_deadline(&self.class.policy),
        };
        let span = tracing::debug_span!(
            "keyward.cache.get_or_set_many",
            class = %self.class.name,
            ids = ids.len(),
            distinct = first.len()
        );
        async {
            let lease_ttl = self.class.policy.lease_ttl_value();
            let max_age = self.kw.inner.backend.flight_max_age();
            // Entries whose local flight outlived any lease it could hold: fetched without a flight (as in
            // `Cache::load`); the backend's lease still admits one loader fleet-wide.
            let mut unflighted = vec![false; first.len()];
            while !todo.is_empty() {
                let mut lead = Vec::new();
                let mut follow = Vec::new();
                for u in todo.drain(..) {
                    if unflighted[u] {
                        lead.push((u, None));
                        continue;
                    }
                    let fkey = flight_key(batch.key(u), negative_ok);
                    match self.flights.join_younger_than(&fkey, max_age) {
                        Role::Leader(l) => lead.push((u, Some(l))),
                        Role::Follower(rx) => follow.push((u, rx)),
                    }
                }
                // As long as a lease can be held; with a soft timeout, no longer than it: past it, the id is
                // fetched directly (and gets the stale value its holder keeps, if any), as in `Cache::load`.
                let follow_until = batch
                    .soft_deadline
                    .unwrap_or_else(|| tokio::time::Instant::now() + lease_ttl);
                let following = join_all(follow.into_iter().map(|(u, rx)| async move {
                    (
                        u,
                        tokio::time::timeout_at(follow_until, flight::follow(rx)).await,
                    )
                }));
                let (led, followed) =
                    tokio::join!(self.lead_many(&batch, lead, &mut loader), following);
                for (u, result, bytes) in led {
                    answers[u] = Some((result, bytes));
                }
                for (u, followed) in followed {
                    match followed {
                        // The local leader outlived any lease it could hold, or the soft timeout passed.
                        Err(_) => {
                            unflighted[u] = true;
                            todo.push(u);
                        }
                        Ok(Some(Ok(Shared::Value(bytes)))) => {
                            if let Ok(v) = C::decode::<V>(&bytes) {
                                self.class.metrics.coalesced.increment(1);
                                answers[u] = Some((Ok(Some(v)), Some(bytes)));
                            } else {
                                todo.push(u);
                            }
                        }
                        Ok(Some(Ok(Shared::Negative))) => {
                            self.class.metrics.coalesced.increment(1);
                            answers[u] = Some((Ok(None), None));
                        }
                        Ok(Some(Err(e))) => answers[u] = Some((Err(e), None)),
                        // The leader's fill was refused, or the leader went away: fetch again.
                        Ok(Some(Ok(Shared::Retry)) | None) => todo.push(u),
                    }
                }
            }
        }
        .instrument(span)
        .await;
        self.assemble(&of_id, answers)
    }

    /// The values in the order of the ids (`of_id`), or the first id's error.
    fn assemble(&self, of_id: &[usize], answers: Vec<Option<Answer<V>>>) -> Result<Vec<Option<V>>> {
        let mut answers: Vec<Answer<V>> = answers
            .into_iter()
            .map(|a| {
                a.unwrap_or_else(|| {
                    let bug = "keyward left an id of a batch unanswered (please report this bug)";
                    (Err(self.loader_bug(bug)), None)
                })
            })
            .collect();
        if let Some(err) = of_id.iter().find_map(|&u| answers[u].0.as_ref().err()) {
            return Err(err.clone());
        }
        of_id
            .iter()
            .map(|&u| match &mut answers[u] {
                (Ok(slot), bytes) => match (slot.take(), bytes) {
                    (Some(v), _) => Ok(Some(v)),
                    // A duplicate id: its own copy, from the encoded value.
                    (None, Some(bytes)) => {
                        C::decode::<V>(bytes).map(Some).map_err(|e| Error::Decode {
                            class: self.class.name.clone(),
                            source: Arc::new(e.to_string().into()),
                        })
                    }
                    (None, None) => Ok(None),
                },
                (Err(e), _) => Err(e.clone()),
            })
            .collect()
    }

    fn loader_bug(&self, what: &'static str) -> Error {
        Error::Loader {
            class: self.class.name.clone(),
            source: Arc::new(what.into()),
        }
    }

    /// Fetch the entries this call leads (`lead`), load the missing ones, and complete each entry's flight as
    /// soon as its outcome is known. Like `Cache::lead`, per entry: hits are decoded (undecodable values healed
    /// and fetched again), leases are filled, and entries whose lease is held elsewhere are waited for (woken
    /// by the holder's commit) and fetched again, while the fills of this round go on.
    async fn lead_many<'i, I, F, Fut, M, K, E>(
        &self,
        b: &Batch<'_, 'i, I>,
        lead: Vec<(usize, Option<Leader>)>,
        loader: &mut F,
    ) -> Vec<(usize, Result<Option<V>>, Option<Bytes>)>
    where
        I: IdParts,
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        let inner = &self.kw.inner;
        let m = &self.class.metrics;
        let lease_ttl = self.class.policy.lease_ttl_value();
        let mut out = Vec::with_capacity(lead.len());
        let mut pending: Vec<Pending> = lead
            .iter()
            .map(|(u, _)| Pending {
                u: *u,
                heals: 0,
                listener: None,
            })
            .collect();
        // Shared (a mutex, never held across an await; keeps the call's future `Send`): `finish` completes a
        // flight when its id is answered, an eager refresh before that.
        let leaders: std::sync::Mutex<HashMap<usize, Leader>> = std::sync::Mutex::new(
            lead.into_iter()
                .filter_map(|(u, l)| Some((u, l?)))
                .collect(),
        );
        let mut finish = |(u, result, outcome): Led<V>| {
            let bytes = match &outcome {
                Ok(Shared::Value(bytes)) => Some(bytes.clone()),
                _ => None,
            };
            let leader = leaders.lock().unwrap_or_else(|e| e.into_inner()).remove(&u);
            if let Some(leader) = leader {
                leader.complete(outcome);
            }
            out.push((u, result, bytes));
        };
        while !pending.is_empty() {
            // Armed before the fetch, as in `Cache::lead`: a commit between the answer and the wait is not missed.
            let notifies: Vec<_> = pending
                .iter()
                .map(|p| p.listener.as_ref().map(Watch::shared))
                .collect();
            let woken = notifies.iter().map(|n| {
                n.as_ref().map(|n| {
                    let mut w = Box::pin(n.notified());
                    w.as_mut().enable();
                    w
                })
            });
            let woken: Vec<_> = woken.collect();
            let marker = envelope::lease_marker(rand::random());
            let prefix = envelope::lease_prefix(&marker);
            let entries: Vec<Entry<'_>> = pending.iter().map(|p| self.entry(b.key(p.u))).collect();
            let fetched = store::many::fetch_many(
                &inner.backend,
                &entries,
                &marker,
                lease_ttl,
                b.negative_ok,
            )
            .await;
            let mut fills = Vec::new();
            let mut uncached = Vec::new();
            let mut waits = Vec::new();
            let mut again = Vec::new();
            for ((mut p, fetched), woken) in pending.drain(..).zip(fetched).zip(woken) {
                let key = b.key(p.u);
                let fetched = match fetched {
                    // Due for an eager refresh, and this call holds the refresh lease: the id joins this
                    // round's one loader call and is refreshed inline, as a borrowing `get_or_set` does
                    // (the loader borrows from the caller, so the refresh cannot outlive the call). Everyone
                    // else keeps getting the current value meanwhile; callers in this process that joined
                    // this id's flight get it now. A value this caller cannot serve gives the lease back
                    // and is read again as a plain hit would be (healed if it does not decode).
                    Ok(Fetched::Refresh(raw, mut gens)) => {
                        let guard = LeaseGuard {
                            kw: self.kw.clone(),
                            class: Arc::clone(&self.class),
                            key: key.to_owned(),
                            prefix: prefix.to_owned(),
                            armed: true,
                        };
                        // A batch takes no tags, but the entry it refreshes may carry some (a tagged single
                        // call filled it): the new value records them at the epochs the current one recorded,
                        // so a tag invalidation before or during this load still removes it.
                        match (self.fallback(raw.clone(), true), super::kept_tags(&raw)) {
                            (Some(current), Some(tags)) => {
                                gens.tags = tags;
                                m.hits.increment(1);
                                m.refreshes.increment(1);
                                let leader = leaders
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .remove(&p.u);
                                if let Some(leader) = leader {
                                    leader.complete(Ok(Shared::Value(current.payload.clone())));
                                }
                                fills.push((p.u, gens, guard, Some(current)));
                                continue;
                            }
                            _ => {
                                guard.release().await;
                                Ok(Fetched::Hit(raw, None))
                            }
                        }
                    }
                    other => other,
                };
                match fetched {
                    // The store is down: the source still answers (this call leads the entry's flight, so
                    // concurrent callers in this process share the load); nothing is written.
                    Err(err) if self.fails_open(&err) => uncached.push(p.u),
                    Err(err) => finish(with_u(p.u, failed(err))),
                    Ok(Fetched::Hit(raw, fresh_for)) => {
                        let reason = match self.decode(&raw) {
                            Ok(Decoded::Value(v, payload)) => {
                                m.hits.increment(1);
                                // The copy carries the tags of the stored value (a tagged single call
                                // may have filled it); unreadable tags make it drop with any tag.
                                let stored = super::stored_tags(&raw);
                                let tags = stored.as_ref().map_or(
                                    super::l1::InsertTags::Unknown,
                                    super::l1::InsertTags::Stored,
                                );
                                self.l1_insert(b, p.u, &payload, fresh_for, tags).await;
                                finish((p.u, Ok(Some(v)), Ok(Shared::Value(payload))));
                                continue;
                            }
                            Ok(Decoded::Negative) if b.negative_ok => {
                                m.negative_hits.increment(1);
                                finish((p.u, Ok(None), Ok(Shared::Negative)));
                                continue;
                            }
                            // Only a corrupt header can get here; heal like any undecodable value.
                            Ok(Decoded::Negative) => "unexpected absent marker".to_owned(),
                            Err(reason) => reason,
                        };
                        if let Err(err) = self.heal(key, &raw, &reason).await {
                            finish(with_u(p.u, failed(err)));
                            continue;
                        }
                        p.heals += 1;
                        if p.heals >= MAX_HEALS {
                            tracing::warn!(class = %self.class.name, key, "entry keeps failing to decode; loading uncached");
                            uncached.push(p.u);
                        } else {
                            again.push(p);
                        }
                    }
                    // With fail-safe, the lease keeps the stale value: served for this id if the batch load
                    // fails (and throttled), as a single `get_or_set` does.
                    Ok(Fetched::Leased(gens, stale)) => {
                        m.misses.increment(1);
                        let guard = LeaseGuard {
                            kw: self.kw.clone(),
                            class: Arc::clone(&self.class),
                            key: key.to_owned(),
                            prefix: prefix.to_owned(),
                            armed: true,
                        };
                        let fallback = stale.and_then(|raw| self.fallback(raw, false));
                        fills.push((p.u, gens, guard, fallback));
                    }
                    // What the holder keeps now (an invalidation since the last look may have removed it).
                    Ok(Fetched::Wait(left, stale)) => {
                        let kept = stale.and_then(|raw| self.fallback(raw, false));
                        waits.push((p, left, woken, kept));
                    }
                    Ok(Fetched::Refresh(..)) => unreachable_refresh(),
                }
            }
            let (filled, waited) = tokio::join!(
                self.fill_many(b, fills, uncached, loader),
                self.wait_many(b, waits)
            );
            for led in filled {
                finish(led);
            }
            pending = again;
            for waited in waited {
                match waited {
                    Ok(p) => pending.push(p),
                    Err(led) => finish(led),
                }
            }
        }
        out
    }

    /// Wait for the entries whose lease is held elsewhere: the first time, register for wake-ups (and fetch
    /// again at once); after that, until the holder's commit or release wakes it, its lease runs out, or (on
    /// Redis) a response timeout passes, as `Cache::lead` does. Each gives back the entry to fetch again
    /// (`Ok`), or its answer (`Err`): past the class's `soft_timeout`, an entry whose holder keeps a stale
    /// value is answered with it, as a single `get_or_set` is.
    async fn wait_many<I>(
        &self,
        b: &Batch<'_, '_, I>,
        waits: Vec<Waiting<'_>>,
    ) -> Vec<std::result::Result<Pending, Led<V>>> {
        let inner = &self.kw.inner;
        let lease_ttl = self.class.policy.lease_ttl_value();
        // Entries not yet registered are fetched again at once: nobody sleeps in this round.
        let arming = waits.iter().any(|(_, _, woken, _)| woken.is_none());
        join_all(
            waits
                .into_iter()
                .map(|(mut p, left, woken, kept)| async move {
                    match woken {
                        None => {
                            p.listener =
                                Some(inner.backend.watch(&inner.bus, &inner.ns, b.key(p.u)).await);
                        }
                        Some(woken) if !arming => {
                            self.class.metrics.lease_waits.increment(1);
                            let mut left = left.clamp(Duration::from_millis(1), lease_ttl);
                            if let Some(slice) = inner.backend.wait_slice() {
                                left = left.min(slice);
                            }
                            if let (Some(deadline), Some(fb)) = (b.soft_deadline, kept) {
                                let now = tokio::time::Instant::now();
                                if now >= deadline {
                                    // Waited `soft_timeout` with a stale value at hand: serve it.
                                    let (result, outcome) = self.serve_stale(
                                        fb,
                                        StaleReason::SoftTimeout,
                                        &Seen::new(0),
                                    );
                                    return Err((p.u, result, outcome));
                                }
                                left = left.min(deadline - now);
                            }
                            let _ = tokio::time::timeout(left, woken).await;
                        }
                        Some(_) => {}
                    }
                    Ok(p)
                }),
        )
        .await
    }

    /// One loader call for the entries this call holds leases on (`fills`) and those answered uncached
    /// (`uncached`: the store is down, or the value keeps failing to decode); then the fills' commits, each
    /// only while its lease is held, concurrently.
    async fn fill_many<'i, I, F, Fut, M, K, E>(
        &self,
        b: &Batch<'_, 'i, I>,
        fills: Vec<(usize, Stamp, LeaseGuard, Option<Fallback>)>,
        uncached: Vec<usize>,
        loader: &mut F,
    ) -> Vec<Led<V>>
    where
        I: IdParts,
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        if fills.is_empty() && uncached.is_empty() {
            return Vec::new();
        }
        let wanted = fills
            .iter()
            .map(|(u, ..)| *u)
            .chain(uncached.iter().copied())
            .map(|u| &b.ids[b.first[u]])
            .collect();
        // A soft timeout needs a stale value at hand for every id the loader is asked for: the call answers
        // every id together, so with one id that has none it waits for the load anyway.
        let all_stale = uncached.is_empty()
            && fills
                .iter()
                .all(|(.., fallback)| fallback.as_ref().is_some_and(|fb| !fb.fresh));
        let load = self.run_batch_loader(loader, wanted);
        let loaded = match b.soft_deadline.filter(|_| all_stale) {
            Some(deadline) => match tokio::time::timeout_at(deadline, load).await {
                Ok(loaded) => loaded,
                Err(_) => {
                    // Past the soft timeout with a stale value for every id: serve them. The load is
                    // abandoned (the loader borrows from the caller) and each lease gives its stale value
                    // back, as a single `get_or_set` does.
                    return join_all(fills.into_iter().map(|(u, _, guard, fallback)| async move {
                        guard.release().await;
                        match fallback {
                            Some(fb) => {
                                let (result, outcome) =
                                    self.serve_stale(fb, StaleReason::SoftTimeout, &Seen::new(0));
                                (u, result, outcome)
                            }
                            None => with_u(u, failed(self.loader_bug("no stale value kept"))),
                        }
                    }))
                    .await;
                }
            },
            None => load.await,
        };
        let mut loaded = match loaded {
            Ok(loaded) => loaded,
            Err(err) => {
                let reason = if matches!(err, Error::LoaderTimeout { .. }) {
                    StaleReason::LoaderTimeout
                } else {
                    StaleReason::LoaderError
                };
                let mut out: Vec<Led<V>> = uncached
                    .into_iter()
                    .map(|u| with_u(u, failed(err.clone())))
                    .collect();
                let answered = join_all(fills.into_iter().map(|(u, gens, guard, fallback)| {
                    let err = err.clone();
                    async move {
                        let Some(fb) = fallback else {
                            guard.release().await;
                            return with_u(u, failed(err));
                        };
                        if fb.fresh {
                            // A failed eager refresh: the current value stays, and so does the lease until
                            // its deadline (the failing source is tried again at most once per `lease_ttl`).
                            let mut guard = guard;
                            guard.armed = false;
                            return match C::decode::<V>(&fb.payload) {
                                Ok(v) => (u, Ok(Some(v)), Ok(Shared::Value(fb.payload))),
                                Err(_) => with_u(u, failed(err)),
                            };
                        }
                        // Fail-safe: the kept value, stored again as current for `fail_safe_throttle`
                        // (only while the lease stands: an invalidation meanwhile removed it).
                        if !self.throttle(guard, &fb, &gens).await {
                            return with_u(u, failed(err));
                        }
                        let (result, outcome) = self.serve_stale(fb, reason, &Seen::new(0));
                        (u, result, outcome)
                    }
                }))
                .await;
                out.extend(answered);
                return out;
            }
        };
        let mut out = Vec::with_capacity(fills.len() + uncached.len());
        for u in uncached {
            out.push(match loaded.remove(b.key(u)) {
                Some(v) => match self.encode(&v) {
                    Ok(p) => (u, Ok(Some(v)), Ok(Shared::Value(Bytes::from(p)))),
                    Err(err) => with_u(u, failed(err)),
                },
                None if b.negative_ok => (u, Ok(None), Ok(Shared::Negative)),
                None => with_u(u, failed(self.missing(&b.ids[b.first[u]]))),
            });
        }
        let mut releases = Vec::new();
        let mut commits = Vec::with_capacity(fills.len());
        for (u, gens, mut guard, fallback) in fills {
            let value = loaded.remove(&guard.key);
            let encoded = match &value {
                Some(v) => self.encode(v).map(Some),
                None if !b.negative_ok => Err(self.missing(&b.ids[b.first[u]])),
                None => Ok(None),
            };
            let payload = match encoded {
                Ok(payload) => payload,
                Err(err) => {
                    match fallback.filter(|fb| fb.fresh) {
                        // An eager refresh that failed for this id alone (the answer lacks it, or its value
                        // cannot be stored): the current value stays, and so does the lease, as when the
                        // whole loader call fails.
                        Some(fb) => {
                            guard.armed = false;
                            out.push(match C::decode::<V>(&fb.payload) {
                                Ok(v) => (u, Ok(Some(v)), Ok(Shared::Value(fb.payload))),
                                Err(_) => with_u(u, failed(err)),
                            });
                        }
                        None => {
                            releases.push(guard);
                            out.push(with_u(u, failed(err)));
                        }
                    }
                    continue;
                }
            };
            let ttl = match payload {
                Some(_) => self.class.policy.stored_ttl(),
                None => match self.class.policy.jittered_negative_ttl() {
                    Some(ttl) => ttl,
                    None => {
                        // Absent, and the class does not cache absence.
                        releases.push(guard);
                        out.push((u, Ok(None), Ok(Shared::Negative)));
                        continue;
                    }
                },
            };
            let stored = envelope::value(&gens, &envelope::body(payload.as_deref()));
            let shared = payload.map_or(Shared::Negative, |p| Shared::Value(Bytes::from(p)));
            commits.push((u, guard, value, shared, stored, ttl));
        }
        let committed = join_all(commits.iter().map(|(_, guard, _, _, stored, ttl)| {
            let e = self.entry(&guard.key);
            async move { store::commit(&self.kw, &e, &guard.prefix, stored, *ttl).await }
        }))
        .await;
        for ((u, mut guard, value, shared, stored, ttl), committed) in
            commits.into_iter().zip(committed)
        {
            match committed {
                Ok(true) => {
                    guard.armed = false;
                    if let Shared::Value(payload) = &shared {
                        let grace = self.class.policy.stale_grace_value().unwrap_or_default();
                        // A batch takes no tags; a refreshed entry keeps those it recorded.
                        let stored = super::stored_tags(&stored);
                        let tags = stored.as_ref().map_or(
                            super::l1::InsertTags::Unknown,
                            super::l1::InsertTags::Stored,
                        );
                        self.l1_insert(b, u, payload, Some(ttl.saturating_sub(grace)), tags)
                            .await;
                    }
                    out.push((u, Ok(value), Ok(shared)));
                }
                Ok(false) => {
                    // An invalidation voided the lease while we loaded: returned to this caller, not stored,
                    // and callers who joined this entry's flight fetch again.
                    self.class.metrics.fills_refused.increment(1);
                    guard.armed = false;
                    out.push((u, Ok(value), Ok(Shared::Retry)));
                }
                // Redis went away while we loaded: the value is good, it just is not cached (fail open).
                Err(err) if self.fails_open(&err) => {
                    releases.push(guard);
                    out.push((u, Ok(value), Ok(shared)));
                }
                Err(err) => {
                    releases.push(guard);
                    out.push(with_u(u, failed(err)));
                }
            }
        }
        join_all(releases.into_iter().map(LeaseGuard::release)).await;
        out
    }

    /// Call the loader once for `wanted`, bounded by the class `loader_timeout`, counted as one loader call;
    /// its answer keyed by each returned id's entry key (ids that cannot form a key match nothing asked for).
    async fn run_batch_loader<'i, I, F, Fut, M, K, E>(
        &self,
        loader: &mut F,
        wanted: Vec<&'i I>,
    ) -> Result<HashMap<String, V>>
    where
        F: FnMut(Vec<&'i I>) -> Fut,
        Fut: Future<Output = std::result::Result<M, E>>,
        M: IntoIterator<Item = (K, V)>,
        K: IdParts,
        E: Into<BoxError>,
    {
        let found = self.timed_load(loader(wanted)).await?;
        Ok(found
            .into_iter()
            .filter_map(|(id, v)| Some((self.key(&id).ok()?, v)))
            .collect())
    }
}

/// `Fetched::Refresh` is taken (as a fill) or turned into a hit before the match that would see it.
fn unreachable_refresh() {}

fn with_u<V>(u: usize, (result, outcome): (Result<Option<V>>, Outcome)) -> Led<V> {
    (u, result, outcome)
}
