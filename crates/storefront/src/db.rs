//! SQLite, the source of truth: a small pool of `rusqlite` connections, run on tokio's blocking threads,
//! and a count of the calls made into it.
//!
//! **The one decision to know:** every database access goes through [`Db::read`] or [`Db::write`], and
//! each of those is one *query* in [`Db::queries`] — the number tests and the replay compare with the
//! requests served to show what the cache saved. A `write` is one `BEGIN IMMEDIATE` transaction: writers
//! queue on SQLite's write lock (with a busy timeout) instead of failing, and a check-then-write inside
//! one closure (stock check and decrement) is atomic.
//!
//! The database runs in WAL mode, so readers never wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::Semaphore;

use crate::orders::InStream;

/// The schema, applied at every open (every statement is `IF NOT EXISTS` or `INSERT OR IGNORE`), with the
/// database's identity ([`Db::id`]).
const SCHEMA: &str = include_str!("schema.sql");

/// How long a connection waits for SQLite's write lock before a write fails with "database is locked".
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A failure of the database.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// The database file could not be opened or set up.
    #[error("cannot open the database {}: {source}", path.display())]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A statement failed.
    #[error("database: {what}: {source}")]
    Query {
        /// What the statement was for (`"list products"`).
        what: &'static str,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A row that was asked for does not exist (or is not visible to the shop: an unpublished product).
    #[error("no {what} {id}")]
    NotFound {
        /// What kind of row (`"product"`, `"category"`).
        what: &'static str,
        /// Its id.
        id: String,
    },
    /// A write that the data does not allow (a negative price).
    #[error("{what}: {reason}")]
    Invalid {
        /// The field or operation.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// The blocking task that ran the statement panicked or was cancelled.
    #[error("the database task did not finish: {0}")]
    Task(String),
}

impl DbError {
    /// A [`DbError::Query`] for `what`; for `map_err`.
    pub fn query(what: &'static str) -> impl FnOnce(rusqlite::Error) -> DbError {
        move |source| DbError::Query { what, source }
    }
}

/// A pool of SQLite connections to one database file, with a count of the calls made. Cheap to clone.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Idle connections; a permit of `slots` is held while one is out.
    idle: Mutex<Vec<Connection>>,
    slots: Semaphore,
    queries: AtomicU64,
    /// When this handle opened the file, as SQLite writes `created_at` (UTC, ms).
    opened_at: String,
    /// The database's identity (`database_identity.id`).
    id: String,
    /// The order events this process put in its own (embedded) stream; see [`InStream`].
    in_stream: InStream,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .field("queries", &self.queries())
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Open (creating it if missing) the database at `path` with `pool_size` connections (at least 1),
    /// switch it to WAL mode and apply the schema.
    ///
    /// # Errors
    /// [`DbError::Open`] naming the file.
    pub fn open(path: &Path, pool_size: usize) -> Result<Db, DbError> {
        let open_err = |source| DbError::Open {
            path: path.to_owned(),
            source,
        };
        let mut idle = Vec::new();
        let mut opened_at = String::new();
        let mut id = String::new();
        for i in 0..pool_size.max(1) {
            let conn = Connection::open_with_flags(
                path,
                OpenFlags::SQLITE_OPEN_READ_WRITE
                    | OpenFlags::SQLITE_OPEN_CREATE
                    | OpenFlags::SQLITE_OPEN_NO_MUTEX
                    | OpenFlags::SQLITE_OPEN_URI,
            )
            .map_err(open_err)?;
            conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
            conn.pragma_update(None, "foreign_keys", true)
                .map_err(open_err)?;
            if i == 0 {
                conn.pragma_update(None, "journal_mode", "WAL")
                    .map_err(open_err)?;
                conn.pragma_update(None, "synchronous", "NORMAL")
                    .map_err(open_err)?;
                conn.execute_batch(SCHEMA).map_err(open_err)?;
                opened_at = conn
                    .query_row("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')", [], |r| {
                        r.get(0)
                    })
                    .map_err(open_err)?;
                id = read_id(&conn).map_err(open_err)?;
            }
            idle.push(conn);
        }
        let slots = Semaphore::new(idle.len());
        Ok(Db {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                idle: Mutex::new(idle),
                slots,
                queries: AtomicU64::new(0),
                opened_at,
                id,
                in_stream: InStream::default(),
            }),
        })
    }

    /// When this handle opened the database (UTC, `YYYY-MM-DD HH:MM:SS.SSS`, the format of the tables'
    /// `created_at`): rows written before it were written by an earlier process.
    pub fn opened_at(&self) -> &str {
        &self.inner.opened_at
    }

    /// The database's identity: 32 hex digits made at random by the first open of the file (or the first
    /// open by a version that knows it), the same for every process on the file, different for every
    /// other database. `/healthz` shows it; `storefront replay` compares it with its `--db` file.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The orders whose `order.placed` event this process has put in its own stream (the embedded
    /// backend's) and whose outbox row may still exist: what keeps the outbox relay from publishing an
    /// event twice. Kept with the database handle because it is this process's knowledge about rows of
    /// this file, shared by the shop's `POST /orders` and the worker's relay (both hold this handle), like
    /// [`opened_at`](Self::opened_at).
    pub(crate) fn in_stream(&self) -> &InStream {
        &self.inner.in_stream
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// How many calls ([`read`](Self::read) and [`write`](Self::write)) this pool has run since it was
    /// opened; each is one statement or one transaction.
    pub fn queries(&self) -> u64 {
        self.inner.queries.load(Ordering::Relaxed)
    }

    /// Run `f` on a pooled connection, on a blocking thread, and count it as one query.
    ///
    /// # Errors
    /// What `f` returns; [`DbError::Task`] if it panicked.
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
    {
        self.run(move |conn| f(conn)).await
    }

    /// Run `f` in one `BEGIN IMMEDIATE` transaction on a pooled connection, on a blocking thread, and count
    /// it as one query. The transaction commits if `f` returns `Ok` and rolls back otherwise.
    ///
    /// # Errors
    /// What `f` returns; [`DbError::Query`] if the transaction cannot begin or commit; [`DbError::Task`] if
    /// `f` panicked.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E> + Send + 'static,
    {
        self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| E::from(DbError::query("begin a transaction")(e)))?;
            let out = f(&tx)?;
            tx.commit()
                .map_err(|e| E::from(DbError::query("commit")(e)))?;
            Ok(out)
        })
        .await
    }

    async fn run<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    {
        // The semaphore is never closed, so acquire only fails if it were; treat that as a task failure.
        let permit = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|e| E::from(DbError::Task(e.to_string())))?;
        self.inner.queries.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::telemetry::DB_QUERIES).increment(1);
        let inner = Arc::clone(&self.inner);
        let joined = tokio::task::spawn_blocking(move || {
            let conn = inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop()
                .ok_or_else(|| {
                    E::from(DbError::Task(
                        "no idle connection behind a permit".to_owned(),
                    ))
                })?;
            // Returned to the pool on drop, also when `f` panics.
            let mut pooled = Pooled {
                conn: Some(conn),
                inner,
            };
            match pooled.conn.as_mut() {
                Some(conn) => f(conn),
                None => Err(E::from(DbError::Task("no connection".to_owned()))),
            }
        })
        .await;
        drop(permit);
        joined.map_err(|e| E::from(DbError::Task(e.to_string())))?
    }
}

