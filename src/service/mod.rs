//! `TaskQueue`: the one API that the CLI, library users (and the MCP and
//! REST layers) call. Clones are shallow: every clone shares one store and
//! one engine state.

mod history;
mod prepare;
mod workflows;

pub use history::VectorizerState;
pub(crate) use prepare::{Header, RunOf, prepare};
pub use workflows::{ClaimFilter, ClaimedWork, WorkflowPage, WorkflowSubmitted};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::Value;
use tokio::sync::broadcast;

use crate::config::Config;
use crate::engine::clock::{Clock, SystemClock};
use crate::engine::{self, EngineHandle, Shared};
use crate::error::{Error, Result};
use crate::executor::{Handler, HandlerError, StopReason, TaskContext};
use crate::integrity::{AuditEvent, AuditReport};
use crate::model::{Attempt, LogChunk, TaskEvent, TaskRecord, TaskSpec, TaskStatus};
use crate::store::postgres::PgStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{StatusCounts, Store, Submitted, TaskFilter};

/// Handle to a task queue. Clones are shallow.
#[derive(Clone)]
pub struct TaskQueue {
    inner: Arc<Shared>,
}

impl std::fmt::Debug for TaskQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskQueue")
            .field("worker_id", &self.inner.worker_id)
            .finish()
    }
}

/// A page of tasks, newest first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct TaskPage {
    pub tasks: Vec<TaskRecord>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Filters for [`TaskQueue::list`].
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    pub statuses: Vec<TaskStatus>,
    pub project: Option<String>,
    pub workflow_id: Option<String>,
    pub tag: Option<String>,
    pub name: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

