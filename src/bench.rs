//! `task-queue bench`: throughput and latency, each with a baseline measured in the same run.
//!
//! ```text
//! task-queue bench submit  [--tasks N] [--concurrency C] [--batch B] [--history H] [--json]
//! task-queue bench noop    [--tasks N] [--concurrency C] [--history H] [--json]
//! task-queue bench noop    --db postgres://... [--nodes N] [--tasks N] [--concurrency C] [--json]
//! task-queue bench command [--tasks N] [--concurrency C] [--history H] [--json]
//! task-queue bench dag     [--tasks N] [--concurrency C] [--json]
//! task-queue bench mcp     [--tasks N] [--json]
//! task-queue bench http    [--tasks N] [--concurrency C] [--json]
//! ```
//!
//! Every run works on a fresh database in a new directory that is removed at
//! the end: under the system temp directory, or, when `--db`/`storage.path`
//! names a non-default file, next to that file (so a benchmark can target a
//! particular disk). The named database itself is never opened. The store
//! is opened with the configured `storage.durability` (default: durable,
//! the WAL synced before any write is answered) and
//! `storage.read_connections`.
//!
//! Scenarios:
//!
//! * `submit`: C submitters call `TaskQueue::submit` (or `submit_batch`
//!   with `--batch B`) until N tasks are stored. Latency is per call.
//!   Baseline: the same rows inserted with raw sqlx into a plain table (no
//!   indexes, no audit) in a separate SQLite file with the same settings,
//!   from one connection, one durable transaction per row (per B rows with
//!   `--batch`) — a queue without group commit. With `--batch` also the
//!   storage floor (`store::sqlite::storage_floor`): the same task rows
//!   and audit events by SQLite alone, every value computed beforehand,
//!   no sync, its checkpoint timed apart — what no implementation of the
//!   schema with the store's settings can beat on the machine.
//! * `noop`: N external tasks are submitted first (not timed), then an
//!   in-process no-op handler drains them with C slots. Latency per task is
//!   the time from the commit of its claim to the commit of its finish, as
//!   seen by a subscriber of the store's committed events. Baseline: the
//!   same handler over an in-memory tokio mpsc queue with C workers.
//! * `command`: like `noop`, but each task runs `true` (argv, no shell).
//!   Baseline: spawning `true` with tokio (`posix_spawn`), C at a time; a
//!   second one (`baseline_fork`) adds a no-op `pre_exec` hook, which forces
//!   std onto fork+exec: what the executor would pay if it used std's
//!   `Command` with its set-up steps (it clones with `CLONE_VM` instead,
//!   see `executor::spawn`). `executor_alone` runs the engine's executor
//!   (`executor::run_command`) the same way without the store: the part of
//!   the gap that is the executor's own.
//!
//! * `dag`: a workflow of N no-op external tasks in layers of 100, each
//!   depending on two tasks of the layer before, drained by one handler
//!   registered for `dag-*`. Baseline: the `noop` scenario with N
//!   independent tasks, run first on the same database; the result is the
//!   ratio of time per task (goal: at most 2).
//!
//! * `mcp`: starts `task-queue mcp` as a child process on its own database
//!   and calls `submit_task` N times, then `get_task` N times, one request
//!   at a time over stdio, timing each round trip. Baseline: the same calls
//!   on the service API in-process.
//!
//! * `http`: the server's router on a loopback port with the engine; C
//!   clients (HTTP/1.1 keep-alive) submit N external tasks with
//!   `POST /api/v1/tasks`, then `GET` each one. Baseline: the same submits
//!   on the service API in-process with C callers.
//!
//! `--history H` first inserts H finished tasks directly (multi-row INSERTs,
//! no audit or attempt rows), then runs the scenario; `submit` then also
//! times claims (`claim`: sequential `Store::claim` calls of one task, with
//! and without a handler name in the request, and the claim SELECT alone).
//!
//! `claim_plan` is `explain_claim` (the command-only claim query) taken when
//! the measured tasks are queued; `noop` adds `claim_plan_with_handlers`, the
//! plan of the query the engine really sends when handlers are registered.
//!
//! With a PostgreSQL `--db`, only `noop` runs, drained by `--nodes` nodes
//! at once: see [`postgres`].
//!
//! Peak RSS is `VmHWM` from `/proc/self/status`, reset through
//! `/proc/self/clear_refs` just before the measured phase, so it is the
//! peak while the queue does the measured work (baselines run afterwards).

mod postgres;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::{AssertSqlSafe, Connection};
use tokio::sync::{Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;

use crate::config::{Config, Durability, StorageConfig};
use crate::engine::clock::{Clock, SystemClock};
use crate::error::{Error, Result};
use crate::executor::{HandlerError, TaskContext};
use crate::model::{MAX_BATCH_TASKS, Task, TaskEvent, TaskKind, TaskSpec, TaskStatus};
use crate::service::TaskQueue;
use crate::store::ClaimRequest;
use crate::store::sqlite::{
    FloorTask, SqliteStore, claim_sql, connect_raw, explain_claim, storage_floor,
};

/// Arguments of `task-queue bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Tasks to submit or run.
    #[arg(long, default_value_t = 10_000)]
    pub tasks: usize,
    /// Submitters (`submit`, default 64) or engine slots (`noop`, default 100; `command`, default 64).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// `submit` only: tasks per `submit_batch` call (default 1: single submits).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Finished tasks to insert before measuring (history the queue has to live with).
    #[arg(long)]
    pub history: Option<usize>,
    /// Nodes draining the queue at once (`noop` on a PostgreSQL `--db` only; default 1).
    #[arg(long)]
    pub nodes: Option<usize>,
    /// `search` only: add the semantic tier, with the configured
    /// `search.embedder` (each query pays its inference), or else a
    /// built-in hashing embedder of 384 dimensions (the vector scan and
    /// fusion without a model's inference time).
    #[arg(long)]
    pub semantic: bool,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// A benchmark scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Concurrent durable submits (single or batched).
    Submit,
    /// Claim and complete no-op tasks with an in-process handler.
    Noop,
    /// Claim and run `true` as a child process.
    Command,
    /// A layered workflow of no-op tasks: dependency resolution per task,
    /// against `noop` with the same task count in the same run.
    Dag,
    /// MCP tool-call latency over stdio (`submit_task`, `get_task`) against
    /// the same service calls made in-process.
    Mcp,
    /// REST submit and get over HTTP/1.1 keep-alive from C connections,
    /// against the same calls made in-process.
    Http,
    /// History search latency over `--tasks` records (copies of the
    /// evaluation corpus), against the same queries over 1,000 records in
    /// the same run.
    Search,
}

impl Scenario {
    fn as_str(self) -> &'static str {
        match self {
            Scenario::Submit => "submit",
            Scenario::Noop => "noop",
            Scenario::Command => "command",
            Scenario::Dag => "dag",
            Scenario::Mcp => "mcp",
            Scenario::Http => "http",
            Scenario::Search => "search",
        }
    }

    fn default_concurrency(self) -> usize {
        match self {
            Scenario::Submit => 64,
            Scenario::Noop => 100,
            Scenario::Command => 64,
            Scenario::Dag => 100,
            Scenario::Mcp => 1,
            Scenario::Http => 32,
            Scenario::Search => 1,
        }
    }
}

/// Name of the tasks a scenario measures (history rows are named differently).
const BENCH_TASK: &str = "bench";
const NOOP_TASK: &str = "noop";
const HISTORY_TASK: &str = "history";
/// Tasks per `submit_batch` call when preparing `noop`/`command`.
const PREP_BATCH: usize = 1000;
/// Rows per INSERT when pre-filling history (16 parameters each).
const HISTORY_ROWS_PER_INSERT: usize = 1000;
/// Rows per transaction when pre-filling history.
const HISTORY_ROWS_PER_TX: usize = 100_000;
/// Time budget of the slow (one fsync per row) submit baseline.
const BASELINE_BUDGET: Duration = Duration::from_secs(10);
/// Claims timed after `submit --history`.
const CLAIM_CALLS: usize = 1000;
/// Claim queries timed alone on the read pool after `submit --history`.
const CLAIM_QUERIES: usize = 500;
/// Claims timed with a handler name in the request, as the engine sends when
/// in-process handlers are registered.
const CLAIM_CALLS_WITH_HANDLERS: usize = 200;

/// The claim query the writer runs (`store::sqlite::claim_sql`), so its
/// plan and cost can be measured on the read pool. `hinted: false` drops its
/// `INDEXED BY tasks_ready`, to show what the hint is worth.
fn claim_sql_mirror(names: usize, hinted: bool) -> String {
    let sql = claim_sql(&engine_request(names));
    if hinted {
        sql
    } else {
        sql.replace("INDEXED BY tasks_ready ", "")
    }
}

/// The claim request the engine sends with `names` handler names registered.
fn engine_request(names: usize) -> ClaimRequest {
    ClaimRequest {
        external: (names > 0).then(|| crate::store::ExternalFilter {
            names: vec![NOOP_TASK.to_string(); names],
            ..Default::default()
        }),
        ..crate::store::sqlite::engine_claim_request()
    }
}

