//! What the store remembers about tasks: records, attempts, results, events.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{TaskKind, TaskSpec};
use super::status::TaskStatus;
use super::units::Timestamp;
use super::workflow::{Approval, WorkflowStatus};

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A file a task produced, recorded after success.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Artifact {
    /// The path as given in the spec.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the file's content.
    pub sha256: String,
}

/// The outcome of a task's latest finished attempt.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskResult {
    /// The JSON object the command wrote to `$TASK_QUEUE_RESULT`, or a handler's return value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended the process, if any (e.g. 9 for SIGKILL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    pub duration_ms: u64,
    /// 1-based attempt number this result comes from.
    pub attempt: u32,
    /// The last few KiB of stdout.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stdout_tail: String,
    /// The last few KiB of stderr.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stderr_tail: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AttemptStatus {
    Succeeded,
    Failed,
    TimedOut,
    /// Stopped because the task was cancelled.
    Cancelled,
    /// The worker running it disappeared (crash, kill -9) and its lease expired.
    Lost,
}

impl AttemptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptStatus::Succeeded => "succeeded",
            AttemptStatus::Failed => "failed",
            AttemptStatus::TimedOut => "timed_out",
            AttemptStatus::Cancelled => "cancelled",
            AttemptStatus::Lost => "lost",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "succeeded" => AttemptStatus::Succeeded,
            "failed" => AttemptStatus::Failed,
            "timed_out" => AttemptStatus::TimedOut,
            "cancelled" => AttemptStatus::Cancelled,
            "lost" => AttemptStatus::Lost,
            _ => return None,
        })
    }
}

/// One execution of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Attempt {
    pub task_id: String,
    /// The engine instance that ran it.
    pub worker_id: String,
    pub status: AttemptStatus,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
    /// Why it failed, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The attempt's result; its `attempt` field is the 1-based attempt number.
    #[serde(flatten)]
    pub result: TaskResult,
}

/// A stored log stream of one attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LogChunk {
    pub attempt: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub text: String,
    /// Bytes dropped beyond `limits.max_output_bytes`.
    pub dropped_bytes: u64,
}

/// A task as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskRecord {
    pub id: String,
    pub name: String,
    pub kind: TaskKind,
    pub status: TaskStatus,
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Attempts started so far.
    pub attempts: u32,
    pub max_attempts: u32,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Earliest time the next attempt may start (for `retrying`).
    pub run_at: Timestamp,
    /// The engine instance holding the lease while `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_expires_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<TaskResult>,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The workflow the task belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    /// The schedule whose firing created the task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    /// Dependencies not yet resolved (while `pending`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub deps_pending: u32,
    /// The approval decision, for tasks that required one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Hex SHA-256 of the canonical spec, fixed at submit.
    pub spec_hash: String,
    /// The spec with configured defaults filled in.
    pub spec: TaskSpec,
}

/// A state change, broadcast after it is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TaskEvent {
    pub task_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow_id: Option<String>,
    pub name: String,
    pub status: TaskStatus,
    pub attempt: u32,
    pub at: Timestamp,
}

/// A workflow state change, broadcast after it is committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowEvent {
    pub workflow_id: String,
    pub name: String,
    pub status: WorkflowStatus,
    pub at: Timestamp,
}