impl TaskQueue {
    /// Opens the SQLite database at `path` with the default configuration.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self> {
        let mut config = Config::default();
        config.storage.path = path.as_ref().to_path_buf();
        Self::open_with(config).await
    }

    /// Opens the store named by `config.storage`.
    pub async fn open_with(config: Config) -> Result<Self> {
        Self::open_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Opens with an injected clock (tests).
    pub async fn open_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<Self> {
        config.validate()?;
        let store: Arc<dyn Store> = match config.storage.postgres_url() {
            Some(url) => Arc::new(PgStore::open(url, config.storage.read_connections).await?),
            None => Arc::new(
                SqliteStore::open(
                    &config.storage.path,
                    config.storage.durability,
                    config.storage.read_connections,
                )
                .await?,
            ),
        };
        let queue = Self::with_store(store, config, clock);
        // A configured embedder that cannot be built is a start-up error.
        if let Some(e) = queue.inner.search.take_startup_error() {
            return Err(e);
        }
        Ok(queue)
    }

    /// A handle over engine state that already exists.
    pub(crate) fn from_shared(inner: Arc<Shared>) -> Self {
        TaskQueue { inner }
    }

    /// Builds a queue over any store.
    pub fn with_store(store: Arc<dyn Store>, config: Config, clock: Arc<dyn Clock>) -> Self {
        let worker_id = format!("w-{}", uuid::Uuid::now_v7());
        TaskQueue {
            inner: Arc::new(Shared::new(store, config, clock, worker_id)),
        }
    }

    /// Builds a queue over any store with a given embedder as the semantic
    /// tier, whatever `search.embedder` says (library users with a model of
    /// their own; benchmarks).
    pub fn with_store_and_embedder(
        store: Arc<dyn Store>,
        config: Config,
        clock: Arc<dyn Clock>,
        embedder: Arc<dyn crate::search::embed::Embedder>,
    ) -> Self {
        let worker_id = format!("w-{}", uuid::Uuid::now_v7());
        let mut shared = Shared::new(store, config, clock, worker_id);
        shared.search.set_embedder(embedder);
        TaskQueue {
            inner: Arc::new(shared),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// This process's engine instance id (the lease owner of what it runs).
    pub fn worker_id(&self) -> &str {
        &self.inner.worker_id
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// Validates and submits one task. Its `depends_on` may name existing task ids.
    pub async fn submit(&self, spec: impl Into<TaskSpec>) -> Result<Submitted> {
        let mut v = self.submit_specs(vec![spec.into()], true).await?;
        Ok(v.pop().expect("one result per task"))
    }

    /// Validates and submits tasks atomically: all are stored, or none.
    /// They may depend on each other by name. Errors name the task's index
    /// (`tasks[3].priority`).
    pub async fn submit_batch(&self, specs: Vec<TaskSpec>) -> Result<Vec<Submitted>> {
        self.submit_specs(specs, false).await
    }

    async fn submit_specs(&self, specs: Vec<TaskSpec>, single: bool) -> Result<Vec<Submitted>> {
        let now = self.inner.clock.now_ms();
        self.check_existing_deps(&specs, single).await?;
        let p = prepare(
            &self.inner.config,
            None,
            None,
            specs,
            &RunOf::default(),
            now,
            single,
        )?;
        let wake = self.engine_could_run(&p.sub.tasks);
        let out = self.inner.store.submit(p.sub).await?;
        if wake {
            self.inner.wake.notify_one();
        }
        Ok(out)
    }

    /// Whether this process's engine could claim one of these tasks: not
    /// for external tasks it has no handler for (a worker claims those), so
    /// a submit of agent work does not cost a useless claim.
    fn engine_could_run(&self, tasks: &[crate::store::NewTask]) -> bool {
        let handlers = self
            .inner
            .handlers
            .read()
            .unwrap_or_else(|e| e.into_inner());
        tasks.iter().any(|t| {
            t.kind != crate::model::TaskKind::External
                || crate::executor::find_handler(&handlers, &t.name).is_some()
        })
    }

    /// Dependencies on existing tasks must name tasks that exist. The
    /// field is named as the caller sent it: `depends_on[0]` for a single
    /// task, `tasks[2].depends_on[0]` in a batch or a workflow (even of one
    /// task).
    async fn check_existing_deps(&self, specs: &[TaskSpec], single: bool) -> Result<()> {
        let fields = prepare::external_dep_fields(specs);
        if fields.is_empty() {
            return Ok(());
        }
        let ids: Vec<String> = fields.keys().cloned().collect();
        let found: std::collections::HashSet<String> = self
            .get_many(&ids)
            .await?
            .into_iter()
            .map(|t| t.id)
            .collect();
        let mut missing: Vec<(&String, &String)> = fields
            .iter()
            .filter(|(id, _)| !found.contains(*id))
            .collect();
        missing.sort_by(|a, b| a.1.cmp(b.1));
        if let Some((id, field)) = missing.first() {
            let field = if single {
                field.trim_start_matches("tasks[0].").to_string()
            } else {
                field.to_string()
            };
            return Err(Error::invalid(
                field,
                format!(
                    "no task has id {id}; depend on an existing task's id or on a task name in this submission"
                ),
            ));
        }
        Ok(())
    }

    /// A task by id.
    pub async fn get(&self, id: &str) -> Result<TaskRecord> {
        let id = &check_id(id)?;
        self.inner
            .store
            .get(id)
            .await?
            .ok_or_else(|| Error::task_not_found(id))
    }

    /// A task with every attempt, oldest first, as of one moment: the
    /// task's status and its attempts agree (two reads could show a task
    /// finished while its last attempt is not yet there).
    pub async fn get_with_attempts(&self, id: &str) -> Result<(TaskRecord, Vec<Attempt>)> {
        let id = &check_id(id)?;
        self.inner
            .store
            .task_with_attempts(id)
            .await?
            .ok_or_else(|| Error::task_not_found(id))
    }

    /// Tasks, newest first, with cursor pagination.
    pub async fn list(&self, mut opts: ListOptions) -> Result<TaskPage> {
        let limit = opts.limit.unwrap_or(50);
        if limit == 0 || limit > 1000 {
            return Err(Error::invalid(
                "limit",
                format!("must be between 1 and 1000, got {limit}"),
            ));
        }
        let before_seq = match &opts.cursor {
            Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::invalid("cursor", "is not a cursor returned by a previous page")
            })?),
            None => None,
        };
        if let Some(w) = &opts.workflow_id {
            opts.workflow_id = Some(check_id_as(w, "workflow_id")?);
        }
        // Each status is a parameter of the query: one of each is enough.
        let mut statuses: Vec<TaskStatus> = Vec::new();
        for st in opts.statuses {
            if !statuses.contains(&st) {
                statuses.push(st);
            }
        }
        let filter = TaskFilter {
            statuses,
            project: opts.project,
            workflow_id: opts.workflow_id,
            tag: opts.tag,
            name: opts.name,
            ids: Vec::new(),
            limit: limit + 1,
            before_seq,
        };
        let mut rows = self.inner.store.list(&filter).await?;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        Ok(TaskPage {
            tasks: rows.into_iter().map(|(_, t)| t).collect(),
            next_cursor,
        })
    }

    /// Tasks by id, in no particular order (unknown ids are left out).
    pub async fn get_many(&self, ids: &[String]) -> Result<Vec<TaskRecord>> {
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(500) {
            let filter = TaskFilter {
                ids: chunk.to_vec(),
                limit: chunk.len(),
                ..TaskFilter::default()
            };
            out.extend(
                self.inner
                    .store
                    .list(&filter)
                    .await?
                    .into_iter()
                    .map(|(_, t)| t),
            );
        }
        Ok(out)
    }

    /// Cancels a task that has not finished; a running one has its process
    /// group stopped. A service task that already succeeded has its process stopped.
    pub async fn cancel(&self, id: &str) -> Result<TaskRecord> {
        let id = &check_id(id)?;
        if self.inner.stop_service(id).await {
            return self.get(id).await;
        }
        let t = match self
            .inner
            .store
            .cancel(id, self.inner.clock.now_ms(), None)
            .await
        {
            // A service that passed its health check keeps running in the
            // process whose engine started it: only that process can stop it.
            Err(Error::Conflict(msg)) => {
                let t = self.get(id).await?;
                if t.status == TaskStatus::Succeeded && t.spec.health_check.is_some() {
                    return Err(Error::Conflict(format!(
                        "task {id} is a service whose process runs under another engine; stop it \
                         through the server that runs it (task-queue --server URL cancel {id}), or \
                         cancel its workflow, which every engine stops its services for"
                    )));
                }
                return Err(Error::Conflict(msg));
            }
            r => r?,
        };
        self.inner.stop_local(id, StopReason::Cancelled);
        self.inner.wake.notify_one();
        Ok(t)
    }

    /// Waits until the task is terminal or `timeout` passes; returns its state either way.
    pub async fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<TaskRecord> {
        let id = &check_id(id)?;
        let mut events = self.inner.store.subscribe();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let t = self.get(id).await?;
            if t.status.is_terminal() {
                return Ok(t);
            }
            // Events cover this process; the poll covers other processes.
            let poll = tokio::time::sleep(Duration::from_millis(500));
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wait_for_event(&mut events, id) => {}
                _ = poll => {}
                _ = until => return self.get(id).await,
            }
        }
    }

    /// Every attempt of a task, oldest first.
    pub async fn attempts(&self, id: &str) -> Result<Vec<Attempt>> {
        let id = &check_id(id)?;
        self.get(id).await?;
        self.inner.store.attempts(id).await
    }

    /// Captured output of a task (all attempts, or one).
    pub async fn logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>> {
        let id = &check_id(id)?;
        let t = self.get(id).await?;
        if let Some(n) = attempt
            && (n == 0 || n > t.attempts)
        {
            return Err(Error::invalid(
                "attempt",
                match t.attempts {
                    0 => format!("task {id} has not started an attempt yet"),
                    1 => format!("task {id} has one attempt (1); got {n}"),
                    k => format!("task {id} has attempts 1..={k}; got {n}"),
                },
            ));
        }
        self.inner.store.logs(id, attempt).await
    }

    /// Audit events, of one task, workflow or schedule, or all, oldest
    /// first. An id that names none of them is [`Error::NotFound`].
    pub async fn audit_events(
        &self,
        task_id: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEvent>> {
        let task_id = task_id.map(check_id).transpose()?;
        let task_id = task_id.as_deref();
        if limit == 0 {
            return Err(Error::invalid("limit", "must be at least 1, got 0"));
        }
        let events = self.inner.store.audit_events(task_id, limit).await?;
        // No events for an id that names nothing is a wrong id, not an
        // empty trail (tasks, workflows and schedules all have events).
        if let Some(id) = task_id
            && events.is_empty()
            && self.inner.store.get(id).await?.is_none()
            && self.inner.store.workflow(id).await?.is_none()
            && self.inner.store.schedule(id).await?.is_none()
        {
            return Err(Error::NotFound {
                what: "task, workflow or schedule",
                id: id.to_string(),
            });
        }
        Ok(events)
    }

    /// Walks the whole audit chain.
    pub async fn verify_audit(&self) -> Result<AuditReport> {
        self.inner.store.verify_audit().await
    }

    /// Tasks by status.
    pub async fn counts(&self) -> Result<StatusCounts> {
        self.inner.store.counts().await
    }

    /// Task and workflow events after audit sequence `after` (for event streams).
    pub async fn events_after(
        &self,
        after: i64,
        workflow_id: Option<&str>,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::store::StreamEvent>> {
        let workflow_id = workflow_id
            .map(|w| check_id_as(w, "workflow_id"))
            .transpose()?;
        self.inner
            .store
            .events_after(after, workflow_id.as_deref(), project, limit)
            .await
    }

    /// Creates an API token; the secret is returned once and never stored.
    pub async fn create_token(
        &self,
        name: &str,
        role: crate::store::Role,
    ) -> Result<(crate::store::TokenRecord, String)> {
        if name.is_empty() || name.len() > 128 {
            return Err(Error::invalid("name", "must be 1 to 128 characters"));
        }
        let secret = format!("tq_{}", hex::encode(rand::random::<[u8; 32]>()));
        let t = crate::store::TokenRecord {
            id: uuid::Uuid::now_v7().to_string(),
            name: name.to_string(),
            role,
            created_at: crate::model::Timestamp(self.inner.clock.now_ms()),
            revoked_at: None,
        };
        self.inner
            .store
            .create_token(t.clone(), crate::integrity::spec_hash(&secret))
            .await?;
        Ok((t, secret))
    }

    /// The live token with this secret, if any.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<crate::store::TokenRecord>> {
        if !secret.starts_with("tq_") || secret.len() > 256 {
            return Ok(None);
        }
        self.inner
            .store
            .token_by_hash(&crate::integrity::spec_hash(secret))
            .await
    }

    /// Whether any live token exists.
    pub async fn tokens_exist(&self) -> Result<bool> {
        self.inner.store.tokens_exist().await
    }

    /// Every token (without secrets).
    pub async fn list_tokens(&self) -> Result<Vec<crate::store::TokenRecord>> {
        self.inner.store.list_tokens().await
    }

    /// Revokes a token by id.
    pub async fn revoke_token(&self, id: &str) -> Result<()> {
        let id = &canonical_id(id);
        if self
            .inner
            .store
            .revoke_token(id, self.inner.clock.now_ms())
            .await?
        {
            Ok(())
        } else {
            Err(Error::NotFound {
                what: "token",
                id: id.to_string(),
            })
        }
    }

    /// The state of this process's engine (for health checks and metrics).
    pub fn engine_status(&self) -> crate::engine::EngineStatus {
        self.inner.status()
    }

    /// The newest event sequence number.
    pub async fn last_event_seq(&self) -> Result<i64> {
        self.inner.store.last_event_seq().await
    }

    /// Queue depth by status, workflows, ready backlog age, schedules, leases.
    pub async fn stats(&self) -> Result<crate::store::QueueStats> {
        self.inner.store.stats(self.inner.clock.now_ms()).await
    }

    /// Committed state changes, as they happen in this process.
    pub fn subscribe(&self) -> broadcast::Receiver<TaskEvent> {
        self.inner.store.subscribe()
    }

    /// Registers an in-process handler for external tasks named `name`, or,
    /// when `name` ends in `*`, for every external task whose name starts
    /// with the part before it (`"label-*"`). An exact name wins over a
    /// pattern, a longer pattern over a shorter one.
    pub fn register_handler<F, Fut>(&self, name: impl Into<String>, f: F)
    where
        F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<Value, HandlerError>> + Send + 'static,
    {
        let h: Handler = Arc::new(move |ctx| f(ctx).boxed());
        self.inner
            .handlers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), h);
        self.inner.wake.notify_one();
    }

    /// Starts the engine on the current runtime; it runs until shut down.
    pub fn start(&self) -> EngineHandle {
        engine::start(self.inner.clone(), false, None)
    }

    /// Starts the engine on the current runtime for these tasks only: it
    /// claims none of the others in the queue (what `task-queue run FILE`
    /// runs). Dependencies outside them wait for another engine or worker.
    pub fn start_for(&self, ids: Vec<String>) -> EngineHandle {
        engine::start(self.inner.clone(), false, Some(Arc::new(ids)))
    }

    /// Runs the engine until nothing is left that it could run.
    pub async fn run_until_idle(&self) -> Result<()> {
        self.start_until_idle().join().await
    }

    /// Starts the engine on the current runtime; it ends by itself when
    /// nothing is left that it could run, or when shut down.
    pub fn start_until_idle(&self) -> EngineHandle {
        engine::start(self.inner.clone(), true, None)
    }
}

