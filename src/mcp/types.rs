//! Inputs and outputs of the MCP tools. Doc comments become the field
//! descriptions a model reads, so they say what to pass and what comes back.

use std::borrow::Cow;
use std::marker::PhantomData;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{Attempt, TaskRecord, TaskStatus, Timestamp, WorkflowDetail};
use crate::service::ClaimedWork;

/// Arguments received as raw JSON, advertised with `T`'s schema. Parsing
/// happens in the tool, so a bad argument becomes a tool error that names
/// the field (`isError: true`) instead of a protocol error.
#[derive(Debug, Deserialize)]
#[serde(transparent)]
pub struct Raw<T> {
    pub value: Value,
    #[serde(skip)]
    _t: PhantomData<T>,
}

impl<T: JsonSchema> JsonSchema for Raw<T> {
    fn schema_name() -> Cow<'static, str> {
        T::schema_name()
    }
    fn schema_id() -> Cow<'static, str> {
        T::schema_id()
    }
    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        T::json_schema(generator)
    }
    fn inline_schema() -> bool {
        T::inline_schema()
    }
}

/// `get_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetTaskArgs {
    /// The task id (a UUID returned by submit_task, submit_workflow or list_tasks).
    pub id: String,
    /// Also return every attempt (exit code, duration, error) — default true.
    #[serde(default)]
    pub include_attempts: Option<bool>,
}

/// `list_tasks` input. All filters are optional and combine with AND.
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListTasksArgs {
    /// Only tasks in these statuses.
    #[serde(default)]
    pub status: Vec<TaskStatus>,
    /// Only tasks of this project.
    #[serde(default)]
    pub project: Option<String>,
    /// Only tasks carrying this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// Only tasks with exactly this name.
    #[serde(default)]
    pub name: Option<String>,
    /// Only tasks of this workflow.
    #[serde(default)]
    pub workflow_id: Option<String>,
    /// Page size, 1..=200 (default 20).
    #[serde(default)]
    #[schemars(range(min = 1, max = 200))]
    pub limit: Option<usize>,
    /// `next_cursor` from the previous page.
    #[serde(default)]
    pub cursor: Option<String>,
}

/// `get_workflow` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GetWorkflowArgs {
    /// The workflow id returned by submit_workflow.
    pub id: String,
    /// Graph format in the answer: `mermaid` (default), `dot` or `none`.
    #[serde(default)]
    pub graph: Option<String>,
}

/// `wait_for_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitArgs {
    /// The task id to wait for.
    pub id: String,
    /// Longest wait in seconds, 1..=50 (default 30). When it runs out the
    /// current state comes back with `done: false`; call again to keep waiting.
    #[serde(default)]
    #[schemars(range(min = 1, max = 50))]
    pub timeout_seconds: Option<u64>,
}

/// Input naming one task.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskIdArgs {
    /// The task id.
    pub id: String,
}

/// `approve_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveArgs {
    /// The id of a task in `awaiting_approval`.
    pub id: String,
    /// true approves (the task is queued); false rejects (the task fails, so
    /// its `failure` dependents run and its `success` dependents are skipped).
    pub approve: bool,
    /// Why, recorded with the decision and in the audit trail (at most
    /// 4096 bytes).
    #[serde(default)]
    pub comment: Option<String>,
    /// Who decides (default: "mcp"; at most 256 bytes).
    #[serde(default)]
    pub by: Option<String>,
}

/// `get_task_logs` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogsArgs {
    /// The task id.
    pub id: String,
    /// Only this attempt (1-based); default: every attempt.
    #[serde(default)]
    pub attempt: Option<u32>,
    /// `stdout` or `stderr`; default both.
    #[serde(default)]
    #[schemars(regex(pattern = r"^(stdout|stderr)$"))]
    pub stream: Option<String>,
    /// Return only the last N bytes of each stream (the usual choice for a failure).
    #[serde(default)]
    pub tail: Option<usize>,
    /// Start at this byte offset of each stream (to page forward; use `next_offset`).
    #[serde(default)]
    pub offset: Option<usize>,
    /// Most bytes per stream in this answer, 1..=262144 (default 16384).
    #[serde(default)]
    #[schemars(range(min = 1, max = 262144))]
    pub limit: Option<usize>,
}

/// `claim_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ClaimArgs {
    /// Your worker id (1–128 of `[A-Za-z0-9_.:@-]`); use the same id for
    /// heartbeat_task, complete_task and fail_task.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub worker_id: String,
    /// Only external tasks with these names (default: any; at most 1000).
    #[serde(default)]
    #[schemars(length(max = 1000))]
    pub names: Vec<String>,
    /// Only tasks of this project.
    #[serde(default)]
    pub project: Option<String>,
    /// Only tasks carrying all these tags (at most 32).
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub tags: Vec<String>,
    /// Lease in seconds, 1..=3600 (default 300). Renew with heartbeat_task
    /// before it ends, or the task goes back to the queue.
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub lease_seconds: Option<u64>,
    /// Most tasks to take, 1..=100 (default 1).
    #[serde(default)]
    #[schemars(range(min = 1, max = 100))]
    pub limit: Option<usize>,
}

