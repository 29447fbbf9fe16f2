//! Checkpoints on a thread of their own.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses
//! `wal_autocheckpoint`: the writer copies every page of the WAL back to
//! the database file and syncs both before it answers anyone, and a
//! profile of `bench noop` had 7 % of the writer's time there. Here the
//! writer's connection gets a WAL hook instead (which turns the automatic
//! checkpoint off) and, once the WAL holds an interval's worth of frames,
//! wakes a thread with a connection of its own that runs `PASSIVE`
//! checkpoints beside the writer: readers and the writer go on meanwhile.
//!
//! A checkpoint beside a busy writer rarely copies the very last frames
//! (the writer commits more while it runs), and SQLite starts the WAL from
//! the beginning again only at a write transaction that finds every frame
//! copied. So when the thread reports that it has caught up to within a
//! few frames, the writer itself runs one more `PASSIVE` checkpoint after
//! its commit: it copies only those few frames, and the next write
//! restarts the log. Should the thread be gone, the writer checkpoints as
//! SQLite would have; should the WAL grow far past the interval anyway
//! (the thread cannot keep up), the writer checkpoints at once too.

use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use rusqlite::Connection;

use crate::config::Durability;

thread_local! {
    /// Frames in the WAL after the last commit of this thread's connection
    /// (set by [`record_frames`], SQLite calls it on the committing thread).
    static WAL_FRAMES: Cell<i32> = const { Cell::new(0) };
}

fn record_frames(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(frames);
    Ok(())
}

/// Times the interval from which the writer checkpoints by itself.
const OVERFLOW: i32 = 3;
/// Passes the thread runs for one wake-up while the writer adds frames.
const MAX_PASSES: u32 = 8;
/// Frames still to copy at which the thread leaves the rest to the writer.
const CAUGHT_UP: i32 = 256;

/// What the thread is doing, as the writer sees it.
const IDLE: u8 = 0;
const RUNNING: u8 = 1;
/// The WAL is copied to within [`CAUGHT_UP`] frames: the writer finishes.
const FINISH: u8 = 2;

/// The writer's side: decides after each commit whether a checkpoint is due
/// and where it runs.
pub(super) struct Checkpoints {
    /// Frames per checkpoint (`wal_autocheckpoint`).
    interval: i32,
    wake: Option<SyncSender<()>>,
    /// [`IDLE`], [`RUNNING`] or [`FINISH`].
    state: Arc<AtomicU8>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpoints {
    /// Starts the checkpoint thread for the writer's connection `writer`.
    /// Without automatic checkpoints (`wal_autocheckpoint = 0`), or if the
    /// thread's connection cannot be opened, the writer's connection is
    /// left as it is: SQLite checkpoints in its commits.
    pub(super) fn start(writer: &Connection, db: &Path, durability: Durability) -> Self {
        let interval: i32 = writer
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap_or(0);
        let state = Arc::new(AtomicU8::new(IDLE));
        let off = Checkpoints {
            interval,
            wake: None,
            state: state.clone(),
            thread: None,
        };
        if interval <= 0 {
            return off;
        }
        let conn = match checkpoint_connection(db, durability) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot open a connection for checkpoints; the writer checkpoints");
                return off;
            }
        };
        let (tx, rx) = sync_channel(1);
        let shared = state.clone();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || run(conn, rx, shared));
        match thread {
            Ok(handle) => {
                WAL_FRAMES.set(0);
                writer.wal_hook(Some(record_frames));
                Checkpoints {
                    interval,
                    wake: Some(tx),
                    state,
                    thread: Some(handle),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the checkpoint thread; the writer checkpoints");
                off
            }
        }
    }

    /// Called by the writer after each commit.
    pub(super) fn after_commit(&mut self, writer: &Connection) {
        let Some(wake) = &self.wake else {
            return;
        };
        let frames = WAL_FRAMES.get();
        if frames < self.interval {
            return;
        }
        let state = self.state.load(Ordering::Acquire);
        let overflow = frames >= self.interval.saturating_mul(OVERFLOW);
        if state == FINISH || (state == RUNNING && overflow) {
            if state == FINISH {
                self.state.store(IDLE, Ordering::Release);
            }
            if checkpoint(writer).is_ok() {
                WAL_FRAMES.set(0);
            }
            return;
        }
        if state == RUNNING {
            return;
        }
        self.state.store(RUNNING, Ordering::Release);
        match wake.try_send(()) {
            Ok(()) | Err(TrySendError::Full(())) => {}
            Err(TrySendError::Disconnected(())) => {
                tracing::warn!("the checkpoint thread stopped; the writer checkpoints");
                self.stop();
                writer.wal_hook(None);
                let _ =
                    writer.execute_batch(&format!("PRAGMA wal_autocheckpoint = {}", self.interval));
                let _ = checkpoint(writer);
            }
        }
    }

    /// Stops the thread and waits for the checkpoint it may be running.
    pub(super) fn stop(&mut self) {
        self.wake = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        self.stop();
    }
}

