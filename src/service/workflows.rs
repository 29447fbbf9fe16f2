//! The orchestration half of the service API: workflows, approvals,
//! schedules, and the claim/heartbeat/complete/fail protocol of external
//! workers.

use std::time::Duration;

use serde_json::Value;
use tokio::sync::broadcast;

use super::{RunOf, TaskQueue, check_id, prepare, prepare::Header};
use crate::error::{Error, Result};
use crate::executor::StopReason;
use crate::model::{
    AttemptStatus, ScheduleRecord, Submission, TaskFile, TaskRecord, TaskResult, TaskSpec,
    TaskStatus, Timestamp, WorkflowDetail, WorkflowEvent, WorkflowRecord, WorkflowSpec,
    WorkflowStatus, cron::CronSchedule,
};
use crate::store::{
    ApprovalDecision, ClaimRequest, ExternalFilter, FinishAttempt, FinishOutcome, FireSchedule,
    Next, Reclaim, ScheduleChange, Submitted, WorkflowFilter,
};
use crate::workflow::graph::{self, GraphView, ViewEdge, ViewNode};

/// What submitting a workflow did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct WorkflowSubmitted {
    pub workflow_id: String,
    pub name: String,
    pub status: WorkflowStatus,
    /// False when an existing workflow answered: the workflow's
    /// `idempotency_key` named it, or every task matched one of its tasks
    /// by key. Nothing new was stored then.
    #[serde(default = "created_default")]
    pub created: bool,
    /// One entry per task, in the order given (for an existing workflow
    /// named by its key: its own tasks, oldest first).
    pub tasks: Vec<Submitted>,
    /// The recurring schedule, when the workflow has a cron schedule (this
    /// submission is its first, upcoming run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
}

fn created_default() -> bool {
    true
}

/// A page of workflows, newest first.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct WorkflowPage {
    pub workflows: Vec<WorkflowRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// Which external tasks a worker wants.
#[derive(Debug, Clone, Default)]
pub struct ClaimFilter {
    /// Task names (empty: any).
    pub names: Vec<String>,
    pub project: Option<String>,
    /// Tags the task must all carry.
    pub tags: Vec<String>,
}

/// Most task names one claim may ask for.
pub const MAX_CLAIM_NAMES: usize = 1000;
/// Most tags one claim may require (a task carries at most 32).
pub const MAX_CLAIM_TAGS: usize = 32;

impl ClaimFilter {
    /// Bounds the lists, which become parameters of the claim query.
    fn check(&self) -> Result<()> {
        if self.names.len() > MAX_CLAIM_NAMES {
            return Err(Error::invalid(
                "names",
                format!(
                    "at most {MAX_CLAIM_NAMES} task names, got {}",
                    self.names.len()
                ),
            ));
        }
        if self.tags.len() > MAX_CLAIM_TAGS {
            return Err(Error::invalid(
                "tags",
                format!(
                    "at most {MAX_CLAIM_TAGS} tags (a task carries at most 32), got {}",
                    self.tags.len()
                ),
            ));
        }
        Ok(())
    }
}

/// An external task handed to a worker.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct ClaimedWork {
    pub task_id: String,
    pub name: String,
    /// 1-based; pass nothing back, the lease identifies the attempt.
    pub attempt: u32,
    pub max_attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// Renew with `heartbeat` before this time, or the task goes back to the queue.
    pub lease_expires_at: Timestamp,
    /// The task's spec: description, parameters, validation schema.
    pub spec: TaskSpec,
}

const MAX_LEASE: Duration = Duration::from_secs(3600);

fn check_worker_id(worker_id: &str) -> Result<()> {
    let ok = !worker_id.is_empty()
        && worker_id.len() <= 128
        && worker_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:@-".contains(c));
    if !ok {
        return Err(Error::invalid(
            "worker_id",
            format!("must be 1 to 128 characters of [A-Za-z0-9_.:@-], got {worker_id:?}"),
        ));
    }
    Ok(())
}

fn check_lease(lease: Duration) -> Result<()> {
    if lease < Duration::from_secs(1) || lease > MAX_LEASE {
        // Named as the interfaces take it (MCP and REST: seconds).
        return Err(Error::invalid(
            "lease_seconds",
            format!(
                "must be between 1 and 3600 seconds, got {}",
                crate::model::Dur(lease)
            ),
        ));
    }
    Ok(())
}

