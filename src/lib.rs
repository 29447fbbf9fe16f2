//! # task-queue
//!
//! An MCP-first task orchestration server: a durable queue that runs
//! commands, HTTP calls and external work as tasks and workflows (DAGs with
//! conditions, approvals, service tasks and cron schedules), with
//! priorities, retries, timeouts and resource limits; it survives crashes
//! without losing or double-running a task, and records every transition in
//! a hash-chained audit trail.
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
//! * [`service`] — `TaskQueue`, the one API every interface calls: submit
//!   tasks and workflows (`service::prepare` turns specs into rows: defaults,
//!   graph, schedules, hashes), get, list, cancel, wait, approvals,
//!   schedules, the external-worker protocol (claim, heartbeat, complete,
//!   fail), handlers, search and recommend, engine start.
//! * [`model`] — plain data: task and workflow specs and their validation,
//!   statuses (the state machine is documented on `TaskStatus`), records,
//!   cron expressions, durations.
//! * [`workflow`] — the dependency graph: submit-time checks (cycles,
//!   unknown names) and Mermaid/DOT export.
//! * [`store`] — the `Store` trait; [`store::sqlite`] is the embedded store
//!   (one group-committing writer, on its own thread with a synchronous
//!   connection, that also resolves dependents, moves workflow counters,
//!   marks finished attempts for interaction records in the same
//!   transaction (the records are written in bulk, and before any read of
//!   the history) and merges the claims that come with finishes; the WAL
//!   sync of a durable commit and the checkpoints run on threads beside it,
//!   and a batch is answered once its sync is done; point reads inline on synchronous
//!   read-only connections; a read pool for the rest (a read of several
//!   queries, such as a task with its attempts, runs in one read
//!   transaction); WAL, which a busy durable
//!   store fills ahead of its writes once so commits overwrite instead of
//!   growing the file; `storage_floor` times the writer's own inserts
//!   alone, for `bench submit --batch`); [`store::postgres`] is the same design
//!   for several nodes on one PostgreSQL database (`SKIP LOCKED` claims,
//!   row locks, the audit chain under an advisory lock, `LISTEN/NOTIFY`
//!   wake-ups). Migrations for both live in `migrations/sqlite` and
//!   `migrations/postgres`. [`store::history`] is what search needs from a
//!   store (word and substring candidates, vectors, the Vectorizer
//!   outbox): FTS5 on SQLite, `tsvector` and pg_trgm on PostgreSQL.
//! * [`search`] — history search and recommendations: query words,
//!   synonyms and quoting (`query`), rank fusion, boosts and snippets
//!   (`rank`); the tiers of one search run side by side;
//!   `recommend`, the `Embedder` tier (`embed`; the in-process model behind
//!   the `local-embeddings` feature in `local`), the Vectorizer client and
//!   outbox delivery (`vectorizer`), the labelled evaluation (`eval`).
//! * [`engine`] — the scheduler loop (coalesced claims, two in flight,
//!   runs, finishes that claim their slot's next task where the store
//!   supports it, fires due schedules), lease renewal and reclaim, retry
//!   decisions, crash recovery, service-task lifetimes, history upkeep
//!   (retention, embedding backfill, Vectorizer delivery), the injected
//!   clock.
//! * [`executor`] — one attempt: child processes (started with
//!   `clone(CLONE_VM)`, not fork; process groups, rlimits, timeouts,
//!   output capture, the crash guard), service tasks with health
//!   checks, HTTP requests, in-process handlers, result files, validation,
//!   artifacts.
//! * [`mcp`] — the MCP server (rmcp): tools, resources, the legacy
//!   HTTP+SSE transport, and the stdio line checker that answers lines the
//!   library would drop.
//! * [`rest`] — the REST API under `/api/v1` (thin handlers, one error
//!   shape, SSE events from the audit chain, the OpenAPI document built from
//!   the types), `/health`, `/metrics`.
//! * [`server`] — `task-queue serve`: one axum server with REST, MCP
//!   (`/mcp`, `/sse`, `/messages`) and the engine; Host and Origin checks,
//!   tokens and roles (MCP tools check theirs per call), body limit,
//!   graceful shutdown.
//! * [`client`] — a reqwest client of the REST API, used by the CLI's
//!   `--server` commands; server errors map back to [`Error`] variants.
//!   (`clients/python` and `clients/typescript`, outside the crate, are
//!   the Python and TypeScript clients of the same API.)
//! * [`integrity`] — spec hashing and the audit hash chain.
//! * [`config`] — `config.yml` sections, defaults, and
//!   `TASK_QUEUE_<SECTION>__<KEY>` overrides.
//! * [`cli`] — the `task-queue` command line; [`bench`] — `task-queue bench`.
//! * [`error`] — the core error type and its codes.

/// `println!` for a command's output that tolerates a reader that went
/// away (`task-queue run tasks.yaml --json | head -c 100`). The commands
/// that run the engine keep SIGPIPE ignored (see
/// [`cli::Cli::default_sigpipe`]), so such a write fails instead of ending
/// the process; the rest of the output is then dropped quietly, where
/// `println!` would panic.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::write_out(format_args!($($arg)*))
    };
}

pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod engine;
pub mod error;
pub mod executor;
pub mod integrity;
pub mod mcp;
pub mod model;
pub mod rest;
pub mod search;
pub mod server;
pub mod service;
pub mod store;
pub mod workflow;

pub use config::Config;
pub use engine::EngineHandle;
pub use error::{Error, Result};
pub use executor::{HandlerError, TaskContext};
pub use model::{Task, TaskSpec, TaskStatus, Workflow, WorkflowSpec, WorkflowStatus};
pub use service::{ClaimFilter, ClaimedWork, ListOptions, TaskQueue, WorkflowSubmitted};
pub use store::Submitted;
