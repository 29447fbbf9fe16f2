//! Persistence behind one trait, so SQLite (embedded default) and later
//! PostgreSQL are interchangeable under the service.
//!
//! The store applies state transitions it is told about; the decisions
//! (what runs next, retry or give up) belong to the engine. The exception
//! is lease recovery, which must work without the engine that owned the
//! lease, so the store applies the task's own retry policy there.

pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::integrity::{AuditEvent, AuditReport};
use crate::model::{
    Attempt, AttemptStatus, LogChunk, TaskEvent, TaskKind, TaskRecord, TaskResult, TaskStatus,
};

/// A validated, resolved task ready to insert.
#[derive(Debug, Clone)]
pub struct NewTask {
    pub id: String,
    pub name: String,
    pub kind: TaskKind,
    pub project: Option<String>,
    pub tags: Vec<String>,
    pub priority: i64,
    pub max_attempts: u32,
    pub idempotency_key: Option<String>,
    /// Canonical JSON of the resolved spec.
    pub spec_json: String,
    pub spec_hash: String,
    pub now: i64,
}

/// What a submit did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, schemars::JsonSchema)]
pub struct Submitted {
    pub id: String,
    pub name: String,
    /// False when an earlier task with the same idempotency key was returned.
    pub created: bool,
    pub status: TaskStatus,
}

/// A request to claim ready tasks with a lease.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub worker_id: String,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// Claim command tasks.
    pub commands: bool,
    /// Claim external tasks with these names (in-process handlers).
    pub external_names: Vec<String>,
}

/// A task handed to a worker.
#[derive(Debug, Clone)]
pub struct ClaimedTask {
    pub id: String,
    pub name: String,
    pub kind: TaskKind,
    pub priority: i64,
    pub seq: i64,
    /// 1-based number of the attempt this claim starts.
    pub attempt: u32,
    pub max_attempts: u32,
    pub spec_json: String,
    pub spec_hash: String,
    pub started_at: i64,
}

/// Where a task goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Terminal status.
    Done(TaskStatus),
    /// Retry at this time (ms).
    Retry { run_at: i64 },
}

/// A captured output stream.
#[derive(Debug, Clone)]
pub struct StreamLog {
    pub stream: &'static str,
    pub data: Vec<u8>,
    pub dropped_bytes: u64,
}

/// The end of an attempt, reported by the worker that holds the lease.
#[derive(Debug, Clone)]
pub struct FinishAttempt {
    pub task_id: String,
    pub attempt: u32,
    pub worker_id: String,
    pub started_at: i64,
    pub now: i64,
    pub status: AttemptStatus,
    pub error: Option<String>,
    pub result: TaskResult,
    pub logs: Vec<StreamLog>,
    pub next: Next,
}

/// Whether a finish was applied.
#[derive(Debug, Clone, PartialEq)]
pub enum FinishOutcome {
    /// The task moved to its next state.
    Applied(TaskStatus),
    /// The worker no longer held the lease (cancelled, expired, re-claimed);
    /// the attempt was recorded but the task was left as it is.
    Stale(TaskStatus),
}

/// Which running tasks to take back from their workers.
#[derive(Debug, Clone)]
pub enum Reclaim {
    /// Every lease that expired before `now`.
    Expired,
    /// Every lease held by these workers (known dead), expired or not.
    Workers(Vec<String>),
}

/// A filter for listing tasks. Results are newest first.
#[derive(Debug, Clone, Default)]
pub struct TaskFilter {
    pub statuses: Vec<TaskStatus>,
    pub project: Option<String>,
    pub tag: Option<String>,
    pub name: Option<String>,
    pub ids: Vec<String>,
    pub limit: usize,
    /// Only tasks submitted before this cursor (from a previous page).
    pub before_seq: Option<i64>,
}

/// An engine instance, recorded so peers can detect that it died.
#[derive(Debug, Clone)]
pub struct WorkerInfo {
    pub id: String,
    pub host: String,
    pub pid: i64,
    /// Process start time (clock ticks since boot), to tell a reused pid apart.
    pub pid_start: i64,
    pub started_at: i64,
}

/// Counts of tasks by status.
pub type StatusCounts = BTreeMap<TaskStatus, u64>;

/// The persistence contract. Every method is atomic; writes are durable
/// when they return (per `storage.durability`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts tasks as `queued`; a task whose idempotency key exists returns the existing one.
    async fn submit(&self, tasks: Vec<NewTask>) -> Result<Vec<Submitted>>;
    /// Atomically moves up to `limit` ready tasks to `running` under a lease.
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<ClaimedTask>>;
    /// Records an attempt and moves the task on, if the worker still holds its lease.
    async fn finish(&self, f: FinishAttempt) -> Result<FinishOutcome>;
    /// Extends the leases a worker holds; returns the ids it still holds.
    async fn renew_leases(
        &self,
        worker_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<String>>;
    /// Takes running tasks back from lost workers: retrying (attempt counted) or failed.
    async fn reclaim(&self, scope: Reclaim, now: i64) -> Result<Vec<TaskEvent>>;
    /// Cancels a non-terminal task.
    async fn cancel(&self, id: &str, now: i64, reason: Option<String>) -> Result<TaskRecord>;

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>>;
    async fn list(&self, filter: &TaskFilter) -> Result<Vec<(i64, TaskRecord)>>;
    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>>;
    async fn logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>>;
    async fn audit_events(&self, task_id: Option<&str>, limit: usize) -> Result<Vec<AuditEvent>>;
    async fn verify_audit(&self) -> Result<AuditReport>;
    async fn counts(&self) -> Result<StatusCounts>;
    /// Tasks a worker with this claim filter could run now or later, plus
    /// running tasks whose lease has expired (they will come back).
    async fn runnable_count(&self, req: &ClaimRequest) -> Result<u64>;
    /// Earliest `run_at` among claimable tasks in the future, for sleeping precisely.
    async fn next_run_at(&self, now: i64) -> Result<Option<i64>>;

    async fn register_worker(&self, w: WorkerInfo) -> Result<()>;
    /// Workers recorded on `host` that hold running tasks.
    async fn workers_with_leases(&self, host: &str) -> Result<Vec<WorkerInfo>>;

    /// Committed task state changes.
    fn subscribe(&self) -> broadcast::Receiver<TaskEvent>;
}