fn checkpoint_connection(db: &Path, durability: Durability) -> rusqlite::Result<Connection> {
    use rusqlite::OpenFlags;
    let conn = Connection::open_with_flags(
        db,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    // A checkpoint syncs the WAL before it copies and the database after,
    // with this connection's setting, as the writer's own would.
    conn.execute_batch(match durability {
        Durability::Durable => "PRAGMA synchronous = FULL; PRAGMA cache_size = -2000;",
        Durability::Fast => "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -2000;",
    })?;
    Ok(conn)
}

/// `PRAGMA wal_checkpoint(PASSIVE)`: (frames in the WAL, frames copied).
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i32, i32)> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

fn run(conn: Connection, wake: Receiver<()>, state: Arc<AtomicU8>) {
    while wake.recv().is_ok() {
        let mut next = IDLE;
        for _ in 0..MAX_PASSES {
            match checkpoint(&conn) {
                // -1: busy (another checkpoint runs) or not in WAL mode.
                Ok((log, _)) if log < 0 => break,
                Ok((log, copied)) if log - copied <= CAUGHT_UP => {
                    next = FINISH;
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "checkpoint pass failed; the next wake-up tries again");
                    break;
                }
            }
        }
        // IDLE: the writer wakes this thread again at its next commit.
        state.store(next, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(db: &Path) -> Connection {
        let conn = Connection::open(db).unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        conn.execute_batch(
            "PRAGMA synchronous = NORMAL; PRAGMA wal_autocheckpoint = 500; \
             CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .unwrap();
        conn
    }

    fn wal_frames(db: &Path) -> i32 {
        // A connection of its own: the count SQLite reports for the log.
        let c = Connection::open(db).unwrap();
        c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
            .unwrap()
    }

    /// The thread copies the WAL back, the writer finishes it, and the log
    /// starts over: a busy writer's WAL stays near one interval instead of
    /// growing, and every row is in the database.
    #[test]
    fn checkpoints_beside_the_writer_keep_the_wal_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let conn = open(&db);
        let mut cp = Checkpoints::start(&conn, &db, Durability::Fast);
        assert!(cp.wake.is_some(), "the thread started");
        let blob = vec![7u8; 3000];
        let (mut max_frames, mut last, mut restarts) = (0, 0, 0);
        // Commits of 20 rows (about 20 frames), a moment apart, as a
        // writer's batches come.
        // Until the log has started over 20 times, or 5,000 commits (about
        // 100,000 frames) if it does not: on an idle machine that takes
        // about 600 commits and the log never exceeds ~840 frames; under a
        // parallel test run the thread's syncs take longer, so it takes
        // more commits, and the log grows further between restarts.
        let mut commits = 0;
        while restarts < 20 && commits < 5_000 {
            conn.execute_batch("BEGIN").unwrap();
            for _ in 0..20 {
                conn.execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                    .unwrap();
            }
            conn.execute_batch("COMMIT").unwrap();
            commits += 1;
            let frames = WAL_FRAMES.get();
            max_frames = max_frames.max(frames);
            if frames < last {
                restarts += 1;
            }
            last = frames;
            cp.after_commit(&conn);
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        assert_eq!(restarts, 20, "the WAL started over {restarts} times");
        // A checkpoint stuck in a slow sync lets the log grow meanwhile
        // (the writer does not wait for it): under a parallel test run it
        // was seen at 14,416 frames. 40 intervals is far more than an idle
        // machine needs (~840) and far less than the writes (~100,000
        // frames if the log never started over).
        assert!(max_frames < 500 * 40, "the WAL reached {max_frames} frames");
        cp.stop();
        let n: i64 = conn
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, commits * 20);
        drop(conn);
        let check: String = Connection::open(&db)
            .unwrap()
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }

    /// The writer no longer checkpoints in its commits once the thread runs.
    #[test]
    fn the_writer_commits_without_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let conn = open(&db);
        let mut cp = Checkpoints::start(&conn, &db, Durability::Fast);
        // Stop the thread but keep the hook: nothing checkpoints now.
        cp.wake = None;
        if let Some(t) = cp.thread.take() {
            t.join().unwrap();
        }
        let blob = vec![7u8; 3000];
        for _ in 0..1_500 {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                .unwrap();
        }
        assert!(wal_frames(&db) >= 1_500, "a commit checkpointed");
    }

    /// If the thread is gone, the writer goes back to checkpointing itself.
    #[test]
    fn without_the_thread_the_writer_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let conn = open(&db);
        let mut cp = Checkpoints::start(&conn, &db, Durability::Fast);
        // Replace the sender by one whose receiver is gone.
        let (tx, rx) = sync_channel(1);
        drop(rx);
        cp.wake = Some(tx);
        let blob = vec![7u8; 3000];
        for _ in 0..2_000 {
            conn.execute("INSERT INTO t (v) VALUES (?1)", [&blob])
                .unwrap();
            cp.after_commit(&conn);
        }
        assert!(cp.wake.is_none(), "the writer noticed");
        let auto: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(auto, 500);
        assert!(wal_frames(&db) < 1_000);
    }
}