async fn wait_for_event(events: &mut broadcast::Receiver<TaskEvent>, id: &str) {
    loop {
        match events.recv().await {
            Ok(e) if e.task_id == id && e.status.is_terminal() => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}

pub(crate) fn check_id(id: &str) -> Result<String> {
    check_id_as(id, "id")
}

/// The stored form of an id given in any UUID form; anything else as given
/// (for echoing an id that was already checked, or one that is not a UUID).
pub(crate) fn canonical_id(id: &str) -> String {
    uuid::Uuid::parse_str(id)
        .map(|u| u.hyphenated().to_string())
        .unwrap_or_else(|_| id.to_string())
}

/// [`check_id`] for an id given in the field `field`.
pub(crate) fn check_id_as(id: &str, field: &str) -> Result<String> {
    match uuid::Uuid::parse_str(id) {
        // Ids are stored as lowercase hyphenated UUIDs; any form a UUID
        // parser reads (uppercase, braces, no hyphens) means the same id.
        Ok(u) => Ok(u.hyphenated().to_string()),
        Err(_) => Err(Error::invalid(
            field,
            format!(
                "{id:?} is not an id (ids are UUIDs such as 0193b0c2-7a4e-7b2d-9c1a-3f5e6d7c8b9a)"
            ),
        )),
    }
}