pub async fn run(args: BenchArgs, config: Config) -> Result<ExitCode> {
    let scenario = args.scenario;
    let concurrency = args
        .concurrency
        .unwrap_or_else(|| scenario.default_concurrency());
    if args.tasks == 0 {
        return Err(Error::invalid("tasks", "must be at least 1"));
    }
    if concurrency == 0 || concurrency > 100_000 {
        return Err(Error::invalid(
            "concurrency",
            format!("must be between 1 and 100000, got {concurrency}"),
        ));
    }
    let batch = match (scenario, args.batch) {
        (Scenario::Submit, None) => 1,
        (Scenario::Submit, Some(b)) if b == 0 || b > MAX_BATCH_TASKS => {
            return Err(Error::invalid(
                "batch",
                format!("must be between 1 and {MAX_BATCH_TASKS}, got {b}"),
            ));
        }
        (Scenario::Submit, Some(b)) => b,
        (_, Some(_)) => {
            return Err(Error::invalid("batch", "is only for the submit scenario"));
        }
        (_, None) => 1,
    };
    let history = args.history.unwrap_or(0);
    if let Some(url) = config.storage.postgres_url() {
        if scenario != Scenario::Noop {
            return Err(Error::invalid(
                "scenario",
                format!(
                    "only noop runs on PostgreSQL; {} runs on SQLite (give --db a file, or no --db)",
                    scenario.as_str()
                ),
            ));
        }
        if args.history.is_some() {
            return Err(Error::invalid("history", "is not available on PostgreSQL"));
        }
        let nodes = args.nodes.unwrap_or(1);
        if nodes == 0 || nodes > postgres::MAX_NODES {
            return Err(Error::invalid(
                "nodes",
                format!("must be between 1 and {}, got {nodes}", postgres::MAX_NODES),
            ));
        }
        config.validate()?;
        let out = postgres::bench_noop(url, &config, args.tasks, concurrency, nodes).await?;
        if args.json {
            outln!("{out}");
        } else {
            postgres::print_summary(&out);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.nodes.is_some() {
        return Err(Error::invalid(
            "nodes",
            "needs a PostgreSQL --db (postgres://...): nodes share a queue through PostgreSQL",
        ));
    }

    let dir = BenchDir::create(&config.storage.path)?;
    let mut cfg = config.clone();
    cfg.storage.path = dir.path.join("queue.db");
    if scenario != Scenario::Submit {
        cfg.execution.max_concurrent_tasks = concurrency;
    }
    cfg.validate()?;
    let store = SqliteStore::open(
        &cfg.storage.path,
        cfg.storage.durability,
        cfg.storage.read_connections,
    )
    .await?;
    if args.semantic && scenario != Scenario::Search {
        return Err(Error::invalid(
            "--semantic",
            "applies to `bench search` only",
        ));
    }
    let mut loading_cache = None;
    let queue = if args.semantic {
        // The configured model when there is one (`search.embedder`),
        // else the built-in hashing embedder.
        let search = crate::search::Search::new(&cfg);
        if let Some(e) = search.take_startup_error() {
            return Err(e);
        }
        let embedder: Arc<dyn crate::search::embed::Embedder> = match search.embedder() {
            Some(model) => {
                let cached = Arc::new(LoadingCache::new(model.clone()));
                loading_cache = Some(cached.clone());
                cached
            }
            None => Arc::new(HashEmbedder),
        };
        TaskQueue::with_store_and_embedder(
            Arc::new(store.clone()),
            cfg.clone(),
            Arc::new(SystemClock),
            embedder,
        )
    } else {
        TaskQueue::with_store(Arc::new(store.clone()), cfg.clone(), Arc::new(SystemClock))
    };

    let mut out = json!({
        "scenario": scenario.as_str(),
        "tasks": args.tasks,
        "concurrency": concurrency,
        "durability": match cfg.storage.durability {
            Durability::Durable => "durable (WAL synced before answering)",
            Durability::Fast => "fast (synchronous=NORMAL)",
        },
        "db": cfg.storage.path.display().to_string(),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    });
    if scenario == Scenario::Submit {
        out["batch"] = json!(batch);
    }
    if args.history.is_some() {
        let t = Instant::now();
        prefill_history(&cfg.storage.path, history).await?;
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE name = ?")
            .bind(HISTORY_TASK)
            .fetch_one(store.read_pool())
            .await?;
        out["history"] = json!(rows);
        out["history_prefill_s"] = json!(round(t.elapsed().as_secs_f64(), 2));
        out["history_note"] = json!(
            "history rows are succeeded tasks inserted directly into `tasks` (no audit_events or attempts rows)"
        );
    }

    match scenario {
        Scenario::Submit => {
            bench_submit(
                &queue,
                &store,
                &dir.path,
                args.tasks,
                concurrency,
                batch,
                &mut out,
            )
            .await
        }
        Scenario::Noop => bench_noop(&queue, &store, args.tasks, concurrency, &mut out).await,
        Scenario::Command => bench_command(&queue, &store, args.tasks, concurrency, &mut out).await,
        Scenario::Dag => bench_dag(&queue, &store, args.tasks, concurrency, &mut out).await,
        Scenario::Mcp => bench_mcp(&queue, &dir.path, &cfg, args.tasks, &mut out).await,
        Scenario::Http => bench_http(&queue, args.tasks, concurrency, &mut out).await,
        Scenario::Search => {
            bench_search(&queue, args.tasks, loading_cache, args.semantic, &mut out).await
        }
    }?;
    if args.history.is_some() && scenario == Scenario::Submit {
        bench_claims(&queue, &store, args.tasks, &mut out).await?;
    }
    if out.get("claim_plan").is_none() {
        out["claim_plan"] = json!(explain_claim(store.read_pool()).await?);
    }
    let ver: String = sqlx::query_scalar("SELECT sqlite_version()")
        .fetch_one(store.read_pool())
        .await?;
    out["sqlite_version"] = json!(ver);

    store.close().await;
    drop(queue);
    drop(dir);

    if args.json {
        outln!("{out}");
    } else {
        print_summary(&out);
    }
    Ok(ExitCode::SUCCESS)
}

/// A fresh directory for the benchmark databases, removed on drop.
struct BenchDir {
    path: PathBuf,
}

impl BenchDir {
    fn create(configured: &Path) -> Result<Self> {
        let base = if configured != StorageConfig::default().path {
            configured
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        } else {
            std::env::temp_dir()
        };
        let path = base.join(format!(
            "task-queue-bench-{}-{}",
            std::process::id(),
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&path).map_err(|e| {
            Error::Store(format!(
                "cannot create the bench directory {}: {e}",
                path.display()
            ))
        })?;
        Ok(BenchDir { path })
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------- submit

async fn bench_submit(
    queue: &TaskQueue,
    store: &SqliteStore,
    dir: &Path,
    tasks: usize,
    concurrency: usize,
    batch: usize,
    out: &mut Value,
) -> Result<()> {
    let template = Task::new(BENCH_TASK).with_argv(["true"]);
    let next = Arc::new(AtomicUsize::new(0));
    reset_peak_rss();
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let queue = queue.clone();
        let next = next.clone();
        let template = template.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let from = next.fetch_add(batch, Ordering::Relaxed);
                if from >= tasks {
                    break;
                }
                let n = batch.min(tasks - from);
                if batch == 1 {
                    let spec = template.clone();
                    let t = Instant::now();
                    queue.submit(spec).await?;
                    lat.push(ms(t.elapsed()));
                } else {
                    let specs = vec![template.clone(); n];
                    let t = Instant::now();
                    queue.submit_batch(specs).await?;
                    lat.push(ms(t.elapsed()));
                }
            }
            Ok::<_, Error>(lat)
        });
    }
    let mut lat = Vec::with_capacity(tasks.div_ceil(batch));
    while let Some(r) = set.join_next().await {
        lat.extend(r.map_err(|e| Error::Store(format!("submitter panicked: {e}")))??);
    }
    let elapsed = start.elapsed();
    let rss = peak_rss_mb();
    let tps = tasks as f64 / elapsed.as_secs_f64();
    let (p50, p99) = (percentile(&mut lat, 50.0), percentile(&mut lat, 99.0));
    out["tasks_per_sec"] = json!(round(tps, 0));
    out["elapsed_s"] = json!(round(elapsed.as_secs_f64(), 3));
    out["p50_ms"] = json!(round(p50, 3));
    out["p99_ms"] = json!(round(p99, 3));
    out["latency_what"] = json!(if batch == 1 {
        "per submit() call, from call to durable return"
    } else {
        "per submit_batch() call, from call to durable return"
    });
    out["peak_rss_mb"] = json!(rss.map(|r| round(r, 1)));
    out["claim_plan"] = json!(explain_claim(store.read_pool()).await?);

    // The same rows, as stored by the queue, for the baseline.
    let (spec, spec_hash): (String, String) =
        sqlx::query_as("SELECT spec, spec_hash FROM tasks WHERE name = ? LIMIT 1")
            .bind(BENCH_TASK)
            .fetch_one(store.read_pool())
            .await?;
    let base = baseline_inserts(&dir.join("baseline.db"), tasks, batch, &spec, &spec_hash).await?;
    out["baseline"] = base.to_json();
    out["baseline_ratio"] = json!(round(tps / base.tasks_per_sec, 2));
    if batch > 1 {
        let floor = floor_of(store, &dir.join("floor.db"), tasks, batch).await?;
        out["floor_ratio"] = json!(round(
            tps / floor["tasks_per_sec"].as_f64().unwrap_or(f64::NAN),
            2
        ));
        out["storage_floor"] = floor;
    }
    let met = if batch == 1 {
        tps >= 40_000.0 && p50 < 1.0
    } else {
        tps >= 300_000.0
    };
    out["goal"] = json!({
        "target": if batch == 1 { ">= 40000 tasks/s and p50 < 1 ms" } else { ">= 300000 tasks/s" },
        "met": met,
    });
    Ok(())
}

/// The storage floor of batched submits (see `store::sqlite::storage_floor`):
/// the same rows as the queue stored, by SQLite alone.
async fn floor_of(store: &SqliteStore, path: &Path, tasks: usize, batch: usize) -> Result<Value> {
    let (name, kind, priority, max_attempts, spec, spec_hash): (String, String, i64, i64, String, String) =
        sqlx::query_as(
            "SELECT name, kind, priority, max_attempts, spec, spec_hash FROM tasks WHERE name = ? LIMIT 1",
        )
        .bind(BENCH_TASK)
        .fetch_one(store.read_pool())
        .await?;
    let task = FloorTask {
        name,
        kind,
        priority,
        max_attempts,
        spec,
        spec_hash,
    };
    let t = storage_floor(path, &task, tasks, batch, SystemClock.now_ms()).await?;
    let per_sec = |d: Duration| round(tasks as f64 / d.as_secs_f64().max(1e-9), 0);
    Ok(json!({
        "what": format!(
            "the same task rows and audit events by SQLite alone: the writer's INSERT statements on the \
             store's schema and connection settings, one transaction per {batch} tasks, every value \
             (ids, audit hashes) computed beforehand, no sync, no checkpoint while inserting"
        ),
        "tasks": tasks,
        "elapsed_s": round(t.inserts.as_secs_f64(), 3),
        "tasks_per_sec": per_sec(t.inserts),
        "us_per_task": round(t.inserts.as_secs_f64() * 1e6 / tasks as f64, 2),
        "checkpoint_s": round(t.checkpoint.as_secs_f64(), 3),
        "tasks_per_sec_with_checkpoint": per_sec(t.inserts + t.checkpoint),
    }))
}

/// A baseline's outcome.
struct Baseline {
    what: String,
    tasks: usize,
    elapsed: Duration,
    tasks_per_sec: f64,
    lat: Vec<f64>,
}

impl Baseline {
    fn new(what: String, tasks: usize, elapsed: Duration, mut lat: Vec<f64>) -> Self {
        let tasks_per_sec = tasks as f64 / elapsed.as_secs_f64().max(1e-9);
        lat.sort_by(f64::total_cmp);
        Baseline {
            what,
            tasks,
            elapsed,
            tasks_per_sec,
            lat,
        }
    }

    fn to_json(&self) -> Value {
        let mut lat = self.lat.clone();
        json!({
            "what": self.what,
            "tasks_per_sec": round(self.tasks_per_sec, 0),
            "tasks": self.tasks,
            "elapsed_s": round(self.elapsed.as_secs_f64(), 3),
            "p50_ms": round(percentile(&mut lat, 50.0), 3),
            "p99_ms": round(percentile(&mut lat, 99.0), 3),
        })
    }
}

/// Raw sqlx inserts into a plain table, one connection, one durable
/// transaction per `batch` rows; stops after `tasks` rows or the time budget.
async fn baseline_inserts(
    path: &Path,
    tasks: usize,
    batch: usize,
    spec: &str,
    spec_hash: &str,
) -> Result<Baseline> {
    let mut conn = connect_raw(path).await?;
    sqlx::query(
        "CREATE TABLE plain (seq INTEGER PRIMARY KEY, id TEXT NOT NULL, name TEXT NOT NULL, \
         kind TEXT NOT NULL, status TEXT NOT NULL, priority INTEGER NOT NULL, \
         max_attempts INTEGER NOT NULL, run_at INTEGER NOT NULL, created_at INTEGER NOT NULL, \
         updated_at INTEGER NOT NULL, spec TEXT NOT NULL, spec_hash TEXT NOT NULL)",
    )
    .execute(&mut conn)
    .await?;
    let sql = "INSERT INTO plain (id, name, kind, status, priority, max_attempts, run_at, \
               created_at, updated_at, spec, spec_hash) VALUES (?,?,'command','queued',0,3,?,?,?,?,?)";
    let insert_row = |now: i64| {
        sqlx::query(sql)
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(BENCH_TASK)
            .bind(now)
            .bind(now)
            .bind(now)
            .bind(spec)
            .bind(spec_hash)
    };
    let start = Instant::now();
    let mut done = 0;
    let mut lat = Vec::new();
    while done < tasks && start.elapsed() < BASELINE_BUDGET {
        let n = batch.min(tasks - done);
        let t = Instant::now();
        let now = SystemClock.now_ms();
        if batch == 1 {
            // Autocommit: the statement is its own durable transaction.
            insert_row(now).execute(&mut conn).await?;
        } else {
            let mut tx = conn.begin().await?;
            for _ in 0..n {
                insert_row(now).execute(&mut *tx).await?;
            }
            tx.commit().await?;
        }
        lat.push(ms(t.elapsed()));
        done += n;
    }
    let elapsed = start.elapsed();
    let _ = conn.close().await;
    let what = if batch == 1 {
        "raw sqlx INSERT into a plain table (no indexes, no audit) in a separate SQLite file, same pragmas \
         (WAL, same synchronous), one connection, one durable transaction per row: a queue without group commit"
            .to_string()
    } else {
        format!(
            "raw sqlx: one durable transaction per {batch} rows, one prepared INSERT per row, into a plain \
             table (no indexes, no audit) in a separate SQLite file, same pragmas, one connection"
        )
    };
    let mut what = what;
    if done < tasks {
        what.push_str(&format!(
            "; stopped after {done} rows ({}s budget)",
            BASELINE_BUDGET.as_secs()
        ));
    }
    Ok(Baseline::new(what, done, elapsed, lat))
}

/// Times the claim SELECT alone on the read pool; returns latencies in ms.
async fn time_claim_query(store: &SqliteStore, sql: &str, names: usize) -> Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(CLAIM_QUERIES);
    for _ in 0..CLAIM_QUERIES {
        let mut q = sqlx::query(AssertSqlSafe(sql.to_string()))
            .bind(SystemClock.now_ms())
            .bind(1i64);
        if names > 0 {
            q = q.bind(NOOP_TASK);
        }
        let t = Instant::now();
        let rows = q.fetch_all(store.read_pool()).await?;
        lat.push(ms(t.elapsed()));
        std::hint::black_box(rows);
    }
    Ok(lat)
}

