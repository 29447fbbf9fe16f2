//! Durable commits with the sync beside the writer.
//!
//! With `synchronous=FULL` SQLite ends every commit with an `fdatasync` of
//! the WAL, and the writer waits for the disk before it starts on the next
//! batch: at a few hundred commits a second that was a fifth of the
//! writer's time spent idle. A durable store's writer now commits with
//! `synchronous=NORMAL` (SQLite writes the WAL frames and returns) and
//! hands the finished batch to this thread, which syncs the WAL file
//! itself and only then answers the batch's callers and announces its
//! events. Meanwhile the writer already works on the next batch; one sync
//! covers every batch committed before it, so under load several batches
//! share one.
//!
//! What a caller is told is unchanged: no write is answered before it is
//! on disk. The WAL is a log: a commit whose frames survive a power loss
//! implies that every earlier commit's frames did too, and one that does
//! not survive was never answered. What changes is that another
//! connection may read a commit up to one sync before it is durable. Every
//! decision the engine takes on what it read (a claim, a finish) is itself
//! a write of this writer or of another process's, answered only after a
//! sync of the same file, which makes the commits it read durable too.
//! SQLite still syncs the WAL before each checkpoint copies it into the
//! database, so the database file only ever holds durable pages.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender, channel};

use super::writer::Completed;

/// The writer's handle on the sync thread.
pub(super) struct Syncer {
    tx: Option<Sender<Completed>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Syncer {
    /// Starts the thread; `hand_over` answers a batch once it is durable.
    pub(super) fn start(
        db: &Path,
        hand_over: impl Fn(Completed) + Send + 'static,
    ) -> std::io::Result<Self> {
        let wal = wal_path(db);
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("sqlite-sync".into())
            .spawn(move || run(wal, rx, hand_over))?;
        Ok(Syncer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a batch to be answered after the next sync; gives it back
    /// if the thread is gone.
    pub(super) fn push(&self, c: Completed) -> Result<(), Completed> {
        match &self.tx {
            Some(tx) => tx.send(c).map_err(|e| e.0),
            None => Err(c),
        }
    }

    /// Syncs and answers everything queued, then stops the thread.
    pub(super) fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The WAL file, opened at the first sync (SQLite creates it at the first
/// write). The directory is synced then too, so the file's name is as
/// durable as its contents: SQLite would do that at its first sync of a
/// new WAL, which it no longer makes.
struct Wal {
    path: PathBuf,
    file: Option<File>,
}

impl Wal {
    fn sync(&mut self) -> std::io::Result<()> {
        if self.file.is_none() {
            // Never create it: SQLite owns the file's existence.
            let f = std::fs::OpenOptions::new().write(true).open(&self.path)?;
            if let Some(dir) = self.path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                File::open(dir)?.sync_all()?;
            }
            self.file = Some(f);
        }
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }
}

/// The WAL file of the database `db`.
pub(super) fn wal_path(db: &Path) -> PathBuf {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

/// Syncs the WAL of `db` on the calling thread (the writer's, when it
/// closes or when the sync thread is gone). No WAL, nothing to sync.
pub(super) fn sync_now(db: &Path) -> std::io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(wal_path(db)) {
        Ok(f) => f.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Syncs the WAL of `db` for `c` on the calling thread; if that fails, `c`
/// is answered with the error instead.
pub(super) fn sync_here(db: &Path, c: &mut Completed) {
    if c.committed()
        && let Err(e) = sync_now(db)
    {
        c.sync_failed(&e);
    }
}

fn run(path: PathBuf, rx: Receiver<Completed>, hand_over: impl Fn(Completed)) {
    let mut wal = Wal { path, file: None };
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while let Ok(c) = rx.try_recv() {
            group.push(c);
        }
        if group.iter().any(Completed::committed)
            && let Err(e) = wal.sync()
        {
            // The commits are in the log but may not be on disk: their
            // outcome is unknown, and nobody is told they happened.
            tracing::error!(wal = %wal.path.display(), error = %e, "cannot sync the WAL; answering the batches with an error");
            wal.file = None;
            for c in &mut group {
                c.sync_failed(&e);
            }
        }
        for c in group {
            hand_over(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(usize, Option<String>)>>>;

    fn start(db: &Path) -> (Syncer, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let syncer = Syncer::start(db, move |c: Completed| {
            let mut log = log.lock().unwrap();
            let n = log.len();
            log.push((n, c.error().map(str::to_string)));
        })
        .unwrap();
        (syncer, seen)
    }

    /// Every batch is answered, in the order the writer committed them,
    /// and a batch that rolled back keeps its own error.
    #[test]
    fn batches_are_answered_in_order_after_the_sync() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        std::fs::write(dir.path().join("q.db-wal"), b"").unwrap();
        let (mut syncer, seen) = start(&db);
        for i in 0..100 {
            assert!(syncer.push(Completed::empty(i % 10 != 3)).is_ok());
        }
        syncer.stop();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 100);
        for (i, (n, err)) in seen.iter().enumerate() {
            assert_eq!(*n, i);
            assert_eq!(err.is_some(), i % 10 == 3, "batch {i}: {err:?}");
        }
        assert!(syncer.push(Completed::empty(true)).is_err(), "stopped");
    }

    /// When the WAL cannot be synced, nobody is told their write happened.
    #[test]
    fn a_failed_sync_fails_the_batches() {
        let dir = tempfile::tempdir().unwrap();
        // No WAL file: opening it for the sync fails.
        let (mut syncer, seen) = start(&dir.path().join("q.db"));
        assert!(syncer.push(Completed::empty(true)).is_ok());
        syncer.stop();
        let seen = seen.lock().unwrap();
        let err = seen[0].1.as_deref().expect("an error");
        assert!(err.contains("could not be synced to disk"), "{err}");
    }

    #[test]
    fn sync_now_without_a_wal_is_nothing_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        sync_now(&db).unwrap();
        std::fs::write(dir.path().join("q.db-wal"), b"x").unwrap();
        sync_now(&db).unwrap();
    }
}
