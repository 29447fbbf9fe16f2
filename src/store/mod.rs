//! Persistence behind one trait, so SQLite (embedded default) and
//! PostgreSQL (several nodes sharing one queue) are interchangeable under
//! the service.
//!
//! The store applies state transitions it is told about; the decisions
//! (what runs next, retry or give up) belong to the engine. The exception
//! is lease recovery, which must work without the engine that owned the
//! lease, so the store applies the task's own retry policy there.

pub mod history;
pub mod postgres;
pub mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::error::Result;
use crate::integrity::{AuditEvent, AuditReport};
use crate::model::{
    Attempt, AttemptStatus, Condition, DependencyEdge, LogChunk, ScheduleRecord, TaskEvent,
    TaskKind, TaskRecord, TaskResult, TaskStatus, WorkflowDetail, WorkflowEvent, WorkflowRecord,
    WorkflowStatus,
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
    pub workflow_id: Option<String>,
    pub schedule_id: Option<String>,
    /// Dependencies: ids of tasks in the same submission or already stored.
    pub deps: Vec<NewDep>,
    /// Not before this time (ms): `schedule.at`, or a scheduled run's slot.
    pub run_at: i64,
    /// Waits in `awaiting_approval` once ready.
    pub needs_approval: bool,
}

/// One dependency of a new task.
#[derive(Debug, Clone)]
pub struct NewDep {
    pub dep_id: String,
    pub condition: Condition,
}

/// A new workflow row.
#[derive(Debug, Clone)]
pub struct NewWorkflow {
    pub id: String,
    pub name: String,
    pub project: Option<String>,
    pub tags: Vec<String>,
    pub description: Option<String>,
    pub schedule_id: Option<String>,
    /// A second submission with this key is answered by this workflow.
    pub idempotency_key: Option<String>,
    pub now: i64,
}

/// A new recurring schedule, stored with its first (upcoming) run.
#[derive(Debug, Clone)]
pub struct NewSchedule {
    pub id: String,
    pub name: String,
    pub project: Option<String>,
    pub cron: String,
    pub timezone: Option<String>,
    /// JSON of the submission each firing repeats.
    pub template: String,
    pub next_fire_at: i64,
    /// Task or workflow id of the upcoming run.
    pub upcoming_run: String,
    pub now: i64,
}

/// Everything one submit stores, atomically.
#[derive(Debug, Clone, Default)]
pub struct NewSubmission {
    pub workflow: Option<NewWorkflow>,
    pub schedules: Vec<NewSchedule>,
    pub tasks: Vec<NewTask>,
}

/// The next run of a schedule, created when the current one comes due.
#[derive(Debug, Clone)]
pub struct FireSchedule {
    pub schedule_id: String,
    /// The `next_fire_at` this firing advances from (compare-and-set).
    pub expected: i64,
    pub next_fire_at: i64,
    pub upcoming_run: String,
    pub run: NewSubmission,
    pub now: i64,
}

/// A change to a schedule.
#[derive(Debug, Clone)]
pub enum ScheduleChange {
    /// Stop firing; the upcoming run, if it has not started, is cancelled.
    Pause,
    /// Fire again, starting with this run.
    Resume {
        next_fire_at: i64,
        upcoming_run: String,
        run: Box<NewSubmission>,
    },
    /// Delete the schedule; the upcoming run, if it has not started, is cancelled.
    Remove,
}

/// An approval or rejection of a task waiting in `awaiting_approval`.
#[derive(Debug, Clone)]
pub struct ApprovalDecision {
    pub approved: bool,
    pub comment: Option<String>,
    pub by: Option<String>,
}

/// A filter for listing workflows, newest first.
#[derive(Debug, Clone, Default)]
pub struct WorkflowFilter {
    pub statuses: Vec<WorkflowStatus>,
    pub project: Option<String>,
    pub name: Option<String>,
    pub schedule_id: Option<String>,
    pub limit: usize,
    pub before_seq: Option<i64>,
}

/// What a submit did.
#[derive(
    Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct Submitted {
    pub id: String,
    pub name: String,
    /// False when an earlier task with the same idempotency key was returned.
    pub created: bool,
    pub status: TaskStatus,
    /// The recurring schedule this task is the upcoming run of.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// The workflow the task belongs to (for a task returned by its
    /// idempotency key, the workflow it was first submitted with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
}

