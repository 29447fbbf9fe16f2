//! The task state machine.
//!
//! ```text
//!   submit ──► pending ──(dependencies met, time come)──► queued ──claim──► running ──► succeeded
//!     │          │                     └─(requires_approval)─► awaiting_approval ─approve─► queued
//!     │          │                                                      └─reject─► failed
//!     │          └─(a dependency condition can no longer hold)─► skipped
//!     └─(no dependencies, no future time)─► queued
//!                                       running ──► failed / timed_out   (attempts exhausted or fatal error)
//!                                          │  └───► retrying ──(run_at)──► claimed again
//!                                          └─ lease lost (crash) ──► retrying / failed
//!   cancel: any non-terminal state ──► cancelled
//! ```
//!
//! Only the engine's scheduler and the store's writer move tasks between
//! states, and every move is an audit event.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where a task is in its life.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Waiting on dependencies or its time (`schedule`). Entered at submit;
    /// left in the store's writer when the last dependency is met and the
    /// time has come (→ queued, or awaiting_approval), or when a dependency
    /// condition can no longer hold (→ skipped).
    Pending,
    /// Ready to run. Entered at submit (no dependencies) or from pending;
    /// left when a worker claims it (→ running) or on cancel.
    Queued,
    /// A worker holds its lease and is executing it. Left when the attempt
    /// ends (→ succeeded, failed, timed_out, retrying), the lease expires
    /// (→ retrying or failed) or it is cancelled (its processes are stopped).
    Running,
    /// Waiting for a person or agent to approve it (`requires_approval`),
    /// entered when it would otherwise be queued; approve → queued,
    /// reject → failed.
    AwaitingApproval,
    /// An attempt failed and the next one waits for its backoff (`run_at`);
    /// a worker claims it again when that time comes.
    Retrying,
    /// Terminal: the last attempt succeeded.
    Succeeded,
    /// Terminal: the last attempt failed, or failed with a fatal error
    /// (integrity, bad result, spawn error), or its lease was lost with no
    /// attempts left.
    Failed,
    /// Terminal: the last attempt ran past its timeout and was killed.
    TimedOut,
    /// Terminal: cancelled by a user before it finished.
    Cancelled,
    /// Terminal: a dependency condition can no longer be met.
    Skipped,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 10] = [
        TaskStatus::Pending,
        TaskStatus::Queued,
        TaskStatus::Running,
        TaskStatus::AwaitingApproval,
        TaskStatus::Retrying,
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Cancelled,
        TaskStatus::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Queued => "queued",
            TaskStatus::Running => "running",
            TaskStatus::AwaitingApproval => "awaiting_approval",
            TaskStatus::Retrying => "retrying",
            TaskStatus::Succeeded => "succeeded",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
            TaskStatus::Skipped => "skipped",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Succeeded
                | TaskStatus::Failed
                | TaskStatus::TimedOut
                | TaskStatus::Cancelled
                | TaskStatus::Skipped
        )
    }
}

impl std::fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TaskStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        TaskStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<_> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
                format!("unknown status {s:?}; expected one of {}", all.join(", "))
            })
    }
}
