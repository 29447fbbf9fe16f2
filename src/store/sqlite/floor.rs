//! The storage floor of `bench submit --batch`: what SQLite alone takes to
//! store the rows of submitted tasks, with everything else done up front.
//!
//! The same statements as the writer (`INSERT_TASK`, `INSERT_AUDIT`) on
//! the same schema, with the writer's connection settings, one
//! transaction per batch; every value (ids, specs, the audit chain's
//! hashes) is computed before the clock starts. Nothing is synced
//! (`synchronous=NORMAL`) and nothing is checkpointed while inserting: the
//! checkpoint that a store must run sooner or later is timed on its own
//! afterwards. No implementation of this schema with these settings
//! (4 KiB pages, the writer's cache), durable or not, stores these rows
//! faster on the same machine.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::params;

use super::writer::{INSERT_AUDIT, INSERT_TASK};
use super::{MIGRATOR, connect_raw, writer_connection};
use crate::config::Durability;
use crate::error::{Error, Result};
use crate::integrity::{EventContent, GENESIS_HASH, event_hash};

/// The task whose copies are stored (its row as the queue stored it).
#[derive(Debug, Clone)]
pub struct FloorTask {
    pub name: String,
    pub kind: String,
    pub priority: i64,
    pub max_attempts: i64,
    pub spec: String,
    pub spec_hash: String,
}

/// What [`storage_floor`] measured.
#[derive(Debug, Clone, Copy)]
pub struct FloorTimes {
    /// The inserts and their commits.
    pub inserts: Duration,
    /// One checkpoint of everything the inserts wrote to the WAL.
    pub checkpoint: Duration,
}

/// Stores `tasks` copies of `task` (each with its `submitted` audit event)
/// into a new database at `path`, `batch` tasks per transaction.
pub async fn storage_floor(
    path: &Path,
    task: &FloorTask,
    tasks: usize,
    batch: usize,
    now: i64,
) -> Result<FloorTimes> {
    let mut conn = connect_raw(path).await?;
    MIGRATOR.run(&mut conn).await?;
    sqlx::Connection::close(conn).await?;
    let path = path.to_path_buf();
    let task = task.clone();
    tokio::task::spawn_blocking(move || insert_all(&path, &task, tasks, batch.max(1), now))
        .await
        .map_err(|e| Error::Store(format!("storage floor task failed: {e}")))?
}

fn insert_all(
    path: &Path,
    task: &FloorTask,
    tasks: usize,
    batch: usize,
    now: i64,
) -> Result<FloorTimes> {
    let conn = writer_connection(path, Durability::Fast)?;
    conn.execute_batch("PRAGMA wal_autocheckpoint = 0")?;
    let ids: Vec<String> = (0..tasks)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let detail = format!("{{\"spec_hash\":\"{}\"}}", task.spec_hash);
    let mut chain = Vec::with_capacity(tasks + 1);
    chain.push(GENESIS_HASH.to_string());
    for (i, id) in ids.iter().enumerate() {
        let hash = event_hash(
            &chain[i],
            &EventContent {
                seq: i as i64 + 1,
                at: now,
                task_id: id,
                kind: "submitted",
                from_status: None,
                to_status: "queued",
                detail: &detail,
            },
        );
        chain.push(hash);
    }
    let start = Instant::now();
    for from in (0..tasks).step_by(batch) {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        let mut insert = conn.prepare_cached(INSERT_TASK)?;
        let mut audit = conn.prepare_cached(INSERT_AUDIT)?;
        for i in from..(from + batch).min(tasks) {
            insert.execute(params![
                ids[i],
                task.name,
                task.kind,
                None::<&str>,
                "[]",
                "queued",
                task.priority,
                task.max_attempts,
                now,
                now,
                None::<&str>,
                task.spec,
                task.spec_hash,
                None::<&str>,
                None::<&str>,
                0i64,
                false
            ])?;
            audit.execute(params![
                i as i64 + 1,
                now,
                ids[i],
                "submitted",
                None::<&str>,
                "queued",
                detail,
                chain[i],
                chain[i + 1]
            ])?;
        }
        conn.execute_batch("COMMIT")?;
    }
    let inserts = start.elapsed();
    let start = Instant::now();
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    let checkpoint = start.elapsed();
    Ok(FloorTimes {
        inserts,
        checkpoint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::sqlite::SqliteStore;

    /// The floor stores what the queue stores: queued tasks the store can
    /// claim, with an audit chain that verifies.
    #[tokio::test]
    async fn the_floor_stores_claimable_tasks_with_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("floor.db");
        let task = FloorTask {
            name: "floor".into(),
            kind: "command".into(),
            priority: 0,
            max_attempts: 3,
            spec: r#"{"argv":["true"],"name":"floor"}"#.into(),
            spec_hash: "ab".repeat(32),
        };
        let t = storage_floor(&db, &task, 250, 100, 1_700_000_000_000)
            .await
            .unwrap();
        assert!(t.inserts > Duration::ZERO);
        let store = SqliteStore::open(&db, Durability::Fast, 2).await.unwrap();
        let report = store.verify_audit().await.unwrap();
        assert!(report.ok, "{report:?}");
        assert_eq!(report.events, 250);
        let stats = store.stats(1_700_000_000_001).await.unwrap();
        assert_eq!(stats.ready, 250);
    }
}