/// The existing workflow a workflow submitted again stands for: none of its
/// tasks is new, and every one is a task of that one workflow (all matched
/// by idempotency key). The writers then store no new workflow, and the
/// answer is the existing one.
pub fn resubmitted_workflow(tasks: &[Submitted]) -> Option<&str> {
    let first = tasks.first()?.workflow_id.as_deref()?;
    tasks
        .iter()
        .all(|s| !s.created && s.workflow_id.as_deref() == Some(first))
        .then_some(first)
}

/// Whether a writer stores nothing of a submission's own (no workflow, no
/// schedule): a workflow submitted again, every task matched in one
/// existing workflow, whose answer is that workflow. Not a schedule's run
/// (it has its schedule and no new one): the schedule records the run it
/// made, which must exist.
pub(crate) fn stores_nothing_new(sub: &NewSubmission, answer: &Result<Vec<Submitted>>) -> bool {
    let Some(w) = &sub.workflow else {
        return false;
    };
    let schedule_run = w.schedule_id.is_some() && sub.schedules.is_empty();
    !schedule_run && matches!(answer, Ok(list) if resubmitted_workflow(list).is_some())
}

/// How a writer answers a submission, given its workflow's idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyedAs {
    /// Stored as usual (no key, or a key nothing has yet).
    Fresh,
    /// The key names this stored workflow: its tasks are the answer.
    Existing(String),
    /// An earlier submission of the same batch has the key: its answer is
    /// this one's too.
    SameAs(usize),
}

/// A new task's dependencies as they are stored: each task once, after
/// `remap` (a task answered by an earlier one, through its idempotency key,
/// stands in for it), with the condition of its first mention. Two
/// dependencies can name one stored task (two tasks of a workflow with one
/// key, or a keyed task and that task's id); counting both in
/// `deps_pending` against the one edge stored would leave the dependent
/// waiting for ever.
pub(crate) fn distinct_deps<'a>(
    t: &'a NewTask,
    remap: &std::collections::HashMap<&'a str, &'a str>,
) -> Vec<(&'a str, &'a crate::model::Condition)> {
    let mut out: Vec<(&str, &crate::model::Condition)> = Vec::with_capacity(t.deps.len());
    for d in &t.deps {
        let id = remap.get(d.dep_id.as_str()).copied().unwrap_or(&d.dep_id);
        if !out.iter().any(|(seen, _)| *seen == id) {
            out.push((id, &d.condition));
        }
    }
    out
}

/// The dependencies of each submission on tasks that are not its own
/// (they must be stored already), without repeats.
pub(crate) fn outside_deps<'a>(subs: &[&'a NewSubmission]) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    // Most submissions (every batch of lone tasks) have no dependencies.
    for s in subs
        .iter()
        .filter(|s| s.tasks.iter().any(|t| !t.deps.is_empty()))
    {
        let own: std::collections::HashSet<&str> = s.tasks.iter().map(|t| t.id.as_str()).collect();
        for t in &s.tasks {
            for d in &t.deps {
                if !own.contains(d.dep_id.as_str()) {
                    out.push(&d.dep_id);
                }
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// Whether each submission depends on a task that is neither its own nor
/// in `stored`: it will be refused, so none of its tasks may answer
/// another submission's task by their shared idempotency key (that task
/// would be answered with an id that is never stored).
pub(crate) fn refused_for_deps(
    subs: &[&NewSubmission],
    stored: &std::collections::HashSet<String>,
) -> Vec<bool> {
    subs.iter()
        .map(|s| {
            if s.tasks.iter().all(|t| t.deps.is_empty()) {
                return false;
            }
            let own: std::collections::HashSet<&str> =
                s.tasks.iter().map(|t| t.id.as_str()).collect();
            s.tasks.iter().any(|t| {
                t.deps
                    .iter()
                    .any(|d| !own.contains(d.dep_id.as_str()) && !stored.contains(&d.dep_id))
            })
        })
        .collect()
}

/// For each task of a batch, in order, the index of its submission.
pub(crate) fn submission_of_each_task(subs: &[&NewSubmission]) -> Vec<usize> {
    subs.iter()
        .enumerate()
        .flat_map(|(si, s)| std::iter::repeat_n(si, s.tasks.len()))
        .collect()
}

/// The workflow idempotency key of a submission, if any.
pub(crate) fn workflow_key(sub: &NewSubmission) -> Option<&str> {
    sub.workflow.as_ref()?.idempotency_key.as_deref()
}

/// Sorts a batch's submissions by their workflow keys; `existing` maps the
/// keys already stored to their workflows.
pub(crate) fn keyed_as(
    subs: &[&NewSubmission],
    existing: &std::collections::HashMap<String, String>,
) -> Vec<KeyedAs> {
    let mut first: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    subs.iter()
        .enumerate()
        .map(|(i, s)| match workflow_key(s) {
            None => KeyedAs::Fresh,
            Some(k) => {
                if let Some(id) = existing.get(k) {
                    KeyedAs::Existing(id.clone())
                } else if let Some(&j) = first.get(k) {
                    KeyedAs::SameAs(j)
                } else {
                    first.insert(k, i);
                    KeyedAs::Fresh
                }
            }
        })
        .collect()
}

/// The submissions of `subs` that a writer stores as usual in this round.
pub(crate) fn fresh_of<'a>(subs: &[&'a NewSubmission], plan: &[KeyedAs]) -> Vec<&'a NewSubmission> {
    subs.iter()
        .zip(plan)
        .filter(|(_, p)| **p == KeyedAs::Fresh)
        .map(|(s, _)| *s)
        .collect()
}