/// After `submit --history`: claim cost through the writer, and of the query alone.
async fn bench_claims(
    queue: &TaskQueue,
    store: &SqliteStore,
    queued: usize,
    out: &mut Value,
) -> Result<()> {
    let mut variants = serde_json::Map::new();
    for (key, names) in [("commands_only", 0usize), ("with_handler", 1)] {
        // The query alone, on the read pool (no transaction, no fsync).
        let mut qlat = time_claim_query(store, &claim_sql_mirror(names, true), names).await?;
        let mut qlat_unhinted =
            time_claim_query(store, &claim_sql_mirror(names, false), names).await?;
        // Claims of one task each, sequential: what the engine does when a slot frees up.
        let wanted = if names == 0 {
            CLAIM_CALLS
        } else {
            CLAIM_CALLS_WITH_HANDLERS
        };
        let mut lat = Vec::with_capacity(wanted);
        let start = Instant::now();
        for _ in 0..wanted {
            let now = SystemClock.now_ms();
            let req = ClaimRequest {
                worker_id: "bench-claimer".into(),
                now,
                lease_until: now + 60_000,
                ..engine_request(names)
            };
            let t = Instant::now();
            let got = queue.store().claim(req).await?;
            if got.is_empty() {
                break;
            }
            lat.push(ms(t.elapsed()));
        }
        let calls = lat.len();
        let elapsed = start.elapsed();
        variants.insert(
            key.to_string(),
            json!({
                "calls": calls,
                "claims_per_sec": round(calls as f64 / elapsed.as_secs_f64(), 0),
                "p50_ms": round(percentile(&mut lat, 50.0), 3),
                "p99_ms": round(percentile(&mut lat, 99.0), 3),
                "query_only_p50_ms": round(percentile(&mut qlat, 50.0), 3),
                "query_only_p99_ms": round(percentile(&mut qlat, 99.0), 3),
                "query_only_without_index_hint_p50_ms": round(percentile(&mut qlat_unhinted, 50.0), 3),
                "query_only_without_index_hint_p99_ms": round(percentile(&mut qlat_unhinted, 99.0), 3),
                "plan": explain_mirror(store, names, true).await?,
                "plan_without_index_hint": explain_mirror(store, names, false).await?,
            }),
        );
    }
    let mut claim = Value::Object(variants);
    claim["what"] = json!(format!(
        "sequential Store::claim calls with limit 1 on the {queued} queued command tasks (one write \
         transaction + commit each); query_only = the claim SELECT (LIMIT 1) alone on the read pool \
         (without_index_hint: the same minus INDEXED BY tasks_ready); \
         with_handler = the request carries one handler name, as the engine's does when handlers are registered"
    ));
    out["claim_p50_ms"] = claim["commands_only"]["p50_ms"].clone();
    out["claim_p99_ms"] = claim["commands_only"]["p99_ms"].clone();
    out["claim"] = claim;
    Ok(())
}

