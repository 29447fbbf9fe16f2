//! Point reads served inline: a few synchronous read-only connections
//! used on the calling thread for lookups by key (a task by id, its
//! attempts, an API token by hash).
//!
//! Such a lookup costs SQLite a few microseconds; sending it to a read-pool
//! connection's own thread and the rows back costs several thread wake-ups,
//! which on a loaded two-core machine is most of a request's time. Scans,
//! lists and search stay on the read pool, where a long query cannot hold
//! up the async runtime.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::read::{ATTEMPTS_SQL, TASK_COLUMNS, attempt_from_row, task_from_row};
use crate::error::{Error, Result};
use crate::model::{Attempt, TaskRecord};

/// Idle connections kept; more are opened under load and closed after.
const KEEP: usize = 4;
/// Page cache per connection, in KiB (a negative `cache_size`).
const CACHE_KIB: i64 = 2000;

pub(super) struct QuickReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl QuickReads {
    pub(super) fn new(path: &Path) -> Self {
        QuickReads {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn open(&self) -> Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| {
            Error::Store(format!(
                "cannot open the database {}: {e}",
                self.path.display()
            ))
        })?;
        conn.busy_timeout(super::BUSY_TIMEOUT)?;
        conn.execute_batch(&format!("PRAGMA cache_size = -{CACHE_KIB};"))?;
        conn.set_prepared_statement_cache_capacity(16);
        Ok(conn)
    }

    /// Runs `f` on an idle connection (or a new one), then keeps it.
    fn with<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let taken = self.idle.lock().map_err(|_| poisoned())?.pop();
        let conn = match taken {
            Some(c) => c,
            None => self.open()?,
        };
        let out = f(&conn);
        let mut idle = self.idle.lock().map_err(|_| poisoned())?;
        if idle.len() < KEEP {
            idle.push(conn);
        }
        out
    }

    pub(super) fn task(&self, id: &str) -> Result<Option<TaskRecord>> {
        self.with(|c| task_in(c, id))
    }

    pub(super) fn attempts(&self, id: &str) -> Result<Vec<Attempt>> {
        self.with(|c| attempts_in(c, id))
    }

    /// Both reads in one read transaction, so they see one commit.
    pub(super) fn task_with_attempts(
        &self,
        id: &str,
    ) -> Result<Option<(TaskRecord, Vec<Attempt>)>> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let out = match task_in(&tx, id)? {
                Some(t) => Some((t, attempts_in(&tx, id)?)),
                None => None,
            };
            tx.commit()?;
            Ok(out)
        })
    }

    /// (id, name, role, created_at, revoked_at) of the live token with this hash.
    #[allow(clippy::type_complexity)]
    pub(super) fn token(
        &self,
        hash: &str,
    ) -> Result<Option<(String, String, String, i64, Option<i64>)>> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT id, name, role, created_at, revoked_at FROM api_tokens \
                 WHERE hash = ?1 AND revoked_at IS NULL",
            )?
            .query_row(params![hash], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?)
        })
    }

    pub(super) fn tokens_exist(&self) -> Result<bool> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM api_tokens WHERE revoked_at IS NULL)",
            )?
            .query_row([], |r| r.get(0))?)
        })
    }
}

fn task_in(c: &Connection, id: &str) -> Result<Option<TaskRecord>> {
    let mut st = c.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))?;
    let mut rows = st.query(params![id])?;
    match rows.next()? {
        Some(r) => Ok(Some(task_from_row(r)?.1)),
        None => Ok(None),
    }
}

fn attempts_in(c: &Connection, id: &str) -> Result<Vec<Attempt>> {
    let mut st = c.prepare_cached(ATTEMPTS_SQL)?;
    let mut rows = st.query(params![id])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        out.push(attempt_from_row(r)?);
    }
    Ok(out)
}

fn poisoned() -> Error {
    Error::Store("the quick-read connection list was poisoned by a panic".into())
}