/// Puts a round's answers together: `fresh` has one answer per
/// [`KeyedAs::Fresh`] submission, in order; `existing` the tasks of each
/// existing workflow, oldest first. Every task of an answer by key is an
/// earlier one (`created: false`).
///
/// A submission with the key of an earlier one of its batch gets the
/// tasks of the workflow that earlier one stored (none when all its tasks
/// were answered by tasks of other workflows: the caller looks the key up),
/// or, when an existing workflow answered it (every task matched that
/// workflow's), the same answer. When the earlier one was refused, `None`:
/// the writer stores it in another round, where it comes first.
pub(crate) fn answer_keyed(
    subs: &[&NewSubmission],
    plan: &[KeyedAs],
    fresh: Vec<Result<Vec<Submitted>>>,
    existing: &std::collections::HashMap<String, Vec<Submitted>>,
) -> Vec<Option<Result<Vec<Submitted>>>> {
    let mut fresh = fresh.into_iter();
    let mut out: Vec<Option<Result<Vec<Submitted>>>> = Vec::with_capacity(plan.len());
    for p in plan {
        let answer = match p {
            KeyedAs::Fresh => Some(fresh.next().expect("one answer per fresh submission")),
            KeyedAs::Existing(id) => Some(Ok(existing.get(id).cloned().unwrap_or_default())),
            KeyedAs::SameAs(j) => match &out[*j] {
                Some(Ok(list)) => {
                    let own = match resubmitted_workflow(list) {
                        Some(_) => None,
                        None => subs[*j].workflow.as_ref().map(|w| w.id.as_str()),
                    };
                    Some(Ok(list
                        .iter()
                        .filter(|s| own.is_none() || s.workflow_id.as_deref() == own)
                        .map(|s| Submitted {
                            created: false,
                            ..s.clone()
                        })
                        .collect()))
                }
                Some(Err(_)) | None => None,
            },
        };
        out.push(answer);
    }
    out
}

/// A writer's rounds over a batch with workflow keys: each round stores
/// the first submission of every new key ([`KeyedRounds::fresh`]), and a
/// submission whose first was refused waits for the next one.
pub(crate) struct KeyedRounds<'a> {
    subs: &'a [&'a NewSubmission],
    existing: &'a std::collections::HashMap<String, String>,
    answers: Vec<Option<Result<Vec<Submitted>>>>,
    pending: Vec<usize>,
    round: Vec<&'a NewSubmission>,
    plan: Vec<KeyedAs>,
}

impl<'a> KeyedRounds<'a> {
    /// `existing` maps the keys already stored to their workflows.
    pub(crate) fn new(
        subs: &'a [&'a NewSubmission],
        existing: &'a std::collections::HashMap<String, String>,
    ) -> Self {
        KeyedRounds {
            subs,
            existing,
            answers: subs.iter().map(|_| None).collect(),
            pending: (0..subs.len()).collect(),
            round: Vec::new(),
            plan: Vec::new(),
        }
    }

    /// The submissions to store as usual in the next round, or `None` when
    /// every one is answered.
    pub(crate) fn fresh(&mut self) -> Option<Vec<&'a NewSubmission>> {
        if self.pending.is_empty() {
            return None;
        }
        self.round = self.pending.iter().map(|&i| self.subs[i]).collect();
        self.plan = keyed_as(&self.round, self.existing);
        Some(fresh_of(&self.round, &self.plan))
    }

    /// Takes the round's answers (`fresh`: one per submission that
    /// [`KeyedRounds::fresh`] returned; `tasks`: each existing workflow's).
    pub(crate) fn answer(
        &mut self,
        fresh: Vec<Result<Vec<Submitted>>>,
        tasks: &std::collections::HashMap<String, Vec<Submitted>>,
    ) {
        let got = answer_keyed(&self.round, &self.plan, fresh, tasks);
        let mut next = Vec::new();
        for (&i, a) in self.pending.iter().zip(got) {
            match a {
                Some(a) => self.answers[i] = Some(a),
                None => next.push(i),
            }
        }
        self.pending = next;
    }

    /// One answer per submission, in order.
    pub(crate) fn finish(self) -> Vec<Result<Vec<Submitted>>> {
        self.answers
            .into_iter()
            .map(|a| a.expect("every submission answered"))
            .collect()
    }
}