// ---------------------------------------------------------------- noop / command

async fn bench_noop(
    queue: &TaskQueue,
    store: &SqliteStore,
    tasks: usize,
    concurrency: usize,
    out: &mut Value,
) -> Result<()> {
    queue.register_handler(NOOP_TASK, noop_handler);
    let template = Task::new(NOOP_TASK).with_kind(TaskKind::External);
    let prep = submit_prepared(queue, &template, tasks).await?;
    out["prepare_s"] = json!(round(prep.as_secs_f64(), 2));
    let tps = drain(queue, store, tasks, NOOP_TASK, &[NOOP_TASK], out).await?;

    let base = baseline_mpsc(tasks, concurrency, &template).await;
    out["baseline"] = base.to_json();
    out["baseline_ratio"] = json!(round(tps / base.tasks_per_sec, 3));
    let rss_ok = out["peak_rss_mb"].as_f64().is_some_and(|r| r < 50.0);
    out["goal"] = json!({
        "target": ">= 25000 tasks/s at concurrency 100; peak RSS < 50 MB",
        "met": tps >= 25_000.0 && rss_ok,
        "throughput_met": tps >= 25_000.0,
        "rss_met": rss_ok,
    });
    Ok(())
}

async fn bench_command(
    queue: &TaskQueue,
    store: &SqliteStore,
    tasks: usize,
    concurrency: usize,
    out: &mut Value,
) -> Result<()> {
    let template = Task::new(BENCH_TASK).with_argv(["true"]);
    let prep = submit_prepared(queue, &template, tasks).await?;
    out["prepare_s"] = json!(round(prep.as_secs_f64(), 2));
    let tps = drain(queue, store, tasks, BENCH_TASK, &[], out).await?;

    let base = baseline_spawn(tasks, concurrency, false).await?;
    out["baseline"] = base.to_json();
    let fork = baseline_spawn(tasks, concurrency, true).await?;
    out["baseline_fork"] = fork.to_json();
    let exec = executor_loop(&template, tasks, concurrency).await?;
    out["executor_alone"] = exec.to_json();
    let ratio = tps / base.tasks_per_sec;
    out["baseline_ratio"] = json!(round(ratio, 3));
    let rss_ok = out["peak_rss_mb"].as_f64().is_some_and(|r| r < 50.0);
    out["goal"] = json!({
        "target": ">= 80% of the baseline; peak RSS < 50 MB",
        "met": ratio >= 0.8 && rss_ok,
        "throughput_met": ratio >= 0.8,
        "rss_met": rss_ok,
    });
    Ok(())
}

// ---------------------------------------------------------------- http

/// Runs `calls` requests from `concurrency` workers; returns latencies (ms)
/// and the elapsed time.
async fn drive<F, Fut>(calls: usize, concurrency: usize, f: F) -> Result<(Vec<f64>, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let f = f.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    return Ok::<_, Error>(lat);
                }
                let t = Instant::now();
                f(i).await?;
                lat.push(ms(t.elapsed()));
            }
        });
    }
    let mut all = Vec::with_capacity(calls);
    while let Some(r) = set.join_next().await {
        all.extend(r.map_err(|e| Error::Store(format!("bench worker failed: {e}")))??);
    }
    Ok((all, start.elapsed()))
}

// ---------------------------------------------------------------- search

/// Records of the baseline measurement of `bench search`.
const SEARCH_BASELINE_RECORDS: usize = 1_000;
/// Times each evaluation query is run per measurement.
const SEARCH_ROUNDS: usize = 5;

/// A stand-in for a sentence-embedding model in `bench search --semantic`:
/// words and word pairs hashed into 384 dimensions, unit length. It costs
/// next to nothing, so the benchmark measures the semantic tier's vector
/// scan and fusion; a real model adds its inference time per query.
struct HashEmbedder;

#[async_trait::async_trait]
impl crate::search::embed::Embedder for HashEmbedder {
    fn model(&self) -> &str {
        "bench-hash-384"
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let hash = |s: &str| {
            s.bytes()
                .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619))
        };
        Ok(texts
            .iter()
            .map(|t| {
                let mut v = vec![0f32; 384];
                let lower = t.to_lowercase();
                let words: Vec<&str> = lower
                    .split(|c: char| !c.is_alphanumeric())
                    .filter(|w| !w.is_empty())
                    .collect();
                for w in &words {
                    v[(hash(w) % 384) as usize] += 1.0;
                }
                for p in words.windows(2) {
                    v[(hash(&format!("{} {}", p[0], p[1])) % 384) as usize] += 0.5;
                }
                crate::search::embed::normalise(v)
            })
            .collect())
    }
}

/// A real model for `bench search --semantic`, with the vectors of texts it
/// has already embedded kept while the records are loaded: they are
/// copies of the 99 corpus tasks, and embedding each copy again would
/// only make loading slow. Switched off before queries are measured, so
/// each query pays the model's inference.
struct LoadingCache {
    model: Arc<dyn crate::search::embed::Embedder>,
    seen: std::sync::Mutex<HashMap<String, Vec<f32>>>,
    loading: std::sync::atomic::AtomicBool,
}