/// `heartbeat_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatArgs {
    /// The claimed task's id.
    pub id: String,
    /// The worker id used to claim it.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub worker_id: String,
    /// New lease in seconds from now, 1..=3600 (default 300).
    #[serde(default)]
    #[schemars(range(min = 1, max = 3600))]
    pub lease_seconds: Option<u64>,
}

/// `complete_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteArgs {
    /// The claimed task's id.
    pub id: String,
    /// The worker id used to claim it.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub worker_id: String,
    /// The result (any JSON, usually an object; at most 4 MiB). If the task has a
    /// `validation` schema the output must match it, else the call fails
    /// and the task stays yours to complete again.
    #[serde(default)]
    pub output: Option<Value>,
}

/// `fail_task` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailArgs {
    /// The claimed task's id.
    pub id: String,
    /// The worker id used to claim it.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:@-]+$"))]
    pub worker_id: String,
    /// What went wrong, in words.
    #[schemars(length(min = 1, max = 16384))]
    pub error: String,
    /// true (default): retry per the task's policy while attempts remain;
    /// false: fail now.
    #[serde(default)]
    pub retryable: Option<bool>,
}

/// `search_tasks` input.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    /// What you are looking for, in your own words or by (part of) a task
    /// name: "ship the backend", "ploy", "pg_dump failed". Matches names,
    /// descriptions, commands, tags, parameters, errors, output and
    /// artifacts, with synonyms for common software-work vocabulary.
    pub query: String,
    /// Only tasks of this project.
    #[serde(default)]
    pub project: Option<String>,
    /// Only runs that ended so: succeeded, failed, timed_out, cancelled.
    #[serde(default)]
    pub status: Vec<TaskStatus>,
    /// Only tasks carrying all these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Only runs finished at or after this time (RFC 3339).
    #[serde(default)]
    pub since: Option<Timestamp>,
    /// Only runs finished before this time (RFC 3339).
    #[serde(default)]
    pub until: Option<Timestamp>,
    /// Most hits, 1..=50 (default 10).
    #[serde(default)]
    #[schemars(range(min = 1, max = 50))]
    pub limit: Option<usize>,
}

impl SearchArgs {
    pub fn into_request(self) -> crate::search::SearchRequest {
        crate::search::SearchRequest {
            query: self.query,
            project: self.project,
            statuses: self.status,
            tags: self.tags,
            since: self.since,
            until: self.until,
            limit: self.limit.unwrap_or(10),
            prefer_project: None,
        }
    }
}

/// `recommend` input: describe the task you are about to run.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecommendArgs {
    /// The task's name (its past runs are the best evidence).
    #[serde(default)]
    pub name: Option<String>,
    /// The command it will run.
    #[serde(default)]
    pub command: Option<String>,
    /// What it does, in words.
    #[serde(default)]
    pub description: Option<String>,
    /// Its project: runs of this project count first.
    #[serde(default)]
    pub project: Option<String>,
}

impl RecommendArgs {
    pub fn into_request(self) -> crate::search::recommend::RecommendRequest {
        crate::search::recommend::RecommendRequest {
            name: self.name,
            command: self.command,
            description: self.description,
            project: self.project,
        }
    }
}

/// `queue_stats` input (none).
#[derive(Debug, Default, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// One task.
#[derive(Debug, Serialize, JsonSchema)]
pub struct TaskOut {
    pub task: TaskRecord,
    /// Every attempt, oldest first (get_task only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<Vec<Attempt>>,
}

/// A workflow with its tasks, edges and graph.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WorkflowOut {
    #[serde(flatten)]
    pub workflow: WorkflowDetail,
    /// The graph in the requested format, nodes styled by status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub graph: Option<String>,
}

/// The answer of wait_for_task.
#[derive(Debug, Serialize, JsonSchema)]
pub struct WaitOut {
    /// true when the task reached a terminal state.
    pub done: bool,
    pub waited_ms: u64,
    pub task: TaskRecord,
}

/// A slice of one captured stream.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogSlice {
    pub attempt: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// Byte offset of `text` in the stream.
    pub offset: usize,
    pub text: String,
    /// Bytes captured for this stream.
    pub total_bytes: usize,
    /// Offset to pass to read on; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<usize>,
    /// Bytes the process wrote beyond `limits.max_output_bytes` (not kept).
    pub dropped_bytes: u64,
}

/// Output of get_task_logs.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct LogsOut {
    pub task_id: String,
    pub logs: Vec<LogSlice>,
}

/// Output of claim_task.
#[derive(Debug, Serialize, JsonSchema)]
pub struct ClaimOut {
    /// The tasks now leased to you (empty when nothing matched).
    pub tasks: Vec<ClaimedWork>,
}

/// Output of heartbeat_task.
#[derive(Debug, Serialize, JsonSchema)]
pub struct HeartbeatOut {
    pub task_id: String,
    pub lease_expires_at: Timestamp,
}

/// Output of search_tasks.
pub type SearchOut = crate::search::SearchResults;

/// Output of recommend.
pub type RecommendOut = crate::search::recommend::Recommendation;