/// A request to claim ready tasks with a lease.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    pub worker_id: String,
    pub now: i64,
    pub lease_until: i64,
    pub limit: usize,
    /// Claim the kinds the server runs itself (command, http).
    pub server_kinds: bool,
    /// Claim external tasks matching this filter.
    pub external: Option<ExternalFilter>,
    /// Claim only these tasks (by id), if set.
    pub only: Option<std::sync::Arc<Vec<String>>>,
}

impl ClaimRequest {
    /// Whether the request can claim anything at all: a slot, and a kind
    /// of task to take. Stores answer the others with nothing, unasked.
    pub fn asks_for_work(&self) -> bool {
        self.limit > 0 && (self.server_kinds || self.external.is_some())
    }
}

/// The claims that come with a batch's finishes, merged: requests of the
/// same worker with the same filter become one claim for all of their
/// slots. Returns the merged requests in order of first appearance, each
/// with the indexes (into `requests`) of its members.
pub(crate) fn merge_claims(requests: &[Option<&ClaimRequest>]) -> Vec<(ClaimRequest, Vec<usize>)> {
    let mut groups: Vec<(ClaimRequest, Vec<usize>)> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let Some(r) = r else { continue };
        let same = groups.iter_mut().find(|(g, _)| {
            g.worker_id == r.worker_id
                && g.server_kinds == r.server_kinds
                && g.external == r.external
                && g.only == r.only
        });
        match same {
            Some((g, members)) => {
                g.limit += r.limit;
                g.now = g.now.max(r.now);
                g.lease_until = g.lease_until.max(r.lease_until);
                members.push(i);
            }
            None => groups.push(((*r).clone(), vec![i])),
        }
    }
    groups
}

/// Deals the tasks one merged claim returned out to its members, in claim
/// order, each up to its own limit.
pub(crate) fn deal_claims(
    claimed: Vec<ClaimedTask>,
    members: &[usize],
    requests: &[Option<&ClaimRequest>],
    out: &mut [Vec<ClaimedTask>],
) {
    let mut claimed = claimed.into_iter();
    for &i in members {
        let limit = requests[i].map_or(0, |r| r.limit);
        out[i].extend(claimed.by_ref().take(limit));
    }
}

/// Which external tasks a worker takes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExternalFilter {
    /// Task names (empty: any).
    pub names: Vec<String>,
    pub project: Option<String>,
    /// Tags the task must all carry.
    pub tags: Vec<String>,
}

/// An attempt row for a writer to insert.
pub(crate) struct AttemptRow {
    pub task_id: String,
    pub attempt: u32,
    pub worker_id: String,
    pub status: AttemptStatus,
    pub started_at: i64,
    pub finished_at: i64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub result: String,
}

impl AttemptRow {
    /// The rows as one JSON array of arrays, in column order (task_id,
    /// attempt, worker_id, status, started_at, finished_at, exit_code,
    /// signal, duration_ms, error, result): one bound value for the
    /// PostgreSQL writer's multi-row INSERT.
    /// The row of an attempt a worker reported finished (`result` is the
    /// attempt's result as JSON).
    pub(crate) fn finished(f: &FinishAttempt, result: String) -> AttemptRow {
        AttemptRow {
            task_id: f.task_id.clone(),
            attempt: f.attempt,
            worker_id: f.worker_id.clone(),
            status: f.status,
            started_at: f.started_at,
            finished_at: f.now,
            exit_code: f.result.exit_code,
            signal: f.result.signal,
            duration_ms: f.result.duration_ms as i64,
            error: f.error.clone(),
            result,
        }
    }

    pub(crate) fn json_array(rows: &[AttemptRow]) -> String {
        let json: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!([
                    r.task_id,
                    r.attempt,
                    r.worker_id,
                    r.status.as_str(),
                    r.started_at,
                    r.finished_at,
                    r.exit_code,
                    r.signal,
                    r.duration_ms,
                    r.error,
                    r.result
                ])
            })
            .collect();
        serde_json::Value::Array(json).to_string()
    }
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
    pub workflow_id: Option<String>,
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
    pub workflow_id: Option<String>,
    pub tag: Option<String>,
    pub name: Option<String>,
    pub ids: Vec<String>,
    pub limit: usize,
    /// Only tasks submitted before this cursor (from a previous page).
    pub before_seq: Option<i64>,
}