impl LoadingCache {
    fn new(model: Arc<dyn crate::search::embed::Embedder>) -> Self {
        LoadingCache {
            model,
            seen: std::sync::Mutex::new(HashMap::new()),
            loading: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// Whether records are being loaded (cache on) or queries measured (off).
    fn loading(&self, on: bool) {
        self.loading.store(on, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl crate::search::embed::Embedder for LoadingCache {
    fn model(&self) -> &str {
        self.model.model()
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if !self.loading.load(std::sync::atomic::Ordering::SeqCst) {
            return self.model.embed(texts).await;
        }
        let mut missing: Vec<String> = {
            let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            texts
                .iter()
                .filter(|t| !seen.contains_key(*t))
                .cloned()
                .collect()
        };
        missing.sort();
        missing.dedup();
        let fresh = if missing.is_empty() {
            Vec::new()
        } else {
            self.model.embed(&missing).await?
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.extend(missing.into_iter().zip(fresh));
        Ok(texts.iter().map(|t| seen[t].clone()).collect())
    }
}

async fn bench_search(
    queue: &TaskQueue,
    records: usize,
    loading_cache: Option<Arc<LoadingCache>>,
    semantic: bool,
    out: &mut Value,
) -> Result<()> {
    if records < SEARCH_BASELINE_RECORDS {
        return Err(Error::invalid(
            "--tasks",
            format!("bench search needs at least {SEARCH_BASELINE_RECORDS} records, got {records}"),
        ));
    }
    let queries = crate::search::eval::queries();
    let now = crate::model::Timestamp::now().0;
    let measure = |label: &'static str| {
        let queries = queries.clone();
        async move {
            let mut lat = Vec::with_capacity(queries.len() * SEARCH_ROUNDS);
            let mut hits = 0usize;
            let start = Instant::now();
            for _ in 0..SEARCH_ROUNDS {
                for q in &queries {
                    let t = Instant::now();
                    let r = queue
                        .search(crate::search::SearchRequest {
                            query: q.query.clone(),
                            limit: 10,
                            ..Default::default()
                        })
                        .await?;
                    lat.push(ms(t.elapsed()));
                    hits += r.hits.len();
                }
            }
            let elapsed = start.elapsed();
            let n = lat.len();
            Ok::<_, Error>(json!({
                "what": label,
                "queries": n,
                "queries_per_sec": round(n as f64 / elapsed.as_secs_f64(), 1),
                "p50_ms": round(percentile(&mut lat, 50.0), 3),
                "p99_ms": round(percentile(&mut lat, 99.0), 3),
                "mean_hits": round(hits as f64 / n as f64, 2),
            }))
        }
    };
    let t = Instant::now();
    crate::search::eval::load_copies(queue, SEARCH_BASELINE_RECORDS, now).await?;
    if semantic {
        queue.backfill_vectors(1000).await?;
    }
    let load_small = t.elapsed();
    let cache = |on: bool| {
        if let Some(c) = &loading_cache {
            c.loading(on);
        }
    };
    cache(false);
    let baseline = measure("the same queries over 1,000 records").await?;
    cache(true);
    let t = Instant::now();
    crate::search::eval::load_copies(queue, records - SEARCH_BASELINE_RECORDS, now).await?;
    if semantic {
        queue.backfill_vectors(1000).await?;
    }
    let load_rest = t.elapsed();
    cache(false);
    let full = measure("search over all records").await?;
    out["records"] = json!(records);
    out["semantic"] = match (semantic, &loading_cache) {
        (false, _) => json!(false),
        (true, None) => {
            json!("hashing embedder, 384 dimensions: vector scan and fusion, no model inference")
        }
        (true, Some(c)) => json!(format!(
            "{}: each query's embedding from the model, then vector scan and fusion",
            c.model.model()
        )),
    };
    out["records_per_sec_loading"] = json!(round(
        records as f64 / (load_small + load_rest).as_secs_f64(),
        1
    ));
    out["tasks_per_sec"] = full["queries_per_sec"].clone();
    out["p50_ms"] = full["p50_ms"].clone();
    out["p99_ms"] = full["p99_ms"].clone();
    out["mean_hits"] = full["mean_hits"].clone();
    out["queries"] = full["queries"].clone();
    let ratio = full["p50_ms"].as_f64().unwrap_or(0.0)
        / baseline["p50_ms"].as_f64().unwrap_or(1.0).max(1e-9);
    out["p50_ratio_vs_baseline"] = json!(round(ratio, 2));
    out["baseline"] = json!({
        "what": baseline["what"],
        "tasks_per_sec": baseline["queries_per_sec"],
        "p50_ms": baseline["p50_ms"],
        "p99_ms": baseline["p99_ms"],
    });
    out["note"] = json!(
        "tasks_per_sec is queries per second, one query at a time; the records are copies of the 99 corpus tasks, so each query matches many runs"
    );
    Ok(())
}

async fn bench_http(
    queue: &TaskQueue,
    tasks: usize,
    concurrency: usize,
    out: &mut Value,
) -> Result<()> {
    // The real server stack on a loopback port, engine included.
    let ct = tokio_util::sync::CancellationToken::new();
    let app = crate::server::router(queue.clone(), None, &ct);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let engine = queue.start();
    // The load generator is a minimal HTTP/1.1 client (as wrk is): each
    // connection writes a ready request and reads the response framed by
    // its Content-Length, so the two cores go to the server, not to
    // building and parsing requests on the client side.
    let body = br#"{"name":"http-bench","kind":"external","project":"bench"}"#;
    let submit_req = Arc::new(
        [
            format!(
                "POST /api/v1/tasks HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes(),
            body.to_vec(),
        ]
        .concat(),
    );
    let ids = Arc::new(std::sync::Mutex::new(vec![String::new(); tasks]));
    let (i2, req) = (ids.clone(), submit_req.clone());
    let (mut submit_lat, submit_elapsed) =
        drive_http(addr, tasks, concurrency, move |mut conn, i| {
            let (ids, req) = (i2.clone(), req.clone());
            async move {
                let (status, body) = conn.call(&req).await?;
                if status != 201 {
                    return Err(Error::Store(format!(
                        "submit answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    )));
                }
                let id = json_id(&body)
                    .ok_or_else(|| Error::Store("submit answered without an id".into()))?;
                ids.lock().unwrap_or_else(|e| e.into_inner())[i] = id;
                Ok(conn)
            }
        })
        .await?;
    let i3 = ids.clone();
    let (mut get_lat, get_elapsed) = drive_http(addr, tasks, concurrency, move |mut conn, i| {
        let id = i3.lock().unwrap_or_else(|e| e.into_inner())[i].clone();
        async move {
            let req = format!("GET /api/v1/tasks/{id} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            let (status, _) = conn.call(req.as_bytes()).await?;
            if status != 200 {
                return Err(Error::Store(format!("get answered {status}")));
            }
            Ok(conn)
        }
    })
    .await?;
    ct.cancel();
    server.abort();
    engine.shutdown(Duration::from_secs(5)).await?;

    // Baseline: the same calls on the service API, same concurrency.
    let q = queue.clone();
    let (mut base_submit, base_submit_elapsed) = drive(tasks, concurrency, move |_| {
        let q = q.clone();
        async move {
            q.submit(
                Task::new("http-base")
                    .with_kind(TaskKind::External)
                    .with_project("bench"),
            )
            .await
            .map(|_| ())
        }
    })
    .await?;
    let submits_per_sec = tasks as f64 / submit_elapsed.as_secs_f64();
    let submit_p99 = percentile(&mut submit_lat, 99.0);
    out["transport"] = json!(format!(
        "HTTP/1.1 keep-alive, {concurrency} concurrent connections, loopback; load generator: a minimal HTTP/1.1 client in the same process (ready requests, Content-Length framing)"
    ));
    out["tasks_per_sec"] = json!(round(submits_per_sec, 0));
    out["p50_ms"] = json!(round(percentile(&mut submit_lat, 50.0), 3));
    out["p99_ms"] = json!(round(submit_p99, 3));
    out["get"] = json!({
        "requests_per_sec": round(tasks as f64 / get_elapsed.as_secs_f64(), 0),
        "p50_ms": round(percentile(&mut get_lat, 50.0), 3),
        "p99_ms": round(percentile(&mut get_lat, 99.0), 3),
    });
    out["baseline"] = json!({
        "what": format!("the same submits on the service API in-process, {concurrency} concurrent callers, same durability"),
        "tasks_per_sec": round(tasks as f64 / base_submit_elapsed.as_secs_f64(), 0),
        "p50_ms": round(percentile(&mut base_submit, 50.0), 3),
        "p99_ms": round(percentile(&mut base_submit, 99.0), 3),
    });
    out["goal"] = json!({
        "target": ">= 10,000 submits/s and p99 < 10 ms over HTTP from 32 connections",
        "met": submits_per_sec >= 10_000.0 && submit_p99 < 10.0,
    });
    Ok(())
}

/// One keep-alive connection of the HTTP load generator.
struct HttpConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl HttpConn {
    async fn connect(addr: std::net::SocketAddr) -> Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its response: (status, body). Only
    /// responses framed by Content-Length are accepted (the server frames
    /// every JSON answer so).
    async fn call(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let broken = |what: &str| Error::Store(format!("HTTP load generator: {what}"));
        self.stream.write_all(request).await?;
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = std::str::from_utf8(&self.buf[..end])
                    .map_err(|_| broken("response head is not UTF-8"))?;
                let status: u16 = head
                    .get(9..12)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| broken("no status line"))?;
                let len = head
                    .lines()
                    .find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.trim()
                            .eq_ignore_ascii_case("content-length")
                            .then(|| v.trim().parse::<usize>().ok())
                            .flatten()
                    })
                    .ok_or_else(|| broken("response without Content-Length"))?;
                let total = end + 4 + len;
                while self.buf.len() < total {
                    if self.stream.read_buf(&mut self.buf).await? == 0 {
                        return Err(broken("connection closed mid-response"));
                    }
                }
                let body = self.buf[end + 4..total].to_vec();
                self.buf.drain(..total);
                return Ok((status, body));
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(broken("connection closed before a response"));
            }
        }
    }
}

/// The `"id"` string of a JSON object answer, found without parsing it all.
fn json_id(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\"id\":\"")? + 6;
    let len = text[start..].find('"')?;
    Some(text[start..start + len].to_string())
}

/// Like [`drive`], with one keep-alive connection per concurrent caller.
async fn drive_http<F, Fut>(
    addr: std::net::SocketAddr,
    calls: usize,
    concurrency: usize,
    f: F,
) -> Result<(Vec<f64>, Duration)>
where
    F: Fn(HttpConn, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<HttpConn>> + Send,
{
    let mut conns = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        conns.push(HttpConn::connect(addr).await?);
    }
    let f = Arc::new(f);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for conn in conns {
        let f = f.clone();
        let next = next.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut conn = conn;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    return Ok::<_, Error>(lat);
                }
                let t = Instant::now();
                conn = f(conn, i).await?;
                lat.push(ms(t.elapsed()));
            }
        });
    }
    let mut all = Vec::with_capacity(calls);
    while let Some(r) = set.join_next().await {
        all.extend(r.map_err(|e| Error::Store(format!("bench worker failed: {e}")))??);
    }
    Ok((all, start.elapsed()))
}

// ---------------------------------------------------------------- mcp

/// A minimal JSON-RPC client of `task-queue mcp` over its stdio.
struct StdioClient {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    next_id: u64,
}

impl StdioClient {
    async fn start(db: &Path, config: &Path) -> Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--db")
            .arg(db)
            .arg("--config")
            .arg(config)
            .arg("mcp")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        use tokio::io::AsyncBufReadExt;
        let mut c = StdioClient {
            child,
            stdin,
            lines: tokio::io::BufReader::new(stdout).lines(),
            next_id: 1,
        };
        c.request(
            "initialize",
            json!({"protocolVersion": "2025-06-18", "capabilities": {},
                   "clientInfo": {"name": "task-queue-bench", "version": env!("CARGO_PKG_VERSION")}}),
        )
        .await?;
        c.send(json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        Ok(c)
    }

