//! One embedded-backend storefront per database: an exclusive OS file lock on `<db>.embedded.lock`,
//! held for the life of the process.
//!
//! On the embedded backend keyward's state (the catalog cache, sessions, idempotency keys, the
//! `order.placed` stream) lives in the process. A second embedded instance on the same SQLite file would
//! serve stale prices after an admin change on the first, refuse the first's session cookies, and store
//! an order twice when it is retried on the other instance with the same `Idempotency-Key`. The binary
//! therefore takes this lock before it serves (or writes the restock report) without `REDIS_URL`; with
//! Redis, that state is shared and any number of instances may run on one database.
//!
//! **The one decision to know: the lock is an OS lock (`flock` on Unix, `LockFileEx` on Windows) on a
//! file of its own, never a marker file's existence.** The kernel drops it when the process exits or is
//! killed, so a crashed shop never leaves a stale lock behind, and the file itself is left in place (an
//! unlink could let two processes lock two different inodes of the same name). It is a separate file, not
//! the database: SQLite takes its own POSIX locks on the database, which some file systems (NFS) implement
//! with the same primitive as `flock`. `storefront replay` (read-only) and `storefront worker` (Redis
//! only) do not take it.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

/// Why [`EmbeddedLock::acquire`] failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmbeddedLockError {
    /// Another process holds the lock: an embedded storefront already runs on this database.
    #[error(
        "another storefront on the embedded backend already uses the database {} (it holds {}). The \
         embedded backend keeps its cache, sessions, idempotency keys and order stream in its own \
         process, so a second instance would serve stale data, refuse the first one's sessions and \
         store retried orders twice. Set REDIS_URL to run several instances against one database",
        db.display(),
        lock_file.display()
    )]
    Held {
        /// The database file.
        db: PathBuf,
        /// The lock file (`<db>.embedded.lock`).
        lock_file: PathBuf,
    },
    /// The lock file could not be opened or locked.
    #[error("locking {}: {source}", lock_file.display())]
    Io {
        /// The lock file (`<db>.embedded.lock`).
        lock_file: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// The held lock; dropping it (or the process ending, however it ends) releases it.
#[derive(Debug)]
pub struct EmbeddedLock {
    // Holding the open file holds the lock: the OS releases it when the descriptor is closed.
    _file: File,
    path: PathBuf,
}

impl EmbeddedLock {
    /// Take the exclusive lock on `<db>.embedded.lock` (creating that file if needed), without waiting.
    ///
    /// # Errors
    /// [`EmbeddedLockError::Held`] when another process (or another handle in this one) holds it;
    /// [`EmbeddedLockError::Io`] when the file cannot be created, opened or locked.
    pub fn acquire(db: &Path) -> Result<EmbeddedLock, EmbeddedLockError> {
        let path = Self::file_for(db);
        let io = |source| EmbeddedLockError::Io {
            lock_file: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // Fully qualified: on Rust 1.89+ `File::try_lock` is an inherent method with another error type.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(EmbeddedLock { _file: file, path }),
            Err(fs4::TryLockError::WouldBlock) => Err(EmbeddedLockError::Held {
                db: db.to_path_buf(),
                lock_file: path,
            }),
            Err(fs4::TryLockError::Error(source)) => Err(io(source)),
        }
    }

    /// The lock file for `db`: `<db>.embedded.lock`.
    pub fn file_for(db: &Path) -> PathBuf {
        let mut file = db.as_os_str().to_owned();
        file.push(".embedded.lock");
        PathBuf::from(file)
    }

    /// The lock file this lock holds.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_database_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("shop.db");
        let first = EmbeddedLock::acquire(&db).unwrap();
        assert_eq!(first.path(), dir.path().join("shop.db.embedded.lock"));
        let error = EmbeddedLock::acquire(&db).unwrap_err();
        assert!(matches!(error, EmbeddedLockError::Held { .. }), "{error:?}");
        let message = error.to_string();
        assert!(
            message.contains(&db.display().to_string()) && message.contains("REDIS_URL"),
            "{message}"
        );
        // Another database is another lock.
        let _other = EmbeddedLock::acquire(&dir.path().join("other.db")).unwrap();
        drop(first);
        let _again = EmbeddedLock::acquire(&db).unwrap();
    }

    #[test]
    fn an_unwritable_place_is_an_io_error_naming_the_lock_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("missing-dir").join("shop.db");
        let error = EmbeddedLock::acquire(&db).unwrap_err();
        assert!(matches!(error, EmbeddedLockError::Io { .. }), "{error:?}");
        assert!(
            error.to_string().contains("shop.db.embedded.lock"),
            "{error}"
        );
    }
}