/// A committed state change for event streams, in audit-chain order.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct StreamEvent {
    /// The audit sequence number: pass it as `Last-Event-ID` to resume.
    pub seq: i64,
    pub at: crate::model::Timestamp,
    /// `task` or `workflow` (schedule events are not streamed).
    pub object: String,
    /// What happened: `submitted`, `claimed`, `finished`, `skipped`, `workflow_finished`, ...
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub to: String,
    /// Event detail (attempt, error, ...).
    pub detail: serde_json::Value,
}

/// What an API token may do (SPEC §7); each role includes the ones before.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read tasks, workflows, logs, events, stats.
    Viewer,
    /// Viewer, plus claim, heartbeat, complete and fail external tasks.
    Worker,
    /// Worker, plus submit, cancel, retry, approve and reject.
    Operator,
    /// Everything.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Worker => "worker",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "viewer" => Role::Viewer,
            "worker" => Role::Worker,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            _ => return None,
        })
    }
}

/// An API token as stored (never the token itself).
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created_at: crate::model::Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<crate::model::Timestamp>,
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

/// A snapshot of the queue for dashboards and agents.
#[derive(
    Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
pub struct QueueStats {
    /// Tasks by status (statuses with no task are left out).
    pub tasks: StatusCounts,
    /// Tasks by project, then status.
    pub by_project: BTreeMap<String, StatusCounts>,
    /// Workflows by status.
    pub workflows: BTreeMap<WorkflowStatus, u64>,
    /// Ready tasks (queued, or retrying whose backoff is over).
    pub ready: u64,
    /// How long the oldest ready task has waited, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_ready_ms: Option<i64>,
    /// Schedules that fire, and paused ones.
    pub schedules_active: u64,
    pub schedules_paused: u64,
    /// Leases held, by worker (engines and external workers).
    pub leases_by_worker: BTreeMap<String, u64>,
}

/// A finished dependency as the writers resolve it: its id, its status and
/// the output of its result (stored as JSON text).
pub(crate) fn finished_dep(
    id: String,
    status: &str,
    result: Option<&str>,
) -> (String, crate::model::TaskStatus, Option<serde_json::Value>) {
    let output = result
        .and_then(|r| serde_json::from_str::<crate::model::TaskResult>(r).ok())
        .and_then(|r| r.output);
    (
        id,
        status.parse().unwrap_or(crate::model::TaskStatus::Failed),
        output,
    )
}

/// How a workflow whose tasks have all finished ends. `own` counts its
/// tasks that failed (or timed out) and that were cancelled; `outside` its
/// tasks skipped because a dependency outside the workflow failed (or
/// timed out), and because one was cancelled. Such a skip is not one by
/// the workflow's design (a failure handler passed over, a branch not
/// taken): the work it needed did not happen, so it ends the workflow as
/// a failed or cancelled task of its own would. Answers the status and the
/// detail of its `workflow_finished` audit event.
pub(crate) fn finished_workflow(
    total: i64,
    own: (i64, i64),
    outside: (i64, i64),
) -> (WorkflowStatus, String) {
    let status = if own.0 > 0 || outside.0 > 0 {
        WorkflowStatus::Failed
    } else if own.1 > 0 || outside.1 > 0 {
        WorkflowStatus::Cancelled
    } else {
        WorkflowStatus::Succeeded
    };
    let detail = serde_json::json!({
        "tasks": total,
        "failed": own.0,
        "cancelled": own.1,
        "skipped_by_outside_failure": outside.0,
        "skipped_by_outside_cancel": outside.1,
    });
    (status, detail.to_string())
}

/// The refusal of a retry inside a cancelled workflow: the rest of the
/// workflow was cancelled with it and would not follow.
pub(crate) fn retry_in_cancelled_workflow(id: &str, workflow: &str) -> crate::error::Error {
    crate::error::Error::Conflict(format!(
        "task {id} belongs to workflow {workflow}, which was cancelled, so it cannot be retried: submit the workflow again to run it"
    ))
}

