//! Keeping the WAL file allocated ahead of the writer.
//!
//! A durable store syncs the WAL after every commit (`fdatasync`, see
//! `sync.rs`).
//! While the WAL file grows, that sync also has to journal the file's new
//! size and blocks, which on the disks measured here doubles its cost
//! (0.55–0.65 ms appending against 0.27–0.32 ms overwriting, see
//! docs/PERFORMANCE.md). SQLite overwrites its WAL from the start after a
//! checkpoint and never shrinks it while the database is open, so a busy
//! store reaches the cheap case after its first checkpoint (about 40 MB of
//! WAL). [`WalAhead`] gets there from the start: once a store has written a
//! few megabytes of WAL since it opened, its writer fills the file with
//! zeros up to the size a full checkpoint interval needs, once.
//!
//! Zeros are not a valid WAL frame (the salt and checksum do not match), so
//! SQLite reads them as the end of the log. The zeros are written under the
//! WAL's write lock (`BEGIN IMMEDIATE`), so no writer of any process appends
//! frames at the same offsets meanwhile; readers and checkpoints only read
//! frames below the last commit.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;

use crate::config::Durability;

/// WAL size (bytes) from which a store counts as busy.
const BUSY_FROM: u64 = 4 << 20;
/// How often (in commits) the writer looks at the WAL's size.
const CHECK_EVERY: u32 = 64;
/// Frames beyond the checkpoint interval to allow for: the commits made
/// while the checkpoint thread copies the interval back (see
/// `checkpoint.rs`), the commit that crosses it, a checkpoint held back by
/// a reader for a moment.
const SLACK_FRAMES: u64 = 6_000;
/// Size of the WAL header and of a frame's header.
const WAL_HEADER: u64 = 32;
const FRAME_HEADER: u64 = 24;

/// Pre-sizes the WAL once per writer, when the store is busy.
pub(super) struct WalAhead {
    wal: PathBuf,
    /// Bytes the WAL should have: `(wal_autocheckpoint + slack)` frames.
    target: u64,
    commits: u32,
    done: bool,
}

impl WalAhead {
    /// `None` when there is nothing to gain: `fast` durability does not
    /// sync per commit, and without automatic checkpoints there is no
    /// size to aim for.
    pub(super) fn new(conn: &Connection, db: &Path, durability: Durability) -> Option<Self> {
        if durability != Durability::Durable {
            return None;
        }
        let page: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0)).ok()?;
        let interval: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .ok()?;
        if page <= 0 || interval <= 0 {
            return None;
        }
        Some(WalAhead {
            wal: super::sync::wal_path(db),
            target: WAL_HEADER + (interval as u64 + SLACK_FRAMES) * (page as u64 + FRAME_HEADER),
            commits: 0,
            done: false,
        })
    }

    /// Called after each commit; cheap unless the WAL is due to be sized.
    pub(super) fn after_commit(&mut self, conn: &Connection) {
        if self.done {
            return;
        }
        self.commits = self.commits.wrapping_add(1);
        if !self.commits.is_multiple_of(CHECK_EVERY) {
            return;
        }
        let Ok(meta) = std::fs::metadata(&self.wal) else {
            return;
        };
        if meta.len() < BUSY_FROM {
            return;
        }
        self.done = true;
        if meta.len() >= self.target {
            return;
        }
        let started = std::time::Instant::now();
        match self.extend(conn) {
            Ok((from, to)) => tracing::debug!(
                wal = %self.wal.display(),
                from,
                to,
                millis = started.elapsed().as_millis() as u64,
                "WAL pre-sized"
            ),
            // Only speed is lost: SQLite grows the file as it always does.
            Err(e) => {
                tracing::warn!(wal = %self.wal.display(), error = %e, "cannot pre-size the WAL")
            }
        }
    }

    /// Appends zeros up to the target size and syncs them, holding the
    /// WAL's write lock. Returns the size before and after.
    fn extend(&self, conn: &Connection) -> crate::error::Result<(u64, u64)> {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let zeroed = self.zero_fill();
        // Nothing was written through SQLite; this only releases the lock.
        // The writer's next batch begins a transaction of its own, so the
        // connection must not be left inside this one.
        if let Err(e) = conn.execute_batch("COMMIT") {
            if !conn.is_autocommit() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            return Err(e.into());
        }
        Ok(zeroed?)
    }

    fn zero_fill(&self) -> std::io::Result<(u64, u64)> {
        // Never create the file: SQLite owns its existence.
        let file = std::fs::OpenOptions::new().write(true).open(&self.wal)?;
        let from = file.metadata()?.len();
        if from >= self.target {
            return Ok((from, from));
        }
        let zeros = vec![0u8; 1 << 20];
        let mut at = from;
        while at < self.target {
            let n = ((self.target - at) as usize).min(zeros.len());
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_data()?;
        Ok((from, at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Connection {
        let conn = Connection::open(dir.join("t.db")).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 2000; \
             CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .unwrap();
        conn
    }

    /// The zeros are read as the end of the log: every committed row is
    /// there after the writer's connection closed abruptly and another one
    /// recovered the WAL, and writing goes on past them.
    #[test]
    fn a_pre_sized_wal_keeps_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path());
        let mut ahead = WalAhead::new(&conn, &dir.path().join("t.db"), Durability::Durable)
            .expect("durable stores pre-size");
        assert_eq!(ahead.target, 32 + 8_000 * (4096 + 24));
        let blob = vec![7u8; 3000];
        let mut rows = 0;
        while !ahead.done {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                .unwrap();
            rows += 1;
            ahead.after_commit(&conn);
            assert!(rows < 100_000, "the WAL never reached {BUSY_FROM} bytes");
        }
        let wal = std::fs::metadata(&ahead.wal).unwrap().len();
        assert!(
            wal >= ahead.target,
            "WAL is {wal} bytes, wanted {}",
            ahead.target
        );
        // More commits after the zeros, across a checkpoint and WAL restart.
        for _ in 0..3_000 {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                .unwrap();
            rows += 1;
        }
        // Keep the WAL as it is (no checkpoint at close) and recover it from
        // a fresh connection, as after a crash.
        let copy = tempfile::tempdir().unwrap();
        std::fs::copy(dir.path().join("t.db"), copy.path().join("t.db")).unwrap();
        std::fs::copy(&ahead.wal, copy.path().join("t.db-wal")).unwrap();
        drop(conn);
        let other = Connection::open(copy.path().join("t.db")).unwrap();
        let n: i64 = other
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, rows);
        let check: String = other
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    #[test]
    fn fast_durability_does_not_pre_size() {
        let dir = tempfile::tempdir().unwrap();
        let conn = open(dir.path());
        assert!(WalAhead::new(&conn, &dir.path().join("t.db"), Durability::Fast).is_none());
    }
}