impl TaskQueue {
    /// Validates and submits a workflow atomically. Task names are unique
    /// in it and `depends_on` refers to them (or to existing task ids); a
    /// cycle, an unknown name or a bad spec rejects the whole workflow.
    pub async fn submit_workflow(&self, w: WorkflowSpec) -> Result<WorkflowSubmitted> {
        w.validate_header()?;
        self.check_existing_deps(&w.tasks, false).await?;
        let now = self.inner.clock.now_ms();
        let header = Header::of(&w);
        let p = prepare(
            &self.inner.config,
            Some(&header),
            w.schedule.as_ref(),
            w.tasks,
            &RunOf::default(),
            now,
            false,
        )?;
        let key = header.idempotency_key.clone();
        let mut tasks = self.inner.store.submit(p.sub).await?;
        let existing = match crate::store::resubmitted_workflow(&tasks) {
            Some(id) => {
                // The workflow and its tasks as of one moment: the statuses
                // the writer answered with may be older than the workflow's.
                let detail = self.get_workflow(id).await?;
                let now: std::collections::HashMap<&str, TaskStatus> = detail
                    .tasks
                    .iter()
                    .map(|t| (t.id.as_str(), t.status))
                    .collect();
                for s in &mut tasks {
                    if let Some(st) = now.get(s.id.as_str()) {
                        s.status = *st;
                    }
                }
                Some(detail.workflow)
            }
            // A submission has tasks, so no answer at all means its key
            // named a workflow without tasks of its own (each was answered
            // by an earlier task of another workflow).
            None if tasks.is_empty() => {
                let k = key.as_deref().unwrap_or_default();
                Some(self.inner.store.workflow_by_key(k).await?.ok_or_else(|| {
                    Error::Store(format!("no workflow has idempotency key {k:?}"))
                })?)
            }
            None => None,
        };
        if let Some(w) = existing {
            // The key, or every task, named a workflow that is already
            // there: it is the answer (the writer stored nothing new).
            return Ok(WorkflowSubmitted {
                workflow_id: w.id,
                name: w.name,
                status: w.status,
                created: false,
                tasks,
                schedule_id: w.schedule_id,
            });
        }
        self.inner.wake.notify_one();
        // A workflow whose every task was answered by tasks of other
        // workflows (or by lone tasks) has nothing of its own to run.
        let status = if tasks.iter().all(|t| !t.created) {
            WorkflowStatus::Succeeded
        } else {
            WorkflowStatus::Running
        };
        Ok(WorkflowSubmitted {
            workflow_id: p.workflow_id.expect("a workflow has an id"),
            name: w.name,
            status,
            created: true,
            tasks,
            schedule_id: p.schedule_id,
        })
    }

    /// Submits what a task or workflow file holds. Returns the workflow id
    /// (for a workflow) and one entry per task.
    pub async fn submit_file(
        &self,
        sub: Submission,
    ) -> Result<(Option<WorkflowSubmitted>, Vec<Submitted>)> {
        match sub {
            Submission::Tasks(t) => Ok((None, self.submit_batch(t).await?)),
            Submission::Workflow(w) => {
                let out = self.submit_workflow(w).await?;
                let tasks = out.tasks.clone();
                Ok((Some(out), tasks))
            }
        }
    }

    /// A workflow with its tasks and dependency edges.
    pub async fn get_workflow(&self, id: &str) -> Result<WorkflowDetail> {
        let id = &check_id(id)?;
        self.inner
            .store
            .workflow_detail(id)
            .await?
            .ok_or_else(|| Error::workflow_not_found(id))
    }

    /// A workflow's summary (no task list).
    pub async fn workflow(&self, id: &str) -> Result<WorkflowRecord> {
        let id = &check_id(id)?;
        self.inner
            .store
            .workflow(id)
            .await?
            .ok_or_else(|| Error::workflow_not_found(id))
    }

