//! The embedded SQLite store.
//!
//! One writer thread owns the only write connection and commits everything
//! that is pending together (group commit), so 64 concurrent submitters pay
//! for one fsync, not 64. Reads go through a separate pool. WAL is required
//! and verified at open. `storage.durability: durable` (the default) syncs
//! the WAL before any write is answered, on a thread beside the writer
//! (`sync.rs`; SQLite in each commit, `synchronous=FULL`, if that thread
//! cannot start); `fast` is `synchronous=NORMAL`. Checkpoints run on a
//! thread of their own (`checkpoint.rs`).

mod checkpoint;
mod floor;
mod history;
mod quick;
mod read;
mod sync;
mod wal;
mod writer;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{ConnectOptions, SqlitePool};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::*;
use crate::config::Durability;
use crate::error::Error;
use writer::Op;

pub use floor::{FloorTask, FloorTimes, storage_floor};

/// Embedded migrations (the `migrations/` directory).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Handle to an open SQLite store. Clones are shallow.
#[derive(Clone)]
pub struct SqliteStore {
    ops: mpsc::Sender<Op>,
    read: SqlitePool,
    quick: std::sync::Arc<quick::QuickReads>,
    events: broadcast::Sender<TaskEvent>,
    workflow_events: broadcast::Sender<WorkflowEvent>,
    path: PathBuf,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

fn options(path: &Path, durability: Durability) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(match durability {
            Durability::Durable => SqliteSynchronous::Full,
            Durability::Fast => SqliteSynchronous::Normal,
        })
        .busy_timeout(BUSY_TIMEOUT)
        .foreign_keys(false)
        .pragma("temp_store", "memory")
        .pragma("cache_size", "-16000")
        // Checkpoint (and restart the WAL, which costs a sync) every ~40 MB
        // instead of every 4 MB: hot pages rewritten by every commit are
        // then copied back to the database once, not ten times.
        .pragma("wal_autocheckpoint", "10000")
        .statement_cache_capacity(256)
        .disable_statement_logging()
}