    async fn send(&mut self, v: Value) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let mut line = v.to_string();
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn request(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}))
            .await?;
        loop {
            let line = self
                .lines
                .next_line()
                .await?
                .ok_or_else(|| Error::Store("the MCP server closed its output".into()))?;
            let v: Value = serde_json::from_str(&line)
                .map_err(|e| Error::Store(format!("not JSON-RPC from the server: {e}: {line}")))?;
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(e) = v.get("error") {
                    return Err(Error::Store(format!("{method} failed: {e}")));
                }
                return Ok(v["result"].clone());
            }
        }
    }

    async fn call_tool(&mut self, name: &str, args: Value) -> Result<Value> {
        let r = self
            .request("tools/call", json!({"name": name, "arguments": args}))
            .await?;
        if r["isError"] == true {
            return Err(Error::Store(format!("{name} returned an error: {r}")));
        }
        Ok(r["structuredContent"].clone())
    }
}

async fn bench_mcp(
    queue: &TaskQueue,
    dir: &Path,
    cfg: &Config,
    tasks: usize,
    out: &mut Value,
) -> Result<()> {
    let calls = tasks.min(20_000);
    // The server is a separate process on its own database file.
    let db = dir.join("mcp.db");
    let config = dir.join("mcp-config.yml");
    let durability = match cfg.storage.durability {
        Durability::Durable => "durable",
        Durability::Fast => "fast",
    };
    std::fs::write(&config, format!("storage:\n  durability: {durability}\n"))?;
    let mut c = StdioClient::start(&db, &config).await?;
    // Warm up (statement caches, allocator).
    for i in 0..50 {
        c.call_tool(
            "submit_task",
            json!({"name": format!("warm-{i}"), "kind": "external"}),
        )
        .await?;
    }
    let mut submit_lat = Vec::with_capacity(calls);
    let mut ids = Vec::with_capacity(calls);
    let start = Instant::now();
    for i in 0..calls {
        let t = Instant::now();
        let r = c
            .call_tool(
                "submit_task",
                json!({"name": format!("mcp-{i}"), "kind": "external", "project": "bench"}),
            )
            .await?;
        submit_lat.push(ms(t.elapsed()));
        ids.push(r["id"].as_str().unwrap_or_default().to_string());
    }
    let submit_elapsed = start.elapsed();
    let mut get_lat = Vec::with_capacity(calls);
    let start = Instant::now();
    for id in &ids {
        let t = Instant::now();
        c.call_tool("get_task", json!({"id": id, "include_attempts": false}))
            .await?;
        get_lat.push(ms(t.elapsed()));
    }
    let get_elapsed = start.elapsed();
    let _ = c.child.kill().await;

    // Baseline: the same service calls in-process, on this run's queue.
    let mut base_submit = Vec::with_capacity(calls);
    let mut base_ids = Vec::with_capacity(calls);
    for i in 0..calls {
        let t = Instant::now();
        let s = queue
            .submit(
                Task::new(format!("base-{i}"))
                    .with_kind(TaskKind::External)
                    .with_project("bench"),
            )
            .await?;
        base_submit.push(ms(t.elapsed()));
        base_ids.push(s.id);
    }
    let mut base_get = Vec::with_capacity(calls);
    for id in &base_ids {
        let t = Instant::now();
        queue.get(id).await?;
        base_get.push(ms(t.elapsed()));
    }
    let get_p50 = percentile(&mut get_lat, 50.0);
    let get_p99 = percentile(&mut get_lat, 99.0);
    let submit_p50 = percentile(&mut submit_lat, 50.0);
    let submit_p99 = percentile(&mut submit_lat, 99.0);
    out["tasks"] = json!(calls);
    out["transport"] = json!("stdio, one request at a time");
    out["tasks_per_sec"] = json!(round(calls as f64 / submit_elapsed.as_secs_f64(), 0));
    out["p50_ms"] = json!(round(get_p50, 3));
    out["p99_ms"] = json!(round(get_p99, 3));
    out["get_task"] = json!({
        "calls": calls,
        "calls_per_sec": round(calls as f64 / get_elapsed.as_secs_f64(), 0),
        "p50_ms": round(get_p50, 3),
        "p99_ms": round(get_p99, 3),
    });
    out["submit_task"] = json!({
        "calls": calls,
        "calls_per_sec": round(calls as f64 / submit_elapsed.as_secs_f64(), 0),
        "p50_ms": round(submit_p50, 3),
        "p99_ms": round(submit_p99, 3),
    });
    out["baseline"] = json!({
        "what": "the same calls on the service API in-process (no MCP, no stdio), same durability",
        "tasks_per_sec": round(calls as f64 / base_submit.iter().sum::<f64>() * 1000.0, 0),
        "get_p50_ms": round(percentile(&mut base_get, 50.0), 3),
        "get_p99_ms": round(percentile(&mut base_get, 99.0), 3),
        "submit_p50_ms": round(percentile(&mut base_submit, 50.0), 3),
        "submit_p99_ms": round(percentile(&mut base_submit, 99.0), 3),
    });
    out["goal"] = json!({
        "target": "p50 < 1 ms and p99 < 5 ms for get_task and submit_task over stdio",
        "get_task_met": get_p50 < 1.0 && get_p99 < 5.0,
        "submit_task_met": submit_p50 < 1.0 && submit_p99 < 5.0,
    });
    Ok(())
}

/// Width of each layer of the `dag` workflow.
const DAG_WIDTH: usize = 100;
/// Name prefix of the `dag` workflow's tasks (one handler pattern serves them all).
const DAG_PREFIX: &str = "dag-";

async fn bench_dag(
    queue: &TaskQueue,
    store: &SqliteStore,
    tasks: usize,
    concurrency: usize,
    out: &mut Value,
) -> Result<()> {
    if tasks > MAX_BATCH_TASKS {
        return Err(Error::invalid(
            "tasks",
            format!("a workflow holds at most {MAX_BATCH_TASKS} tasks"),
        ));
    }
    // Baseline first: the noop scenario with the same task count.
    queue.register_handler(NOOP_TASK, noop_handler);
    queue.register_handler(format!("{DAG_PREFIX}*"), noop_handler);
    let template = Task::new(NOOP_TASK).with_kind(TaskKind::External);
    submit_prepared(queue, &template, tasks).await?;
    let mut noop_out = json!({});
    let noop_tps = drain(queue, store, tasks, NOOP_TASK, &[NOOP_TASK], &mut noop_out).await?;

    // Layers of DAG_WIDTH; each task depends on two of the layer before.
    let mut w = crate::model::Workflow::new("bench-dag");
    let mut edges = 0usize;
    for i in 0..tasks {
        let (layer, pos) = (i / DAG_WIDTH, i % DAG_WIDTH);
        let mut t = Task::new(format!("{DAG_PREFIX}{layer}-{pos}")).with_kind(TaskKind::External);
        if layer > 0 {
            let prev = layer - 1;
            let width_prev = DAG_WIDTH.min(tasks - prev * DAG_WIDTH);
            t = t.depends_on(format!("{DAG_PREFIX}{prev}-{}", pos % width_prev));
            edges += 1;
            let second = (pos + 1) % width_prev;
            if second != pos % width_prev {
                t = t.depends_on(format!("{DAG_PREFIX}{prev}-{second}"));
                edges += 1;
            }
        }
        w = w.add_task(t);
    }
    let t = Instant::now();
    let sub = queue.submit_workflow(w).await?;
    out["submit_workflow_s"] = json!(round(t.elapsed().as_secs_f64(), 3));
    out["layers"] = json!(tasks.div_ceil(DAG_WIDTH));
    out["edges"] = json!(edges);
    reset_peak_rss();
    let start = Instant::now();
    queue.run_until_idle().await?;
    let elapsed = start.elapsed();
    out["peak_rss_mb"] = json!(peak_rss_mb().map(|r| round(r, 1)));
    let wf = queue.workflow(&sub.workflow_id).await?;
    if wf.status != crate::model::WorkflowStatus::Succeeded || wf.tasks_done != tasks as u64 {
        return Err(Error::Store(format!(
            "the workflow ended {} with {} of {tasks} tasks done; the benchmark is not valid",
            wf.status, wf.tasks_done
        )));
    }
    let tps = tasks as f64 / elapsed.as_secs_f64();
    out["tasks_per_sec"] = json!(round(tps, 0));
    out["elapsed_s"] = json!(round(elapsed.as_secs_f64(), 3));
    let per_task_us = 1e6 / tps;
    let noop_per_task_us = 1e6 / noop_tps;
    out["per_task_us"] = json!(round(per_task_us, 1));
    out["baseline"] = json!({
        "what": format!("the noop scenario with {tasks} independent tasks and concurrency {concurrency}, same run, same database"),
        "tasks_per_sec": round(noop_tps, 0),
        "per_task_us": round(noop_per_task_us, 1),
        "p50_ms": noop_out["p50_ms"],
    });
    let ratio = per_task_us / noop_per_task_us;
    out["overhead_ratio"] = json!(round(ratio, 3));
    out["goal"] = json!({
        "target": "time per task within 2x of the noop scenario",
        "met": ratio <= 2.0,
    });
    Ok(())
}