    /// Workflows, newest first, with cursor pagination.
    pub async fn list_workflows(
        &self,
        statuses: Vec<WorkflowStatus>,
        project: Option<String>,
        limit: Option<usize>,
        cursor: Option<String>,
    ) -> Result<WorkflowPage> {
        let limit = limit.unwrap_or(50);
        if limit == 0 || limit > 1000 {
            return Err(Error::invalid(
                "limit",
                format!("must be between 1 and 1000, got {limit}"),
            ));
        }
        let before_seq = match &cursor {
            Some(c) => Some(c.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::invalid("cursor", "is not a cursor returned by a previous page")
            })?),
            None => None,
        };
        let mut rows = self
            .inner
            .store
            .list_workflows(&WorkflowFilter {
                statuses,
                project,
                limit: limit + 1,
                before_seq,
                ..WorkflowFilter::default()
            })
            .await?;
        let next_cursor = if rows.len() > limit {
            rows.truncate(limit);
            rows.last().map(|(seq, _)| seq.to_string())
        } else {
            None
        };
        Ok(WorkflowPage {
            workflows: rows.into_iter().map(|(_, w)| w).collect(),
            next_cursor,
        })
    }

    /// Cancels every unfinished task of a workflow and stops the running
    /// ones (and its services).
    pub async fn cancel_workflow(&self, id: &str) -> Result<WorkflowRecord> {
        let id = &check_id(id)?;
        let ids = self
            .inner
            .store
            .cancel_workflow(id, self.inner.clock.now_ms(), None)
            .await?;
        for t in &ids {
            self.inner.stop_local(t, StopReason::Cancelled);
        }
        self.inner.stop_workflow_services(id).await;
        self.inner.wake.notify_one();
        self.workflow(id).await
    }

    /// Waits until the workflow finishes or `timeout` passes; returns its state either way.
    pub async fn wait_workflow(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<WorkflowRecord> {
        let id = &check_id(id)?;
        let mut events = self.inner.store.subscribe_workflows();
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        loop {
            let w = self.workflow(id).await?;
            if w.status.is_terminal() {
                return Ok(w);
            }
            let poll = tokio::time::sleep(Duration::from_millis(500));
            let until = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = wait_for_workflow(&mut events, id) => {}
                _ = poll => {}
                _ = until => return self.workflow(id).await,
            }
        }
    }

    /// The workflow's graph as Mermaid (`format = "mermaid"`) or DOT (`"dot"`),
    /// nodes styled by status.
    pub async fn workflow_graph(&self, id: &str, format: &str) -> Result<String> {
        let d = self.get_workflow(id).await?;
        // Dependencies on tasks outside the workflow (by id, or a task
        // answered by another's idempotency key) are drawn as nodes too,
        // so the graph shows why a task waits or was skipped.
        let inside: std::collections::HashSet<&str> =
            d.tasks.iter().map(|t| t.id.as_str()).collect();
        let mut outside = Vec::new();
        for e in &d.edges {
            if !inside.contains(e.dep_id.as_str())
                && !outside.iter().any(|t: &TaskRecord| t.id == e.dep_id)
                && let Some(t) = self.inner.store.get(&e.dep_id).await?
            {
                outside.push(t);
            }
        }
        let view = graph_view(&d, &outside);
        match format {
            "mermaid" => Ok(graph::mermaid(&view)),
            "dot" => Ok(graph::dot(&view)),
            other => Err(Error::invalid(
                "format",
                format!("must be mermaid or dot, got {other:?}"),
            )),
        }
    }

    /// Approves a task waiting in `awaiting_approval` (it is queued) or
    /// rejects it (it fails, so its `failure` dependents run).
    pub async fn approve(
        &self,
        id: &str,
        approved: bool,
        comment: Option<String>,
        by: Option<String>,
    ) -> Result<TaskRecord> {
        let id = &check_id(id)?;
        if let Some(c) = &comment
            && c.len() > 4096
        {
            return Err(Error::invalid("comment", "must be at most 4096 bytes"));
        }
        if let Some(b) = &by
            && b.len() > 256
        {
            return Err(Error::invalid("by", "must be at most 256 bytes"));
        }
        let t = self
            .inner
            .store
            .approve(
                id,
                ApprovalDecision {
                    approved,
                    comment,
                    by,
                },
                self.inner.clock.now_ms(),
            )
            .await?;
        self.inner.wake.notify_one();
        Ok(t)
    }

    /// Runs a failed, timed-out or cancelled task again with a fresh
    /// allowance of attempts; tasks that were skipped because of it are
    /// decided again, and its workflow is running again.
    pub async fn retry(&self, id: &str) -> Result<TaskRecord> {
        let id = &check_id(id)?;
        let t = self
            .inner
            .store
            .retry(id, self.inner.clock.now_ms())
            .await?;
        self.inner.wake.notify_one();
        Ok(t)
    }

    /// Claims up to `limit` ready external tasks for `worker_id` under a
    /// lease of `lease`. Renew with [`TaskQueue::heartbeat`]; finish with
    /// [`TaskQueue::complete`] or [`TaskQueue::fail`].
    pub async fn claim(
        &self,
        worker_id: &str,
        filter: ClaimFilter,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<ClaimedWork>> {
        check_worker_id(worker_id)?;
        check_lease(lease)?;
        filter.check()?;
        if limit == 0 || limit > 100 {
            return Err(Error::invalid(
                "limit",
                format!("must be between 1 and 100, got {limit}"),
            ));
        }
        let now = self.inner.clock.now_ms();
        // Expired leases first, so abandoned work comes back to this worker.
        self.inner.store.reclaim(Reclaim::Expired, now).await?;
        let lease_until = now + lease.as_millis() as i64;
        let claimed = self
            .inner
            .store
            .claim(ClaimRequest {
                worker_id: worker_id.to_string(),
                now,
                lease_until,
                limit,
                server_kinds: false,
                external: Some(ExternalFilter {
                    names: filter.names,
                    project: filter.project,
                    tags: filter.tags,
                }),
                only: None,
            })
            .await?;
        let mut out = Vec::with_capacity(claimed.len());
        for c in claimed {
            // Integrity, as before every attempt the engine runs: a spec
            // changed since submit is failed here, never handed out.
            let computed = crate::integrity::spec_hash(&c.spec_json);
            if computed != c.spec_hash {
                let t = self.get(&c.id).await?;
                let error = format!(
                    "integrity check failed: the stored spec hashes to {computed} but {} was \
                     recorded at submit; the task was not handed to a worker",
                    c.spec_hash
                );
                tracing::error!(task = %c.id, "{error}");
                self.finish_external(
                    t,
                    worker_id,
                    AttemptStatus::Failed,
                    None,
                    Some(error),
                    false,
                )
                .await?;
                continue;
            }
            let spec: TaskSpec = serde_json::from_str(&c.spec_json)
                .map_err(|e| Error::Store(format!("task {}: stored spec unreadable: {e}", c.id)))?;
            out.push(ClaimedWork {
                task_id: c.id,
                name: c.name,
                attempt: c.attempt,
                max_attempts: c.max_attempts,
                workflow_id: c.workflow_id,
                lease_expires_at: Timestamp(lease_until),
                spec,
            });
        }
        Ok(out)
    }

    /// Extends the lease of a claimed task. Fails with a conflict when the
    /// worker no longer holds it (expired, cancelled): stop working on it.
    pub async fn heartbeat(
        &self,
        task_id: &str,
        worker_id: &str,
        lease: Duration,
    ) -> Result<Timestamp> {
        let task_id = &check_id(task_id)?;
        check_worker_id(worker_id)?;
        check_lease(lease)?;
        let now = self.inner.clock.now_ms();
        let until = now + lease.as_millis() as i64;
        self.inner
            .store
            .heartbeat(task_id, worker_id, now, until)
            .await?;
        Ok(Timestamp(until))
    }

    /// Completes a claimed task with its result output. An output that does
    /// not match the task's `validation` schema is refused and the task
    /// stays claimed, so the worker can correct it.
    pub async fn complete(
        &self,
        task_id: &str,
        worker_id: &str,
        output: Option<Value>,
    ) -> Result<TaskRecord> {
        let t = self.held(task_id, worker_id).await?;
        if let Some(out) = &output {
            // The same cap as a command's result file: outputs come back
            // whole in every read of the task.
            let size = serde_json::to_vec(out).map(|v| v.len()).unwrap_or(0) as u64;
            let max = crate::executor::MAX_RESULT_BYTES;
            if size > max {
                return Err(Error::invalid(
                    "output",
                    format!(
                        "is {size} bytes as JSON; at most {max} are accepted (store large results elsewhere and return a reference)"
                    ),
                ));
            }
        }
        if let (Some(schema), Some(out)) = (&t.spec.validation, &output)
            && let Ok(v) = jsonschema::validator_for(schema)
            && let Some(e) = v.iter_errors(out).next()
        {
            return Err(Error::invalid(
                "output",
                format!(
                    "does not match the task's validation schema{}: {e}; fix it and complete again (the task is still yours)",
                    match e.instance_path().to_string() {
                        p if p.is_empty() => String::new(),
                        p => format!(" at {p}"),
                    }
                ),
            ));
        }
        if t.spec.validation.is_some() && output.is_none() {
            return Err(Error::invalid(
                "output",
                "is required: the task has a validation schema its output must match",
            ));
        }
        self.finish_external(t, worker_id, AttemptStatus::Succeeded, output, None, false)
            .await
    }

    /// Fails a claimed task. With `retryable`, it is retried per its retry
    /// policy while attempts remain; otherwise it fails now.
    pub async fn fail(
        &self,
        task_id: &str,
        worker_id: &str,
        error: String,
        retryable: bool,
    ) -> Result<TaskRecord> {
        if error.trim().is_empty() || error.len() > 16 * 1024 {
            return Err(Error::invalid(
                "error",
                "must say what went wrong, in 1 to 16384 bytes",
            ));
        }
        let t = self.held(task_id, worker_id).await?;
        self.finish_external(
            t,
            worker_id,
            AttemptStatus::Failed,
            None,
            Some(error),
            retryable,
        )
        .await
    }

    async fn held(&self, task_id: &str, worker_id: &str) -> Result<TaskRecord> {
        let task_id = &check_id(task_id)?;
        check_worker_id(worker_id)?;
        let t = self.get(task_id).await?;
        if t.status != TaskStatus::Running || t.lease_owner.as_deref() != Some(worker_id) {
            return Err(Error::Conflict(format!(
                "worker {worker_id} does not hold task {task_id} (it is {}{}); its lease expired or it was cancelled",
                t.status,
                t.lease_owner
                    .as_deref()
                    .map(|o| format!(", held by {o}"))
                    .unwrap_or_default()
            )));
        }
        Ok(t)
    }

    async fn finish_external(
        &self,
        t: TaskRecord,
        worker_id: &str,
        status: AttemptStatus,
        output: Option<Value>,
        error: Option<String>,
        retryable: bool,
    ) -> Result<TaskRecord> {
        let now = self.inner.clock.now_ms();
        let started = t.started_at.map(|s| s.0).unwrap_or(now);
        let next = if status == AttemptStatus::Succeeded {
            Next::Done(TaskStatus::Succeeded)
        } else if retryable && t.attempts < t.max_attempts {
            let policy = t.spec.retry.clone().unwrap_or_default();
            let delay = policy.delay_after(t.attempts, &mut rand::rng());
            Next::Retry {
                run_at: now + delay.as_millis() as i64,
            }
        } else {
            Next::Done(TaskStatus::Failed)
        };
        let outcome = self
            .inner
            .store
            .finish(FinishAttempt {
                task_id: t.id.clone(),
                attempt: t.attempts,
                worker_id: worker_id.to_string(),
                started_at: started,
                now,
                status,
                error,
                result: TaskResult {
                    output,
                    attempt: t.attempts,
                    duration_ms: (now - started).max(0) as u64,
                    ..TaskResult::default()
                },
                logs: Vec::new(),
                next,
            })
            .await?;
        if let FinishOutcome::Stale(s) = outcome {
            return Err(Error::Conflict(format!(
                "worker {worker_id} lost task {} before reporting (it is now {s}); the report was recorded as a stale attempt",
                t.id
            )));
        }
        self.inner.wake.notify_one();
        self.get(&t.id).await
    }

    /// Every recurring schedule.
    pub async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>> {
        self.inner.store.list_schedules().await
    }

    /// One schedule.
    pub async fn get_schedule(&self, id: &str) -> Result<ScheduleRecord> {
        let id = &check_id(id)?;
        self.inner
            .store
            .schedule(id)
            .await?
            .ok_or_else(|| Error::schedule_not_found(id))
    }

    /// Stops a schedule firing; its upcoming run is cancelled if it has not started.
    pub async fn pause_schedule(&self, id: &str) -> Result<ScheduleRecord> {
        let id = &check_id(id)?;
        let r = self
            .inner
            .store
            .change_schedule(id, ScheduleChange::Pause, self.inner.clock.now_ms())
            .await?;
        r.ok_or_else(|| Error::schedule_not_found(id))
    }

    /// Starts a paused schedule again from its next slot.
    pub async fn resume_schedule(&self, id: &str) -> Result<ScheduleRecord> {
        let id = &check_id(id)?;
        let s = self.get_schedule(id).await?;
        if !s.paused {
            return Ok(s);
        }
        let now = self.inner.clock.now_ms();
        let (next, run, upcoming) = self.schedule_run(&s, now, None)?;
        self.inner
            .store
            .change_schedule(
                id,
                ScheduleChange::Resume {
                    next_fire_at: next,
                    upcoming_run: upcoming,
                    run: Box::new(run),
                },
                now,
            )
            .await?
            .ok_or_else(|| Error::schedule_not_found(id))
    }

    /// Deletes a schedule; its upcoming run is cancelled if it has not started.
    pub async fn remove_schedule(&self, id: &str) -> Result<()> {
        let id = &check_id(id)?;
        match self
            .inner
            .store
            .change_schedule(id, ScheduleChange::Remove, self.inner.clock.now_ms())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Builds the run of `s` for its next slot after `now`.
    fn schedule_run(
        &self,
        s: &ScheduleRecord,
        now: i64,
        fired_slot: Option<i64>,
    ) -> Result<(i64, crate::store::NewSubmission, String)> {
        let cron = CronSchedule::parse(&s.cron, s.timezone.as_deref())?;
        let next = cron
            .next_after(now.max(fired_slot.unwrap_or(now)))
            .ok_or_else(|| {
                Error::invalid("cron", format!("schedule {} never fires again", s.id))
            })?;
        let file: TaskFile = serde_json::from_value(s.template.clone())
            .map_err(|e| Error::Store(format!("schedule {}: template unreadable: {e}", s.id)))?;
        let header = file.name.clone().map(|name| Header {
            name,
            project: file.project.clone(),
            tags: file.tags.clone(),
            description: file.description.clone(),
            idempotency_key: None,
        });
        let run = RunOf {
            schedule_id: Some(s.id.clone()),
            start_at: Some(next),
            key_suffix: Some(next.to_string()),
        };
        let p = prepare(
            &self.inner.config,
            header.as_ref(),
            None,
            file.tasks,
            &run,
            now,
            false,
        )?;
        let upcoming = p
            .workflow_id
            .clone()
            .or_else(|| p.sub.tasks.first().map(|t| t.id.clone()))
            .unwrap_or_default();
        Ok((next, p.sub, upcoming))
    }

    /// Fires every schedule whose upcoming run came due: creates the run
    /// after it. Safe to call from several engines at once.
    pub(crate) async fn fire_due_schedules(&self) -> Result<usize> {
        let now = self.inner.clock.now_ms();
        let due = self.inner.store.due_schedules(now).await?;
        let mut fired = 0;
        for s in due {
            let Some(expected) = s.next_fire_at.map(|t| t.0) else {
                continue;
            };
            let (next, run, upcoming) = match self.schedule_run(&s, now, Some(expected)) {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(schedule = %s.id, error = %e, "cannot build the next run of a schedule");
                    continue;
                }
            };
            let ok = self
                .inner
                .store
                .fire_schedule(FireSchedule {
                    schedule_id: s.id.clone(),
                    expected,
                    next_fire_at: next,
                    upcoming_run: upcoming,
                    run,
                    now,
                })
                .await?;
            if ok {
                fired += 1;
                tracing::info!(schedule = %s.id, name = %s.name, next_fire_at = %Timestamp(next), "schedule fired");
            }
        }
        Ok(fired)
    }

    /// Committed workflow state changes, as they happen in this process.
    pub fn subscribe_workflows(&self) -> broadcast::Receiver<WorkflowEvent> {
        self.inner.store.subscribe_workflows()
    }
}