/// The writer's connection, with the same settings as [`options`].
fn writer_connection(path: &Path, durability: Durability) -> Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| Error::Store(format!("cannot open the database {}: {e}", path.display())))?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL is verified here, once, on the connection that writes.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Store(format!(
            "{} is in journal_mode={mode}, not WAL; the file system may not support it",
            path.display()
        )));
    }
    conn.execute_batch(match durability {
        Durability::Durable => "PRAGMA synchronous = FULL;",
        Durability::Fast => "PRAGMA synchronous = NORMAL;",
    })?;
    // A 4 MB page cache: the writer touches the right edges of a few
    // B-trees and their upper levels, which fit in it many times over.
    // 16 MB made `bench noop` and `bench submit` no faster, even over a
    // million finished tasks, and raised the peak RSS by 12-15 MB; SQLite
    // also walks the whole cache's hash table at most commits (see
    // docs/PERFORMANCE.md, "The writer's page cache").
    conn.execute_batch(
        "PRAGMA foreign_keys = OFF; PRAGMA temp_store = MEMORY; PRAGMA cache_size = -4000; \
         PRAGMA wal_autocheckpoint = 10000;",
    )?;
    // Plans never depend on bound values (the claim names its index). Without
    // this, SQLite re-prepares a cached statement whenever a value that the
    // planner looked at changes, e.g. the claim's `LIMIT ?`: that was 7 % of
    // the writer's time while running commands.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (creating if needed) the database file, runs migrations,
    /// verifies WAL, and starts the writer.
    pub async fn open(path: &Path, durability: Durability, read_connections: u32) -> Result<Self> {
        let text = path.to_string_lossy();
        let stripped = PathBuf::from(
            text.trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:"),
        );
        let path = stripped.as_path();
        if let Some(dir) = path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Store(format!(
                    "cannot create the data directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let opts = options(path, durability);
        // Processes opening a new file at once must not both migrate it:
        // SQLite has no advisory lock for sqlx's migrator, so take a file
        // lock. Taken before the first connection: two connections that
        // both switch a new file to WAL can deadlock on the upgrade of
        // their locks, and SQLite answers one of them "database is locked"
        // at once instead of waiting.
        let lock = migration_lock(path).await?;
        let mut conn = opts.connect().await.map_err(|e| {
            Error::Store(format!("cannot open the database {}: {e}", path.display()))
        })?;
        let migrated = MIGRATOR.run(&mut conn).await;
        drop(lock);
        migrated?;
        let read = SqlitePoolOptions::new()
            .max_connections(read_connections)
            .min_connections(1)
            .connect_with(
                SqliteConnectOptions::from_str("sqlite://")
                    .map_err(Error::from)?
                    .filename(path)
                    .read_only(true)
                    .busy_timeout(BUSY_TIMEOUT)
                    .pragma("cache_size", "-8000")
                    .statement_cache_capacity(128)
                    .disable_statement_logging(),
            )
            .await?;
        let (events, _) = broadcast::channel(8192);
        let (workflow_events, _) = broadcast::channel(1024);
        // The writer has a synchronous connection of its own, on its own
        // thread; the migration connection is done.
        let _ = sqlx::Connection::close(conn).await;
        let writer_conn = writer_connection(path, durability)?;
        let wal_ahead = wal::WalAhead::new(&writer_conn, path, durability);
        // After WalAhead, which reads the checkpoint interval this turns off.
        let checkpoints = checkpoint::Checkpoints::start(&writer_conn, path, durability);
        let (tx, rx) = mpsc::channel(16_384);
        let announce = std::sync::Arc::new(writer::Announce {
            tasks: events.clone(),
            workflows: workflow_events.clone(),
        });
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(writer::deliver_completed(done_rx, announce.clone()));
        // A durable store syncs its WAL beside the writer (see `sync.rs`);
        // if that thread cannot start, SQLite syncs in each commit.
        let durable = match durability {
            Durability::Fast => writer::Durable::InCommit,
            Durability::Durable => {
                let (done, announce) = (done_tx.clone(), announce.clone());
                match sync::Syncer::start(path, move |c| writer::hand_over(&done, &announce, c)) {
                    Ok(s) => {
                        writer_conn.execute_batch("PRAGMA synchronous = NORMAL")?;
                        writer::Durable::Beside(s, path.to_path_buf())
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot start the WAL sync thread; SQLite syncs in each commit");
                        writer::Durable::InCommit
                    }
                }
            }
        };
        std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                writer::run(
                    writer_conn,
                    wal_ahead,
                    checkpoints,
                    durable,
                    rx,
                    done_tx,
                    announce,
                )
            })
            .map_err(|e| Error::Store(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            ops: tx,
            read,
            quick: std::sync::Arc::new(quick::QuickReads::new(path)),
            events,
            workflow_events,
            path: path.to_path_buf(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The read pool, for diagnostics and benchmarks.
    pub fn read_pool(&self) -> &SqlitePool {
        &self.read
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Closes the pools after the writer drained (used at shutdown).
    pub async fn close(&self) {
        let _ = self.call(|reply| Op::Close { reply }).await;
        self.read.close().await;
    }
}

fn token_from(
    (id, name, role, created, revoked): (String, String, String, i64, Option<i64>),
) -> TokenRecord {
    TokenRecord {
        id,
        name,
        role: Role::parse(&role).unwrap_or(Role::Viewer),
        created_at: crate::model::Timestamp(created),
        revoked_at: revoked.map(crate::model::Timestamp),
    }
}

/// An exclusive `flock` on `<db>.migrate-lock`, held while migrating.
async fn migration_lock(db: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let mut name = db.as_os_str().to_owned();
    name.push(".migrate-lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(PathBuf::from(name))
        .map_err(|e| Error::Store(format!("cannot create the migration lock: {e}")))?;
    tokio::task::spawn_blocking(move || {
        // SAFETY: flock on a file descriptor this closure owns.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(Error::Store(format!(
                "cannot lock the database for migration: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(file)
    })
    .await
    .map_err(|e| Error::Store(format!("migration lock task failed: {e}")))?
}

/// Opens a one-off connection with the store's settings (used by `audit verify`, benches).
pub async fn connect_raw(path: &Path) -> Result<sqlx::SqliteConnection> {
    let c = options(path, Durability::Durable).connect().await?;
    Ok(c)
}

#[async_trait]
impl Store for SqliteStore {
    async fn submit(&self, sub: NewSubmission) -> Result<Vec<Submitted>> {
        if sub.tasks.is_empty() && sub.workflow.is_none() && sub.schedules.is_empty() {
            return Ok(Vec::new());
        }
        self.call(|reply| Op::Submit {
            sub: Box::new(sub),
            reply,
        })
        .await
    }

    async fn claim(&self, req: ClaimRequest) -> Result<Vec<ClaimedTask>> {
        if !req.asks_for_work() {
            return Ok(Vec::new());
        }
        self.call(|reply| Op::Claim { req, reply }).await
    }

    async fn finish(&self, f: FinishAttempt) -> Result<FinishOutcome> {
        self.call(|reply| Op::Finish {
            f: Box::new(f),
            next: None,
            reply,
        })
        .await
        .map(|(outcome, _)| outcome)
    }

    /// Yes: with a single writer, a claim that comes with the finishes is
    /// one statement more in a batch that commits anyway.
    fn claims_with_finish(&self) -> bool {
        true
    }

    async fn finish_and_claim(
        &self,
        f: FinishAttempt,
        next: ClaimRequest,
    ) -> Result<(FinishOutcome, Vec<ClaimedTask>)> {
        let next = next.asks_for_work().then(|| Box::new(next));
        self.call(|reply| Op::Finish {
            f: Box::new(f),
            next,
            reply,
        })
        .await
    }

    async fn renew_leases(
        &self,
        worker_id: &str,
        task_ids: &[String],
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<String>> {
        let worker_id = worker_id.to_string();
        let task_ids = task_ids.to_vec();
        self.call(|reply| Op::Renew {
            worker_id,
            task_ids,
            now,
            lease_until,
            reply,
        })
        .await
    }

    async fn reclaim(&self, scope: Reclaim, now: i64) -> Result<Vec<TaskEvent>> {
        self.call(|reply| Op::Reclaim { scope, now, reply }).await
    }

    async fn cancel(&self, id: &str, now: i64, reason: Option<String>) -> Result<TaskRecord> {
        let id_owned = id.to_string();
        self.call(|reply| Op::Cancel {
            id: id_owned,
            now,
            reason,
            reply,
        })
        .await?;
        self.get(id).await?.ok_or_else(|| Error::task_not_found(id))
    }

    async fn cancel_workflow(
        &self,
        id: &str,
        now: i64,
        reason: Option<String>,
    ) -> Result<Vec<String>> {
        let id = id.to_string();
        self.call(|reply| Op::CancelWorkflow {
            id,
            now,
            reason,
            reply,
        })
        .await
    }

    async fn approve(&self, id: &str, d: ApprovalDecision, now: i64) -> Result<TaskRecord> {
        let id_owned = id.to_string();
        self.call(|reply| Op::Approve {
            id: id_owned,
            decision: d,
            now,
            reply,
        })
        .await?;
        self.get(id).await?.ok_or_else(|| Error::task_not_found(id))
    }

    async fn retry(&self, id: &str, now: i64) -> Result<TaskRecord> {
        let id_owned = id.to_string();
        self.call(|reply| Op::Retry {
            id: id_owned,
            now,
            reply,
        })
        .await?;
        self.get(id).await?.ok_or_else(|| Error::task_not_found(id))
    }

    async fn heartbeat(
        &self,
        task_id: &str,
        worker_id: &str,
        _now: i64,
        lease_until: i64,
    ) -> Result<()> {
        let task_id = task_id.to_string();
        let worker_id = worker_id.to_string();
        self.call(|reply| Op::Heartbeat {
            task_id,
            worker_id,
            lease_until,
            reply,
        })
        .await
    }

    async fn put_logs(&self, task_id: &str, attempt: u32, logs: Vec<StreamLog>) -> Result<()> {
        let task_id = task_id.to_string();
        self.call(|reply| Op::PutLogs {
            task_id,
            attempt,
            logs,
            reply,
        })
        .await
    }

    async fn fire_schedule(&self, f: FireSchedule) -> Result<bool> {
        self.call(|reply| Op::FireSchedule {
            f: Box::new(f),
            reply,
        })
        .await
    }

    async fn change_schedule(
        &self,
        id: &str,
        change: ScheduleChange,
        now: i64,
    ) -> Result<Option<ScheduleRecord>> {
        let id_owned = id.to_string();
        let exists = self
            .call(|reply| Op::ChangeSchedule {
                id: id_owned,
                change: Box::new(change),
                now,
                reply,
            })
            .await?;
        if !exists {
            return Err(Error::schedule_not_found(id));
        }
        read::schedule(&self.read, id).await
    }

    async fn dependencies(&self, id: &str) -> Result<Vec<DependencyEdge>> {
        read::dependencies(&self.read, id).await
    }

    async fn workflow(&self, id: &str) -> Result<Option<WorkflowRecord>> {
        read::workflow(&self.read, id).await
    }

    async fn workflow_by_key(&self, key: &str) -> Result<Option<WorkflowRecord>> {
        read::workflow_by_key(&self.read, key).await
    }

    async fn workflow_detail(&self, id: &str) -> Result<Option<WorkflowDetail>> {
        read::workflow_detail(&self.read, id).await
    }

    async fn list_workflows(&self, f: &WorkflowFilter) -> Result<Vec<(i64, WorkflowRecord)>> {
        read::list_workflows(&self.read, f).await
    }

    async fn schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        read::schedule(&self.read, id).await
    }

    async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        read::list_schedules(&self.read).await
    }

    async fn due_schedules(&self, now: i64) -> Result<Vec<ScheduleRecord>> {
        read::due_schedules(&self.read, now).await
    }

    async fn next_schedule_at(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_fire_at) FROM schedules WHERE paused = 0 AND next_fire_at IS NOT NULL",
        )
        .fetch_one(&self.read)
        .await?)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>> {
        self.quick.task(id)
    }

    async fn list(&self, filter: &TaskFilter) -> Result<Vec<(i64, TaskRecord)>> {
        read::list(&self.read, filter).await
    }

    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>> {
        self.quick.attempts(id)
    }

    async fn task_with_attempts(&self, id: &str) -> Result<Option<(TaskRecord, Vec<Attempt>)>> {
        self.quick.task_with_attempts(id)
    }

    async fn logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>> {
        read::logs(&self.read, id, attempt).await
    }

    async fn audit_events(&self, task_id: Option<&str>, limit: usize) -> Result<Vec<AuditEvent>> {
        read::audit_events(&self.read, task_id, limit).await
    }

    async fn events_after(
        &self,
        after: i64,
        workflow_id: Option<&str>,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        read::events_after(&self.read, after, workflow_id, project, limit).await
    }

    async fn last_event_seq(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM audit_events")
            .fetch_one(&self.read)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn verify_audit(&self) -> Result<AuditReport> {
        read::verify_audit(&self.read).await
    }

    async fn counts(&self) -> Result<StatusCounts> {
        read::counts(&self.read).await
    }

    async fn stats(&self, now: i64) -> Result<QueueStats> {
        read::stats(&self.read, now).await
    }

    async fn runnable_count(&self, req: &ClaimRequest) -> Result<u64> {
        read::runnable_count(&self.read, req).await
    }

    async fn next_run_at(&self, now: i64) -> Result<Option<i64>> {
        read::next_run_at(&self.read, now).await
    }

    async fn register_worker(&self, w: WorkerInfo) -> Result<()> {
        self.call(|reply| Op::RegisterWorker { w, reply }).await
    }

    async fn create_token(&self, t: TokenRecord, hash: String) -> Result<()> {
        self.call(|reply| Op::Token {
            token: Box::new(t),
            hash,
            revoke: None,
            reply,
        })
        .await
        .map(|_| ())
    }

    async fn revoke_token(&self, id: &str, now: i64) -> Result<bool> {
        let t = TokenRecord {
            id: id.to_string(),
            name: String::new(),
            role: Role::Viewer,
            created_at: crate::model::Timestamp(0),
            revoked_at: None,
        };
        self.call(|reply| Op::Token {
            token: Box::new(t),
            hash: String::new(),
            revoke: Some(now),
            reply,
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        Ok(self.quick.token(hash)?.map(token_from))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at",
        )
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(token_from).collect())
    }

    async fn tokens_exist(&self) -> Result<bool> {
        self.quick.tokens_exist()
    }

    async fn workers_with_leases(&self, host: &str) -> Result<Vec<WorkerInfo>> {
        read::workers_with_leases(&self.read, host).await
    }

    fn history(&self) -> Option<&dyn crate::store::history::HistoryStore> {
        Some(self)
    }

    fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.events.subscribe()
    }

    fn subscribe_workflows(&self) -> broadcast::Receiver<WorkflowEvent> {
        self.workflow_events.subscribe()
    }
}

/// The claim query the writer runs for `req` (`?1` = now, `?2` = limit,
/// then [`claim_binds`]), for benchmarks and plan checks.
pub fn claim_sql(req: &ClaimRequest) -> String {
    writer::claim_sql(req)
}

/// The values bound from `?3` on in [`claim_sql`].
pub fn claim_binds(req: &ClaimRequest) -> Vec<String> {
    writer::claim_binds(req)
}

/// A claim request for the server's own kinds, as the engine sends.
pub fn engine_claim_request() -> ClaimRequest {
    ClaimRequest {
        worker_id: String::new(),
        now: 0,
        lease_until: 0,
        limit: 1,
        server_kinds: true,
        external: None,
        only: None,
    }
}

/// Used by tests and `bench` to confirm the claim query is index-ordered.
pub async fn explain_claim(pool: &SqlitePool) -> Result<Vec<String>> {
    explain_claim_of(pool, &engine_claim_request()).await
}

/// The query plan of the claim `req` sends.
pub async fn explain_claim_of(pool: &SqlitePool, req: &ClaimRequest) -> Result<Vec<String>> {
    let sql = format!("EXPLAIN QUERY PLAN {}", writer::claim_sql(req));
    let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(sqlx::AssertSqlSafe(sql))
        .bind(0i64)
        .bind(1i64);
    for v in writer::claim_binds(req) {
        q = q.bind(v);
    }
    let rows = q.fetch_all(pool).await?;
    Ok(rows.into_iter().map(|r| r.3).collect())
}