async fn noop_handler(_ctx: TaskContext) -> std::result::Result<Value, HandlerError> {
    Ok(Value::Null)
}

/// Submits `tasks` copies of `template` in batches (the untimed preparation).
async fn submit_prepared(queue: &TaskQueue, template: &TaskSpec, tasks: usize) -> Result<Duration> {
    let t = Instant::now();
    let mut left = tasks;
    while left > 0 {
        let n = left.min(PREP_BATCH);
        queue.submit_batch(vec![template.clone(); n]).await?;
        left -= n;
    }
    Ok(t.elapsed())
}

/// Runs the engine until idle and records throughput, latency and peak RSS
/// in `out`; returns tasks per second.
async fn drain(
    queue: &TaskQueue,
    store: &SqliteStore,
    tasks: usize,
    name: &str,
    handlers: &[&str],
    out: &mut Value,
) -> Result<f64> {
    // The plans as the engine's first claim will see them (N tasks queued).
    out["claim_plan"] = json!(explain_claim(store.read_pool()).await?);
    if !handlers.is_empty() {
        out["claim_plan_with_handlers"] = json!(explain_mirror(store, handlers.len(), true).await?);
    }
    let collector = LatencyCollector::spawn(queue.subscribe(), tasks);
    reset_peak_rss();
    out["rss_before_mb"] = json!(current_rss_mb().map(|r| round(r, 1)));
    let start = Instant::now();
    queue.run_until_idle().await?;
    let elapsed = start.elapsed();
    let rss = peak_rss_mb();
    let (mut lat, lagged) = collector.finish().await;

    let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE name = ? AND status = ?")
        .bind(name)
        .bind(TaskStatus::Succeeded.as_str())
        .fetch_one(store.read_pool())
        .await?;
    if done as usize != tasks {
        return Err(Error::Store(format!(
            "only {done} of {tasks} tasks succeeded; the benchmark is not valid"
        )));
    }
    let mut rec: Vec<f64> = sqlx::query_scalar::<_, i64>(
        "SELECT finished_at - started_at FROM tasks WHERE name = ? AND finished_at IS NOT NULL",
    )
    .bind(name)
    .fetch_all(store.read_pool())
    .await?
    .into_iter()
    .map(|v| v as f64)
    .collect();

    let tps = tasks as f64 / elapsed.as_secs_f64();
    out["tasks_per_sec"] = json!(round(tps, 0));
    out["elapsed_s"] = json!(round(elapsed.as_secs_f64(), 3));
    out["p50_ms"] = json!(round(percentile(&mut lat, 50.0), 3));
    out["p99_ms"] = json!(round(percentile(&mut lat, 99.0), 3));
    out["latency_what"] = json!(
        "per task, from the commit of its claim to the commit of its finish (committed-event subscriber, Instant clock)"
    );
    out["latency_samples"] = json!(lat.len());
    if lagged > 0 {
        out["latency_events_lost"] = json!(lagged);
    }
    out["record_p50_ms"] = json!(percentile(&mut rec, 50.0));
    out["record_p99_ms"] = json!(percentile(&mut rec, 99.0));
    out["record_latency_what"] = json!(
        "finished_at - started_at of the stored tasks (ms resolution; claim time to handler end, before the finish commit)"
    );
    out["peak_rss_mb"] = json!(rss.map(|r| round(r, 1)));
    out["peak_rss_what"] = json!(
        "VmHWM, reset via /proc/self/clear_refs before the engine started, read when all tasks were terminal"
    );
    Ok(tps)
}

/// EXPLAIN QUERY PLAN of the claim query with `names` handler names, as the
/// engine sends it when handlers are registered (see `claim_sql_mirror`).
async fn explain_mirror(store: &SqliteStore, names: usize, hinted: bool) -> Result<Vec<String>> {
    let sql = format!("EXPLAIN QUERY PLAN {}", claim_sql_mirror(names, hinted));
    let mut q = sqlx::query_as::<_, (i64, i64, i64, String)>(AssertSqlSafe(sql))
        .bind(0i64)
        .bind(1i64);
    for _ in 0..names {
        q = q.bind(NOOP_TASK);
    }
    Ok(q.fetch_all(store.read_pool())
        .await?
        .into_iter()
        .map(|r| r.3)
        .collect())
}

/// Measures claim-commit to finish-commit per task from the store's committed events.
struct LatencyCollector {
    handle: tokio::task::JoinHandle<(Vec<f64>, u64)>,
    stop: watch::Sender<bool>,
}

impl LatencyCollector {
    fn spawn(mut rx: broadcast::Receiver<TaskEvent>, expected: usize) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let handle = tokio::spawn(async move {
            let mut started: HashMap<String, Instant> = HashMap::new();
            let mut lat = Vec::with_capacity(expected);
            let mut lagged = 0u64;
            let mut terminal = 0usize;
            while terminal < expected {
                tokio::select! {
                    biased;
                    r = rx.recv() => match r {
                        Ok(e) => {
                            if e.status.is_terminal() {
                                terminal += 1;
                            }
                            seen(e, &mut started, &mut lat);
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => lagged += n,
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = stopped.changed() => break,
                }
            }
            while let Ok(e) = rx.try_recv() {
                seen(e, &mut started, &mut lat);
            }
            (lat, lagged)
        });
        LatencyCollector { handle, stop }
    }

    async fn finish(self) -> (Vec<f64>, u64) {
        let mut handle = self.handle;
        if let Ok(r) = tokio::time::timeout(Duration::from_millis(500), &mut handle).await {
            return r.unwrap_or_default();
        }
        let _ = self.stop.send(true);
        handle.await.unwrap_or_default()
    }
}

fn seen(e: TaskEvent, started: &mut HashMap<String, Instant>, lat: &mut Vec<f64>) {
    if e.status == TaskStatus::Running {
        started.insert(e.task_id, Instant::now());
    } else if e.status.is_terminal()
        && let Some(t) = started.remove(&e.task_id)
    {
        lat.push(ms(t.elapsed()));
    }
}

/// The same no-op handler over an in-memory tokio mpsc queue with C workers.
async fn baseline_mpsc(tasks: usize, concurrency: usize, template: &TaskSpec) -> Baseline {
    let spec = Arc::new(template.clone());
    let (tx, rx) = mpsc::channel::<String>(tasks);
    for i in 0..tasks {
        let _ = tx.try_send(format!("job-{i}"));
    }
    drop(tx);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let rx = rx.clone();
        let spec = spec.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut results = Vec::new();
            loop {
                let job = rx.lock().await.recv().await;
                let Some(id) = job else { break };
                let t = Instant::now();
                let ctx = TaskContext {
                    id: id.clone(),
                    name: NOOP_TASK.into(),
                    attempt: 1,
                    spec: spec.clone(),
                };
                let r = noop_handler(ctx).await;
                results.push((id, r.is_ok()));
                lat.push(ms(t.elapsed()));
            }
            (lat, results.len())
        });
    }
    let mut lat = Vec::with_capacity(tasks);
    let mut done = 0;
    while let Some(Ok((l, n))) = set.join_next().await {
        lat.extend(l);
        done += n;
    }
    let elapsed = start.elapsed();
    Baseline::new(
        format!(
            "the same no-op handler over an in-memory tokio mpsc queue (pre-filled) with {concurrency} worker tasks; \
             latency = dequeue to result recorded in memory"
        ),
        done,
        elapsed,
        lat,
    )
}

/// Spawns `true` (stdio null) with tokio, `concurrency` at a time.
/// With `fork`, a no-op `pre_exec` hook forces std's fork+exec path
/// instead of `posix_spawn`: the cost the executor avoids by cloning with
/// `CLONE_VM | CLONE_VFORK` for its set-up steps.
async fn baseline_spawn(tasks: usize, concurrency: usize, fork: bool) -> Result<Baseline> {
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut set = JoinSet::new();
    let mut lat = Vec::with_capacity(tasks);
    let mut failed = 0usize;
    let mut collect = |r: std::result::Result<(f64, bool), tokio::task::JoinError>| match r {
        Ok((l, ok)) => {
            lat.push(l);
            if !ok {
                failed += 1;
            }
        }
        Err(_) => failed += 1,
    };
    let start = Instant::now();
    for _ in 0..tasks {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| Error::Store(e.to_string()))?;
        set.spawn(async move {
            let t = Instant::now();
            let mut cmd = tokio::process::Command::new("true");
            cmd.stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            if fork {
                // SAFETY: the hook does nothing, so it is async-signal-safe.
                unsafe {
                    cmd.pre_exec(|| Ok(()));
                }
            }
            let ok = cmd.status().await.is_ok_and(|s| s.success());
            drop(permit);
            (ms(t.elapsed()), ok)
        });
        while let Some(r) = set.try_join_next() {
            collect(r);
        }
    }
    while let Some(r) = set.join_next().await {
        collect(r);
    }
    let elapsed = start.elapsed();
    if failed > 0 {
        return Err(Error::Store(format!(
            "{failed} baseline runs of `true` failed"
        )));
    }
    Ok(Baseline::new(
        format!(
            "tokio::process::Command spawning `true` (stdio null{}), {concurrency} at a time; latency = spawn to exit",
            if fork {
                ", no-op pre_exec hook: std's fork+exec path"
            } else {
                ""
            }
        ),
        tasks,
        elapsed,
        lat,
    ))
}

