//! # task-queue
//!
//! An MCP-first task orchestration server: a durable queue that runs
//! commands with priorities, retries, timeouts and resource limits,
//! survives crashes without losing or double-running a task, and records
//! every transition in a hash-chained audit trail.
//!
//! ```no_run
//! # async fn demo() -> task_queue::Result<()> {
//! use task_queue::{Task, TaskQueue};
//! let queue = TaskQueue::open("./data/task-queue.db").await?;
//! let t = queue.submit(Task::new("hello").with_command("echo hello")).await?;
//! queue.run_until_idle().await?;
//! assert_eq!(queue.get(&t.id).await?.status, task_queue::model::TaskStatus::Succeeded);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! * [`service`] — `TaskQueue`, the one API every interface calls (submit,
//!   get, list, cancel, wait, handlers, engine start).
//! * [`model`] — plain data: task specs and their validation, statuses (the
//!   state machine is documented on `TaskStatus`), records, durations.
//! * [`store`] — the `Store` trait; [`store::sqlite`] is the embedded store
//!   (one group-committing writer, a read pool, WAL).
//! * [`engine`] — the scheduler loop (claims, runs, finishes), lease renewal
//!   and reclaim, retry decisions, crash recovery, the injected clock.
//! * [`executor`] — one attempt: child processes (process groups, rlimits,
//!   timeouts, output capture, the crash guard), in-process handlers, result
//!   files, validation, artifacts.
//! * [`integrity`] — spec hashing and the audit hash chain.
//! * [`config`] — `config.yml` sections and defaults.
//! * [`cli`] — the `task-queue` command line; [`bench`] — `task-queue bench`.
//! * [`error`] — the core error type and its codes.

pub mod bench;
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod executor;
pub mod integrity;
pub mod model;
pub mod service;
pub mod store;

pub use config::Config;
pub use engine::EngineHandle;
pub use error::{Error, Result};
pub use executor::{HandlerError, TaskContext};
pub use model::{Task, TaskSpec, TaskStatus};
pub use service::{ListOptions, TaskQueue};
pub use store::Submitted;