/// The persistence contract. Every method is atomic; writes are durable
/// when they return (per `storage.durability`).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Inserts tasks (`pending` until their dependencies and time allow,
    /// then `queued` or `awaiting_approval`), with their workflow and
    /// schedules; a task whose idempotency key exists returns the existing one.
    async fn submit(&self, sub: NewSubmission) -> Result<Vec<Submitted>>;
    /// Atomically moves up to `limit` ready tasks to `running` under a lease.
    async fn claim(&self, req: ClaimRequest) -> Result<Vec<ClaimedTask>>;
    /// Records an attempt and moves the task on, if the worker still holds its lease.
    async fn finish(&self, f: FinishAttempt) -> Result<FinishOutcome>;
    /// Whether the engine should claim a slot's next task with the finish
    /// of its last ([`Store::finish_and_claim`]) rather than free the slot
    /// and claim from the scheduler.
    fn claims_with_finish(&self) -> bool {
        false
    }
    /// [`Store::finish`], and in the same atomic write a claim with `next`
    /// (the engine asks for the task that takes the ended attempt's slot).
    /// The claim is made whatever the finish's outcome. The stores do both
    /// in one transaction; this default does them one after the other.
    async fn finish_and_claim(
        &self,
        f: FinishAttempt,
        next: ClaimRequest,
    ) -> Result<(FinishOutcome, Vec<ClaimedTask>)> {
        let outcome = self.finish(f).await?;
        let claimed = match self.claim(next).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "claim after a finish failed");
                Vec::new()
            }
        };
        Ok((outcome, claimed))
    }
    /// Extends the leases a worker holds on `task_ids` (the attempts it is
    /// running); returns those it still holds. A task leased to the worker
    /// but not named (a claim that committed while its answer was lost)
    /// is not renewed: its lease runs out and it is taken back.
    async fn renew_leases(
        &self,
        worker_id: &str,
        task_ids: &[String],
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<String>>;
    /// Takes running tasks back from lost workers: retrying (attempt counted) or failed.
    async fn reclaim(&self, scope: Reclaim, now: i64) -> Result<Vec<TaskEvent>>;
    /// Cancels a non-terminal task.
    async fn cancel(&self, id: &str, now: i64, reason: Option<String>) -> Result<TaskRecord>;
    /// Cancels every non-terminal task of a workflow; returns the ids cancelled.
    async fn cancel_workflow(
        &self,
        id: &str,
        now: i64,
        reason: Option<String>,
    ) -> Result<Vec<String>>;
    /// Approves (→ queued) or rejects (→ failed) a task in `awaiting_approval`.
    async fn approve(&self, id: &str, d: ApprovalDecision, now: i64) -> Result<TaskRecord>;
    /// Runs a failed, timed-out or cancelled task again (a fresh allowance
    /// of attempts); tasks skipped because of it are decided again.
    async fn retry(&self, id: &str, now: i64) -> Result<TaskRecord>;
    /// Extends one task's lease for the worker holding it.
    async fn heartbeat(
        &self,
        task_id: &str,
        worker_id: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<()>;
    /// Replaces the stored output of an attempt (a service's, when it stops).
    async fn put_logs(&self, task_id: &str, attempt: u32, logs: Vec<StreamLog>) -> Result<()>;
    /// Creates a schedule's next run if its `next_fire_at` is still `expected`;
    /// false if another engine already did.
    async fn fire_schedule(&self, f: FireSchedule) -> Result<bool>;
    /// Pauses, resumes or removes a schedule.
    async fn change_schedule(
        &self,
        id: &str,
        change: ScheduleChange,
        now: i64,
    ) -> Result<Option<ScheduleRecord>>;

    async fn get(&self, id: &str) -> Result<Option<TaskRecord>>;
    async fn list(&self, filter: &TaskFilter) -> Result<Vec<(i64, TaskRecord)>>;
    async fn attempts(&self, id: &str) -> Result<Vec<Attempt>>;
    /// A task and its attempts, read from one snapshot of the store (two
    /// separate reads can show a task finished and its last attempt
    /// missing, or the other way round).
    async fn task_with_attempts(&self, id: &str) -> Result<Option<(TaskRecord, Vec<Attempt>)>>;
    /// The dependency edges of a task: what it waits for and what waits for it.
    async fn dependencies(&self, id: &str) -> Result<Vec<DependencyEdge>>;
    async fn workflow(&self, id: &str) -> Result<Option<WorkflowRecord>>;
    /// The workflow submitted with this idempotency key.
    async fn workflow_by_key(&self, key: &str) -> Result<Option<WorkflowRecord>>;
    /// A workflow with its tasks and edges.
    async fn workflow_detail(&self, id: &str) -> Result<Option<WorkflowDetail>>;
    async fn list_workflows(&self, f: &WorkflowFilter) -> Result<Vec<(i64, WorkflowRecord)>>;
    async fn schedule(&self, id: &str) -> Result<Option<ScheduleRecord>>;
    async fn list_schedules(&self) -> Result<Vec<ScheduleRecord>>;
    /// Unpaused schedules whose upcoming run is due.
    async fn due_schedules(&self, now: i64) -> Result<Vec<ScheduleRecord>>;
    /// The earliest upcoming run time of the unpaused schedules.
    async fn next_schedule_at(&self) -> Result<Option<i64>>;
    async fn logs(&self, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>>;
    async fn audit_events(&self, task_id: Option<&str>, limit: usize) -> Result<Vec<AuditEvent>>;
    /// Task and workflow events after audit sequence `after`, oldest first.
    async fn events_after(
        &self,
        after: i64,
        workflow_id: Option<&str>,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamEvent>>;
    /// The newest audit sequence number (0 when empty).
    async fn last_event_seq(&self) -> Result<i64>;
    async fn verify_audit(&self) -> Result<AuditReport>;
    async fn counts(&self) -> Result<StatusCounts>;
    async fn stats(&self, now: i64) -> Result<QueueStats>;
    /// Tasks a worker with this claim filter could run now, or once their
    /// backoff is over, plus running tasks whose lease has expired (they
    /// will come back). Tasks waiting for a later time (`schedule.at`, a
    /// schedule's next run) are not counted.
    async fn runnable_count(&self, req: &ClaimRequest) -> Result<u64>;
    /// Earliest future time something becomes claimable or a schedule comes
    /// due (retry backoffs, timers), for sleeping precisely.
    async fn next_run_at(&self, now: i64) -> Result<Option<i64>>;

    async fn register_worker(&self, w: WorkerInfo) -> Result<()>;
    /// Stores a token by the SHA-256 of its secret.
    async fn create_token(&self, t: TokenRecord, hash: String) -> Result<()>;
    /// Revokes a token; false if no live token has that id.
    async fn revoke_token(&self, id: &str, now: i64) -> Result<bool>;
    /// The live token whose secret hashes to `hash`.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    /// Every token, revoked ones included.
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>>;
    /// Whether any live token exists (then every HTTP request needs one).
    async fn tokens_exist(&self) -> Result<bool>;
    /// Workers recorded on `host` that hold running tasks.
    async fn workers_with_leases(&self, host: &str) -> Result<Vec<WorkerInfo>>;

    /// Interaction records, search candidates, vectors and the Vectorizer
    /// outbox; `None` when this store keeps no history.
    fn history(&self) -> Option<&dyn history::HistoryStore> {
        None
    }

    /// Committed task state changes.
    fn subscribe(&self) -> broadcast::Receiver<TaskEvent>;
    /// Committed workflow state changes.
    fn subscribe_workflows(&self) -> broadcast::Receiver<WorkflowEvent>;
    /// A signal each time another process sharing the database made work
    /// ready (or may have, after a lost connection), so an idle engine
    /// claims at once. `None` for stores no other process writes to.
    fn subscribe_remote(&self) -> Option<broadcast::Receiver<()>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::collections::HashMap;

    fn keyed_sub(key: Option<&str>) -> NewSubmission {
        NewSubmission {
            workflow: Some(NewWorkflow {
                id: uuid::Uuid::now_v7().to_string(),
                name: "w".into(),
                project: None,
                tags: Vec::new(),
                description: None,
                schedule_id: None,
                idempotency_key: key.map(str::to_string),
                now: 0,
            }),
            ..Default::default()
        }
    }

    fn answered(id: &str, created: bool, workflow: &str) -> Submitted {
        Submitted {
            id: id.into(),
            name: id.into(),
            created,
            status: TaskStatus::Queued,
            schedule_id: None,
            workflow_id: Some(workflow.into()),
        }
    }

    fn wf(s: &NewSubmission) -> &str {
        &s.workflow.as_ref().unwrap().id
    }

    #[test]
    fn a_workflow_key_is_answered_by_the_stored_workflow_or_the_first_in_the_batch() {
        let subs = [
            keyed_sub(Some("a")),
            keyed_sub(None),
            keyed_sub(Some("b")),
            keyed_sub(Some("a")),
            keyed_sub(Some("b")),
            keyed_sub(Some("c")),
            keyed_sub(Some("c")),
            keyed_sub(Some("d")),
            keyed_sub(Some("d")),
        ];
        let refs: Vec<&NewSubmission> = subs.iter().collect();
        let existing = HashMap::from([("b".to_string(), "wb".to_string())]);
        let plan = keyed_as(&refs, &existing);
        assert_eq!(
            plan,
            vec![
                KeyedAs::Fresh,
                KeyedAs::Fresh,
                KeyedAs::Existing("wb".into()),
                KeyedAs::SameAs(0),
                KeyedAs::Existing("wb".into()),
                KeyedAs::Fresh,
                KeyedAs::SameAs(5),
                KeyedAs::Fresh,
                KeyedAs::SameAs(7),
            ]
        );
        assert_eq!(fresh_of(&refs, &plan).len(), 4);
        // The fresh ones: "a" stored with one new task and one answered by
        // another workflow's; the unkeyed one stored; "c" refused; "d"
        // answered whole by an existing workflow (nothing stored).
        let fresh = vec![
            Ok(vec![
                answered("t1", true, wf(&subs[0])),
                answered("tx", false, "wx"),
            ]),
            Ok(vec![answered("t2", true, wf(&subs[1]))]),
            Err(Error::invalid("tasks[0].depends_on[0]", "no task has id x")),
            Ok(vec![answered("ty", false, "wy")]),
        ];
        let stored = HashMap::from([("wb".to_string(), vec![answered("t0", false, "wb")])]);
        let out = answer_keyed(&refs, &plan, fresh, &stored);
        let ids = |r: &Option<Result<Vec<Submitted>>>| {
            r.as_ref().map(|r| {
                r.as_ref()
                    .map(|l| {
                        l.iter()
                            .map(|s| (s.id.clone(), s.created))
                            .collect::<Vec<_>>()
                    })
                    .map_err(|e| e.to_string())
            })
        };
        let one = |id: &str, created: bool| Some(Ok(vec![(id.to_string(), created)]));
        assert_eq!(
            ids(&out[0]),
            Some(Ok(vec![("t1".into(), true), ("tx".into(), false)]))
        );
        assert_eq!(ids(&out[1]), one("t2", true));
        assert_eq!(ids(&out[2]), one("t0", false));
        // The repeat of "a": the workflow "a" stored, its own task only.
        assert_eq!(ids(&out[3]), one("t1", false));
        assert_eq!(ids(&out[4]), one("t0", false));
        assert!(
            matches!(&out[5], Some(Err(Error::InvalidInput { field, .. })) if field == "tasks[0].depends_on[0]")
        );
        // The repeat of the refused "c" is left for another round.
        assert!(out[6].is_none());
        // The repeat of "d": the workflow that answered it.
        assert_eq!(ids(&out[7]), one("ty", false));
        assert_eq!(ids(&out[8]), one("ty", false));
    }

    fn req(worker: &str, limit: usize, now: i64, external: Option<ExternalFilter>) -> ClaimRequest {
        ClaimRequest {
            worker_id: worker.into(),
            now,
            lease_until: now + 1000,
            limit,
            server_kinds: external.is_none(),
            external,
            only: None,
        }
    }

    fn task(id: &str) -> ClaimedTask {
        ClaimedTask {
            id: id.into(),
            name: id.into(),
            kind: TaskKind::Command,
            priority: 0,
            seq: 0,
            attempt: 1,
            max_attempts: 1,
            spec_json: "{}".into(),
            spec_hash: String::new(),
            started_at: 0,
            workflow_id: None,
        }
    }

    #[test]
    fn claims_of_one_worker_and_filter_merge_and_are_dealt_in_order() {
        let a = req("w1", 1, 10, None);
        let b = req("w1", 2, 30, None);
        let c = req("w1", 1, 20, Some(ExternalFilter::default()));
        let d = req("w2", 1, 5, None);
        let requests = [Some(&a), None, Some(&b), Some(&c), Some(&d)];
        let groups = merge_claims(&requests);
        assert_eq!(groups.len(), 3);
        let (merged, members) = &groups[0];
        assert_eq!(
            (merged.limit, merged.now, merged.lease_until),
            (3, 30, 1030)
        );
        assert_eq!(members, &vec![0, 2]);
        assert_eq!(groups[1].1, vec![3]);
        assert_eq!(groups[2].1, vec![4]);

        // Two tasks for three slots: the first member gets one, the second
        // the other; nobody gets more than asked.
        let mut out = vec![Vec::new(); requests.len()];
        deal_claims(vec![task("t1"), task("t2")], members, &requests, &mut out);
        let ids = |v: &Vec<ClaimedTask>| v.iter().map(|t| t.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&out[0]), ["t1"]);
        assert_eq!(ids(&out[2]), ["t2"]);
        assert!(out[1].is_empty() && out[3].is_empty() && out[4].is_empty());
    }
}
