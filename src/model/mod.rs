//! Plain data: task specs, statuses, records and the small value types they use.
//!
//! Nothing here touches the store or the engine; everything is serde and
//! schemars so every interface can share it.

pub mod cron;
mod parse;
mod record;
mod spec;
mod status;
mod units;
mod workflow;

pub use parse::{
    MAX_BATCH_TASKS, MAX_FILE_BYTES, Submission, TaskFile, canonical_json, from_value, json_kind,
    json_strict, parse_document, parse_task_file,
};
pub use record::{
    Artifact, Attempt, AttemptStatus, LogChunk, TaskEvent, TaskRecord, TaskResult, WorkflowEvent,
};
pub(crate) use spec::check_text;
pub use spec::{
    Condition, Dependency, HealthCheck, HttpSpec, Limits, MAX_SPEC_BYTES, RetryPolicy, Schedule,
    TaskKind, TaskSpec, validate_name,
};
pub use status::TaskStatus;
pub use units::{ByteSize, Dur, Timestamp};
pub use workflow::{
    Approval, DependencyEdge, EdgeState, ScheduleRecord, Workflow, WorkflowDetail, WorkflowRecord,
    WorkflowSpec, WorkflowStatus,
};

/// The builder name used in examples: `Task::new("build").with_command("make")`.
pub type Task = TaskSpec;
