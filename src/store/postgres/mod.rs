//! The PostgreSQL store: several nodes share one queue.
//!
//! Each node runs the same design as SQLite's writer (a task commits
//! everything pending together), with a few writer tasks instead of one so
//! that a batch is built while the previous one commits, on a connection
//! pool shared with reads, and safe against the other writers, on this node
//! or others: see [`writer`]. Other nodes hear of committed changes through
//! `LISTEN/NOTIFY` ([`notify`]); the engine's polling covers what a lost
//! notification would have said.
//!
//! History search uses PostgreSQL full-text search and pg_trgm
//! ([`history`]), ranked by the same code as SQLite's.

mod history;
mod notify;
mod read;
mod writer;

pub use history::explain_records_write;
pub use writer::explain_finish;

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::*;
use crate::error::Error;
use writer::Op;

/// Embedded migrations (`migrations/postgres`), kept in step with SQLite's.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Writer tasks per node (see [`writer::run`]).
const WRITERS: u32 = 4;

/// How long a node waits for a connection before an operation fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handle to an open PostgreSQL store. Clones are shallow.
#[derive(Clone)]
pub struct PgStore {
    ops: mpsc::Sender<Op>,
    pool: PgPool,
    events: broadcast::Sender<TaskEvent>,
    workflow_events: broadcast::Sender<WorkflowEvent>,
    remote: broadcast::Sender<()>,
    listener: std::sync::Arc<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// Whether a URL names a PostgreSQL database.
pub fn is_postgres_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("postgres://") || lower.starts_with("postgresql://")
}

/// A URL with its password hidden, for messages.
pub fn redacted(url: &str) -> String {
    match url.parse::<reqwest::Url>() {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => url.to_string(),
    }
}

/// Whether a failed batch lost a race with another node (deadlock,
/// serialisation failure, a concurrent insert of the same idempotency key)
/// and should simply be applied again.
fn retryable(e: &Error) -> bool {
    let Error::Store(msg) = e else {
        return false;
    };
    msg.contains("SQLSTATE 40P01")
        || msg.contains("SQLSTATE 40001")
        || (msg.contains("SQLSTATE 23505")
            && (msg.contains("tasks_idempotency") || msg.contains("workflows_idempotency")))
}

impl PgStore {
    /// Connects, runs migrations (sqlx holds an advisory lock while it
    /// does, so nodes starting together migrate once), and starts this
    /// node's writer and listener.
    pub async fn open(url: &str, connections: u32) -> Result<Self> {
        let opts: PgConnectOptions = url.parse().map_err(|e| {
            Error::invalid(
                "storage.database_url",
                format!("is not a valid PostgreSQL URL: {e}"),
            )
        })?;
        Self::open_with(opts, connections).await
    }

    /// Like [`PgStore::open`], with connection options built in code
    /// (e.g. a `search_path` added to the URL's own options).
    pub async fn open_with(opts: PgConnectOptions, connections: u32) -> Result<Self> {
        // Named in messages without the password.
        let url = format!(
            "postgres://{}@{}:{}/{}",
            opts.get_username(),
            opts.get_host(),
            opts.get_port(),
            opts.get_database().unwrap_or_default()
        );
        let pool = PgPoolOptions::new()
            // Each writer holds one connection per batch, the listener one.
            .max_connections(connections.max(1) + WRITERS + 1)
            .min_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(opts)
            .await
            .map_err(|e| Error::Store(format!("cannot connect to the database {url}: {e}")))?;
        MIGRATOR.run(&pool).await?;
        let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()")
            .fetch_one(&pool)
            .await?;
        let channel = notify::channel(schema.as_deref().unwrap_or("public"));
        let (events, _) = broadcast::channel(8192);
        let (workflow_events, _) = broadcast::channel(1024);
        let (remote, _) = broadcast::channel(64);
        let node = std::sync::Arc::new(writer::Node {
            id: format!("n-{}", uuid::Uuid::now_v7()),
            channel,
            pending_records: Default::default(),
            writing_records: Default::default(),
        });
        let (tx, rx) = mpsc::channel(16_384);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        let announce = std::sync::Arc::new(writer::Announce {
            tasks: events.clone(),
            workflows: workflow_events.clone(),
        });
        for _ in 0..WRITERS {
            tokio::spawn(writer::run(
                pool.clone(),
                rx.clone(),
                announce.clone(),
                node.clone(),
            ));
        }
        let listener = tokio::spawn(listen(
            pool.clone(),
            node.id.clone(),
            node.channel.clone(),
            events.clone(),
            workflow_events.clone(),
            remote.clone(),
        ));
        Ok(PgStore {
            ops: tx,
            pool,
            events,
            workflow_events,
            remote,
            listener: std::sync::Arc::new(listener),
        })
    }

    /// The connection pool, for diagnostics and benchmarks.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.ops
            .send(make(tx))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Stops the listener and closes the pool after the writer drained.
    pub async fn close(&self) {
        let _ = self.call(|reply| Op::Close { reply }).await;
        // Leave no records pending (another node or the next reader would
        // write them otherwise).
        if let Err(e) = history::write_pending_records_now(&self.pool, true).await {
            tracing::warn!(error = %e, "writing interaction records at close failed");
        }
        self.listener.abort();
        self.pool.close().await;
    }
}

