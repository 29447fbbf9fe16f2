//! Workflows (SPEC §3): task specs submitted together under one name, and
//! the records and schedules the store keeps for them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::record::TaskRecord;
use super::spec::{Condition, Schedule, TaskSpec, check_description, check_text, validate_name};
use super::status::TaskStatus;
use super::units::Timestamp;
use crate::error::{Error, Result};

/// A workflow as submitted: `{name, project, tags, description, schedule, idempotency_key, tasks}`.
/// Build one in code with [`WorkflowSpec::new`] and [`WorkflowSpec::add_task`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowSpec {
    /// 1–128 characters of `[A-Za-z0-9_.:-]`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub name: String,
    /// Project of every task that does not name its own (1–128 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub project: Option<String>,
    /// Labels of the workflow (tasks keep their own): at most 32, each 1–64
    /// characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Run the whole workflow once at a time, or on a cron schedule (each
    /// firing is a new workflow run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The tasks (1 to 100,000); `depends_on` refers to their names.
    #[schemars(length(min = 1, max = 100000))]
    pub tasks: Vec<TaskSpec>,
    /// A second submit with the same key returns the first workflow (its id,
    /// status and tasks) and stores nothing (1–256 characters). A schedule's
    /// runs do not carry it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub idempotency_key: Option<String>,
}

/// The builder name used in examples: `Workflow::new("deploy").add_task(..)`.
pub type Workflow = WorkflowSpec;

impl WorkflowSpec {
    pub fn new(name: impl Into<String>) -> Self {
        WorkflowSpec {
            name: name.into(),
            project: None,
            tags: Vec::new(),
            description: None,
            schedule: None,
            tasks: Vec::new(),
            idempotency_key: None,
        }
    }
    pub fn with_project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into());
        self
    }
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    pub fn with_description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }
    /// See [`WorkflowSpec::idempotency_key`].
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    pub fn with_schedule(mut self, s: Schedule) -> Self {
        self.schedule = Some(s);
        self
    }
    pub fn add_task(mut self, task: impl Into<TaskSpec>) -> Self {
        self.tasks.push(task.into());
        self
    }

    /// Checks the workflow's own fields (the tasks are checked by the submit).
    pub fn validate_header(&self) -> Result<()> {
        validate_name(&self.name)?;
        if let Some(p) = &self.project {
            check_text("project", p, 128)?;
        }
        if self.tags.len() > 32 {
            return Err(Error::invalid("tags", "at most 32 tags"));
        }
        for (i, t) in self.tags.iter().enumerate() {
            check_text(&format!("tags[{i}]"), t, 64)?;
        }
        if let Some(d) = &self.description {
            check_description(d)?;
        }
        if self.tasks.is_empty() {
            return Err(Error::invalid("tasks", "must list at least one task"));
        }
        if let Some(k) = &self.idempotency_key {
            check_text("idempotency_key", k, 256)?;
        }
        Ok(())
    }
}

/// Where a workflow is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// Some task has not finished.
    Running,
    /// Every task succeeded or was skipped by design.
    Succeeded,
    /// Some task failed or timed out, or was skipped because a task outside
    /// the workflow that it depends on did.
    Failed,
    /// The workflow (or, with nothing failed, one of its tasks, or a task
    /// outside it that one of its tasks depends on) was cancelled.
    Cancelled,
}

impl WorkflowStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowStatus::Running => "running",
            WorkflowStatus::Succeeded => "succeeded",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::Cancelled => "cancelled",
        }
    }
    pub fn is_terminal(self) -> bool {
        self != WorkflowStatus::Running
    }
}

impl std::fmt::Display for WorkflowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WorkflowStatus {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "running" => WorkflowStatus::Running,
            "succeeded" => WorkflowStatus::Succeeded,
            "failed" => WorkflowStatus::Failed,
            "cancelled" => WorkflowStatus::Cancelled,
            other => return Err(format!("unknown workflow status {other:?}")),
        })
    }
}

/// A workflow as the store knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowRecord {
    pub id: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub status: WorkflowStatus,
    /// The schedule whose firing created this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule_id: Option<String>,
    pub tasks_total: u64,
    /// Tasks in a terminal state.
    pub tasks_done: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The key it was submitted with; submitting again with it returns
    /// this workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// Whether a dependency edge's condition held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum EdgeState {
    /// The dependency has not finished.
    Waiting,
    /// The condition held.
    Met,
    /// The condition can no longer hold (the dependent was skipped).
    Unmet,
}

impl EdgeState {
    pub fn as_str(self) -> &'static str {
        match self {
            EdgeState::Waiting => "waiting",
            EdgeState::Met => "met",
            EdgeState::Unmet => "unmet",
        }
    }
    pub fn parse(s: &str) -> Self {
        match s {
            "met" => EdgeState::Met,
            "unmet" => EdgeState::Unmet,
            _ => EdgeState::Waiting,
        }
    }
}

/// A dependency edge: `task_id` waits for `dep_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DependencyEdge {
    /// The task depended on.
    pub dep_id: String,
    /// The dependent task.
    pub task_id: String,
    pub condition: Condition,
    pub state: EdgeState,
}

/// A workflow with its tasks and dependency edges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WorkflowDetail {
    #[serde(flatten)]
    pub workflow: WorkflowRecord,
    /// Task counts by status.
    pub counts: BTreeMap<TaskStatus, u64>,
    /// The tasks in submission order.
    pub tasks: Vec<TaskRecord>,
    pub edges: Vec<DependencyEdge>,
}

/// A recurring schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ScheduleRecord {
    pub id: String,
    /// The task's or workflow's name.
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub cron: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    pub paused: bool,
    /// When the upcoming run starts; absent while paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_fire_at: Option<Timestamp>,
    /// Task id (task schedules) or workflow id of the upcoming run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcoming_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fired_at: Option<Timestamp>,
    /// Runs fired so far (the upcoming one not counted).
    pub runs: u64,
    pub created_at: Timestamp,
    /// What each firing submits (a task list or a workflow), as JSON.
    pub template: serde_json::Value,
}

/// An approval decision on a task that required one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Approval {
    pub approved: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Who decided, as they said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    pub at: Timestamp,
}