/// The workflow's tasks, then the tasks outside it that some of them
/// depend on (named with "(outside)").
fn graph_view(d: &WorkflowDetail, outside: &[TaskRecord]) -> GraphView {
    let index: std::collections::HashMap<&str, usize> = d
        .tasks
        .iter()
        .chain(outside)
        .enumerate()
        .map(|(i, t)| (t.id.as_str(), i))
        .collect();
    GraphView {
        title: Some(format!("{} ({})", d.workflow.name, d.workflow.status)),
        nodes: d
            .tasks
            .iter()
            .map(|t| ViewNode {
                id: t.id.clone(),
                name: t.name.clone(),
                status: t.status,
            })
            .chain(outside.iter().map(|t| ViewNode {
                id: t.id.clone(),
                name: format!("{} (outside)", t.name),
                status: t.status,
            }))
            .collect(),
        edges: d
            .edges
            .iter()
            .filter_map(|e| {
                Some(ViewEdge {
                    from: *index.get(e.dep_id.as_str())?,
                    to: *index.get(e.task_id.as_str())?,
                    condition: e.condition.clone(),
                })
            })
            .collect(),
    }
}

async fn wait_for_workflow(events: &mut broadcast::Receiver<WorkflowEvent>, id: &str) {
    loop {
        match events.recv().await {
            Ok(e) if e.workflow_id == id && e.status.is_terminal() => return,
            Ok(_) => {}
            Err(broadcast::error::RecvError::Lagged(_)) => return,
            Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
        }
    }
}