/// Re-broadcasts the events other nodes commit, and wakes this node's
/// engine. Reconnects after losing the database; each (re)connection also
/// wakes the engine, since notifications sent meanwhile are lost.
async fn listen(
    pool: PgPool,
    node: String,
    channel: String,
    tasks: broadcast::Sender<TaskEvent>,
    workflows: broadcast::Sender<WorkflowEvent>,
    remote: broadcast::Sender<()>,
) {
    let mut delay = Duration::from_millis(100);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other nodes' changes; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if let Err(e) = listener.listen(&channel).await {
            tracing::warn!(error = %e, "LISTEN failed; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
            continue;
        }
        delay = Duration::from_millis(100);
        let _ = remote.send(());
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    let Ok(p) = serde_json::from_str::<notify::Payload>(n.payload()) else {
                        continue;
                    };
                    if p.node == node {
                        continue;
                    }
                    let work = p
                        .tasks
                        .iter()
                        .any(|e| matches!(e.status, TaskStatus::Queued | TaskStatus::Retrying));
                    for e in p.tasks {
                        let _ = tasks.send(e);
                    }
                    for e in p.workflows {
                        let _ = workflows.send(e);
                    }
                    if work {
                        let _ = remote.send(());
                    }
                }
                // The connection dropped; the listener reconnects on the next call.
                Ok(None) => {
                    tracing::warn!("lost the notification connection; reconnecting");
                    let _ = remote.send(());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "notification connection failed; reconnecting");
                    tokio::time::sleep(delay).await;
                    break;
                }
            }
        }
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

#[async_trait]
impl Store for PgStore {
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
        read::schedule(&self.pool, id).await
    }

    async fn dependencies(&self, id: &str) -> Result<Vec<DependencyEdge>> {
        read::dependencies(&self.pool, id).await
    }

    async fn workflow(&self, id: &str) -> Result<Option<WorkflowRecord>> {
        read::workflow(&self.pool, id).await
    }

    async fn workflow_by_key(&self, key: &str) -> Result<Option<WorkflowRecord>> {
        read::workflow_by_key(&self.pool, key).await
    }

    async fn workflow_detail(&self, id: &str) -> Result<Option<WorkflowDetail>> {
        read::workflow_detail(&self.pool, id).await
    }

    async fn list_workflows(&self, f: &WorkflowFilter) -> Result<Vec<(i64, WorkflowRecord)>> {
        read::list_workflows(&self.pool, f).await
    }

    async fn schedule(&self, id: &str) -> Result<Option<ScheduleRecord>> {
        read::schedule(&self.pool, id).await
    }

    async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        read::list_schedules(&self.pool).await
    }

    async fn due_schedules(&self, now: i64) -> Result<Vec<ScheduleRecord>> {
        read::due_schedules(&self.pool, now).await
    }

    async fn next_schedule_at(&self) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT MIN(next_fire_at) FROM schedules WHERE paused = 0 AND next_fire_at IS NOT NULL",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>> {
        read::get(&self.pool, id).await
    }

    async fn list(&self, filter: &TaskFilter) -> Result<Vec<(i64, TaskRecord)>> {
        read::list(&self.pool, filter).await
    }

    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>> {
        read::attempts(&self.pool, id).await
    }

    async fn task_with_attempts(&self, id: &str) -> Result<Option<(TaskRecord, Vec<Attempt>)>> {
        read::task_with_attempts(&self.pool, id).await
    }

    async fn logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>> {
        read::logs(&self.pool, id, attempt).await
    }

    async fn audit_events(&self, task_id: Option<&str>, limit: usize) -> Result<Vec<AuditEvent>> {
        read::audit_events(&self.pool, task_id, limit).await
    }

    async fn events_after(
        &self,
        after: i64,
        workflow_id: Option<&str>,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        read::events_after(&self.pool, after, workflow_id, project, limit).await
    }

    async fn last_event_seq(&self) -> Result<i64> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM audit_events")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    async fn verify_audit(&self) -> Result<AuditReport> {
        read::verify_audit(&self.pool).await
    }

    async fn counts(&self) -> Result<StatusCounts> {
        read::counts(&self.pool).await
    }

    async fn stats(&self, now: i64) -> Result<QueueStats> {
        read::stats(&self.pool, now).await
    }

    async fn runnable_count(&self, req: &ClaimRequest) -> Result<u64> {
        read::runnable_count(&self.pool, req).await
    }

    async fn next_run_at(&self, now: i64) -> Result<Option<i64>> {
        read::next_run_at(&self.pool, now).await
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
        let row: Option<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens WHERE hash = $1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(token_from))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows: Vec<(String, String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT id, name, role, created_at, revoked_at FROM api_tokens ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(token_from).collect())
    }

    async fn tokens_exist(&self) -> Result<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM api_tokens WHERE revoked_at IS NULL")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    async fn workers_with_leases(&self, host: &str) -> Result<Vec<WorkerInfo>> {
        read::workers_with_leases(&self.pool, host).await
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

    fn subscribe_remote(&self) -> Option<broadcast::Receiver<()>> {
        Some(self.remote.subscribe())
    }
}

/// The claim query the writer runs for `req` (`$1` = now, `$2` = limit,
/// then [`claim_binds`]).
pub fn claim_sql(req: &ClaimRequest) -> String {
    writer::claim_sql(req)
}

/// The values bound from `$3` on in [`claim_sql`].
pub fn claim_binds(req: &ClaimRequest) -> Vec<String> {
    writer::claim_binds(req)
}