/// The identity the schema wrote (or found) in `database_identity`.
///
/// # Errors
/// SQLite's, e.g. the table is missing (the schema was not applied).
fn read_id(conn: &Connection) -> rusqlite::Result<String> {
    conn.query_row(
        "SELECT id FROM database_identity WHERE only_row = 1",
        [],
        |r| r.get(0),
    )
}

/// A connection out of the pool; it goes back when dropped.
struct Pooled {
    conn: Option<Connection>,
    inner: Arc<Inner>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.inner
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_are_counted_and_a_panicking_call_gives_its_connection_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), 1).unwrap();
        let one: i64 = db
            .read(|c| {
                c.query_row("SELECT 1", [], |r| r.get(0))
                    .map_err(DbError::query("one"))
            })
            .await
            .unwrap();
        assert_eq!((one, db.queries()), (1, 1));

        let failed = db
            .read(|_| -> Result<(), DbError> { panic!("a bug in a query") })
            .await
            .unwrap_err();
        assert!(matches!(failed, DbError::Task(_)), "{failed:?}");
        // The pool's only connection is back: the next call runs.
        db.write(|tx| {
            tx.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')", [])
                .map_err(DbError::query("insert"))
        })
        .await
        .unwrap();
        assert_eq!(db.queries(), 3);
    }

    #[test]
    fn a_database_keeps_its_identity_and_an_old_one_gets_one_at_its_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.db"), dir.path().join("b.db"));
        let first = Db::open(&a, 2).unwrap().id().to_owned();
        assert_eq!(first.len(), 32, "{first}");
        assert!(first.bytes().all(|c| c.is_ascii_hexdigit()), "{first}");
        // Every later open (another process on the file) finds the same id; another file has its own.
        assert_eq!(Db::open(&a, 1).unwrap().id(), first);
        assert_ne!(Db::open(&b, 1).unwrap().id(), first);

        // A database from before the identity existed: the next open creates it, once.
        Connection::open(&a)
            .unwrap()
            .execute_batch("DROP TABLE database_identity")
            .unwrap();
        let made = Db::open(&a, 1).unwrap().id().to_owned();
        assert_eq!(made.len(), 32);
        assert_ne!(made, first, "a new random id");
        assert_eq!(Db::open(&a, 1).unwrap().id(), made);
    }

    #[tokio::test]
    async fn a_failed_write_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("t.db"), 2).unwrap();
        let failed = db
            .write(|tx| {
                tx.execute("INSERT INTO meta (key, value) VALUES ('k', 'v')", [])
                    .map_err(DbError::query("insert"))?;
                Err::<(), _>(DbError::Invalid {
                    what: "test",
                    reason: "changed my mind".into(),
                })
            })
            .await;
        assert!(failed.is_err());
        let rows: i64 = db
            .read(|c| {
                c.query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0))
                    .map_err(DbError::query("count"))
            })
            .await
            .unwrap();
        assert_eq!(rows, 0);
    }
}