/// The engine's executor (`executor::run_command`: its spawn, output
/// capture, result file and process guard) running `tasks` attempts of
/// `template`, `concurrency` at a time, with no store: what the engine
/// could reach if claims and finishes cost nothing.
async fn executor_loop(template: &TaskSpec, tasks: usize, concurrency: usize) -> Result<Baseline> {
    let reaper = crate::executor::reaper::Reaper::spawn().ok().map(Arc::new);
    let scratch_dir =
        std::env::temp_dir().join(format!("task-queue-bench-exec-{}", std::process::id()));
    std::fs::create_dir_all(&scratch_dir)?;
    let settings = Arc::new(crate::executor::ExecSettings {
        env_allowlist: Config::default().execution.env_allowlist,
        kill_grace: Duration::from_secs(1),
        scratch_dir: scratch_dir.clone(),
    });
    let spec = Arc::new(template.clone());
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..concurrency {
        let (reaper, settings, spec, next) =
            (reaper.clone(), settings.clone(), spec.clone(), next.clone());
        set.spawn(async move {
            let (_stop_tx, stop) = watch::channel(None);
            let mut lat = Vec::new();
            let mut failed = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= tasks {
                    return (lat, failed);
                }
                let ctx = TaskContext {
                    id: format!("exec-{i}"),
                    name: BENCH_TASK.to_string(),
                    attempt: 1,
                    spec: spec.clone(),
                };
                let t = Instant::now();
                let r =
                    crate::executor::run_command(&ctx, &settings, reaper.as_deref(), stop.clone())
                        .await;
                lat.push(ms(t.elapsed()));
                if r.status != crate::model::AttemptStatus::Succeeded {
                    failed += 1;
                }
            }
        });
    }
    let mut lat = Vec::with_capacity(tasks);
    let mut failed = 0;
    while let Some(r) = set.join_next().await {
        let (l, f) = r.map_err(|e| Error::Store(e.to_string()))?;
        lat.extend(l);
        failed += f;
    }
    let elapsed = start.elapsed();
    let _ = std::fs::remove_dir_all(&scratch_dir);
    if failed > 0 {
        return Err(Error::Store(format!(
            "{failed} executor runs of `true` failed"
        )));
    }
    Ok(Baseline::new(
        format!(
            "the engine's executor (run_command: spawn, output capture, result file, process guard) running `true`, \
             {concurrency} at a time, without the store; latency = attempt start to report"
        ),
        tasks,
        elapsed,
        lat,
    ))
}

// ---------------------------------------------------------------- history

/// Inserts `n` succeeded tasks straight into `tasks` through a raw
/// connection (multi-row INSERTs; no audit or attempt rows).
async fn prefill_history(db: &Path, n: usize) -> Result<()> {
    if n == 0 {
        return Ok(());
    }
    let spec = Task::new(HISTORY_TASK).with_kind(TaskKind::External);
    let spec_json = crate::model::canonical_json(&spec)?;
    let spec_hash = crate::integrity::spec_hash(&spec_json);
    let result = r#"{"attempt":1,"duration_ms":0}"#;
    let mut conn = connect_raw(db).await?;
    let base = SystemClock.now_ms() - 86_400_000;
    let mut i = 0usize;
    while i < n {
        let tx_end = (i + HISTORY_ROWS_PER_TX).min(n);
        let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
        while i < tx_end {
            let rows = HISTORY_ROWS_PER_INSERT.min(tx_end - i);
            let mut sql = String::from(
                "INSERT INTO tasks (id, name, kind, status, priority, attempts, max_attempts, run_at, \
                 created_at, updated_at, started_at, finished_at, spec, spec_hash, result) VALUES ",
            );
            for r in 0..rows {
                if r > 0 {
                    sql.push(',');
                }
                sql.push_str("(?,?,'external','succeeded',0,1,3,?,?,?,?,?,?,?,?)");
            }
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for r in 0..rows {
                let at = base + (i + r) as i64 / 16;
                q = q
                    .bind(uuid::Uuid::now_v7().to_string())
                    .bind(HISTORY_TASK)
                    .bind(at)
                    .bind(at)
                    .bind(at)
                    .bind(at)
                    .bind(at)
                    .bind(&spec_json)
                    .bind(&spec_hash)
                    .bind(result);
            }
            q.execute(&mut *tx).await?;
            i += rows;
        }
        tx.commit().await?;
    }
    let _ = conn.close().await;
    Ok(())
}

// ---------------------------------------------------------------- helpers

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn round(v: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (v * f).round() / f
}

/// Nearest-rank percentile (sorts in place); 0 for no samples.
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Resets VmHWM to the current RSS (Linux >= 4.0); false if not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn status_kb(field: &str) -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
}

fn peak_rss_mb() -> Option<f64> {
    status_kb("VmHWM:").map(|kb| kb / 1024.0)
}

fn current_rss_mb() -> Option<f64> {
    status_kb("VmRSS:").map(|kb| kb / 1024.0)
}

fn print_summary(out: &Value) {
    let f = |k: &str| out.get(k).cloned().unwrap_or(Value::Null);
    let num = |v: &Value| v.as_f64().unwrap_or(0.0);
    outln!(
        "scenario    {} ({} tasks, concurrency {}{}{}, {})",
        f("scenario").as_str().unwrap_or(""),
        f("tasks"),
        f("concurrency"),
        out.get("batch")
            .map(|b| format!(", batch {b}"))
            .unwrap_or_default(),
        out.get("history")
            .map(|h| format!(", history {h}"))
            .unwrap_or_default(),
        f("durability").as_str().unwrap_or(""),
    );
    outln!(
        "queue       {:>10.0} tasks/s   p50 {:.3} ms   p99 {:.3} ms   peak RSS {} MB   ({} s)",
        num(&f("tasks_per_sec")),
        num(&f("p50_ms")),
        num(&f("p99_ms")),
        f("peak_rss_mb"),
        f("elapsed_s"),
    );
    if let Some(what) = out.get("latency_what").and_then(Value::as_str) {
        outln!("            latency: {what}");
    }
    if let Some(b) = out.get("baseline") {
        outln!(
            "baseline    {:>10.0} tasks/s   p50 {:.3} ms   p99 {:.3} ms   ({} tasks)",
            num(&b["tasks_per_sec"]),
            num(&b["p50_ms"]),
            num(&b["p99_ms"]),
            b["tasks"],
        );
        outln!("            {}", b["what"].as_str().unwrap_or(""));
        outln!("ratio       {} x baseline", f("baseline_ratio"));
    }
    if let Some(b) = out.get("storage_floor") {
        outln!(
            "floor       {:>10.0} tasks/s   {:.2} us/task   {:.0} tasks/s with its checkpoint ({} s)",
            num(&b["tasks_per_sec"]),
            num(&b["us_per_task"]),
            num(&b["tasks_per_sec_with_checkpoint"]),
            b["checkpoint_s"],
        );
        outln!("            {}", b["what"].as_str().unwrap_or(""));
        outln!("ratio       {} x floor", f("floor_ratio"));
    }
    if let Some(b) = out.get("baseline_fork") {
        outln!(
            "fork+exec   {:>10.0} tasks/s   p50 {:.3} ms   p99 {:.3} ms   (baseline with a pre_exec hook)",
            num(&b["tasks_per_sec"]),
            num(&b["p50_ms"]),
            num(&b["p99_ms"]),
        );
    }
    if let Some(c) = out.get("claim") {
        for key in ["commands_only", "with_handler"] {
            let v = &c[key];
            outln!(
                "claim       {:>10.0} claims/s  p50 {:.3} ms   p99 {:.3} ms   query alone p50 {:.3} ms   ({key})",
                num(&v["claims_per_sec"]),
                num(&v["p50_ms"]),
                num(&v["p99_ms"]),
                num(&v["query_only_p50_ms"]),
            );
        }
    }
    if let Some(h) = out.get("history_prefill_s") {
        outln!(
            "history     {} tasks pre-filled in {h} s ({})",
            f("history"),
            f("history_note").as_str().unwrap_or("")
        );
    }
    if let Some(g) = out.get("goal") {
        outln!(
            "goal        {}: {}",
            g["target"].as_str().unwrap_or(""),
            if g["met"].as_bool() == Some(true) {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    for (key, title) in [
        ("claim_plan", "claim plan (explain_claim)"),
        (
            "claim_plan_with_handlers",
            "claim plan (engine query with a handler name)",
        ),
    ] {
        if let Some(plan) = out.get(key).and_then(Value::as_array) {
            outln!("{title}");
            for line in plan {
                outln!("            {}", line.as_str().unwrap_or(""));
            }
        }
    }
}
