//! `task-queue bench noop --db postgres://... --nodes N`: the noop scenario
//! on PostgreSQL, drained by N nodes at once.
//!
//! The run works in a new schema of the named database, dropped at the
//! end, so the database's own tables are never touched. Each node is a
//! `TaskQueue` of its own in this process, with its own connection pool,
//! writer, listener and engine: to the database they are N separate
//! nodes, while they share this machine's CPUs as separate processes
//! would. N external no-op tasks are submitted first (not timed); then
//! every node runs its engine until no work is left, and throughput is
//! N tasks over the time until the last node is idle.

use std::sync::Arc;
use std::time::Instant;

use serde_json::{Value, json};

use super::{NOOP_TASK, PREP_BATCH, noop_handler, round};
use crate::config::Config;
use crate::engine::clock::SystemClock;
use crate::error::{Error, Result};
use crate::model::{Task, TaskKind};
use crate::service::TaskQueue;
use crate::store::postgres::{PgStore, redacted};

/// Most nodes one run starts.
pub const MAX_NODES: usize = 16;

pub(super) async fn bench_noop(
    url: &str,
    config: &Config,
    tasks: usize,
    concurrency: usize,
    nodes: usize,
) -> Result<Value> {
    let admin = sqlx::PgPool::connect(url)
        .await
        .map_err(|e| Error::Store(format!("cannot connect to {}: {e}", redacted(url))))?;
    let schema = format!("bench_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&admin)
        .await?;
    let result = run_nodes(url, &schema, config, tasks, concurrency, nodes).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
        .execute(&admin)
        .await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&admin)
        .await?;
    admin.close().await;
    let mut out = result?;
    out["postgres_version"] = json!(version);
    Ok(out)
}

async fn run_nodes(
    url: &str,
    schema: &str,
    config: &Config,
    tasks: usize,
    concurrency: usize,
    nodes: usize,
) -> Result<Value> {
    let scoped = url
        .parse::<sqlx::postgres::PgConnectOptions>()
        .map_err(|e| Error::invalid("--db", format!("is not a valid PostgreSQL URL: {e}")))?
        .options([("search_path", schema)]);
    let mut cfg = config.clone();
    cfg.execution.max_concurrent_tasks = concurrency;
    let mut queues = Vec::with_capacity(nodes);
    let mut stores = Vec::with_capacity(nodes);
    for _ in 0..nodes {
        let store = PgStore::open_with(scoped.clone(), cfg.storage.read_connections).await?;
        let q = TaskQueue::with_store(Arc::new(store.clone()), cfg.clone(), Arc::new(SystemClock));
        q.register_handler(NOOP_TASK, noop_handler);
        queues.push(q);
        stores.push(store);
    }
    let template = Task::new(NOOP_TASK).with_kind(TaskKind::External);
    let prep = Instant::now();
    let mut left = tasks;
    while left > 0 {
        let n = left.min(PREP_BATCH);
        queues[0].submit_batch(vec![template.clone(); n]).await?;
        left -= n;
    }
    let prepare_s = prep.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut running = tokio::task::JoinSet::new();
    for q in &queues {
        let q = q.clone();
        running.spawn(async move { q.run_until_idle().await });
    }
    while let Some(r) = running.join_next().await {
        r.map_err(|e| Error::Store(format!("a node's engine failed: {e}")))??;
    }
    let elapsed = start.elapsed();
    let pool = stores[0].pool();
    let done: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM tasks WHERE name = $1 AND status = 'succeeded'")
            .bind(NOOP_TASK)
            .fetch_one(pool)
            .await?;
    if done as usize != tasks {
        return Err(Error::Store(format!(
            "only {done} of {tasks} tasks succeeded; the benchmark is not valid"
        )));
    }
    let per_node: Vec<i64> = sqlx::query_scalar(
        "SELECT COUNT(*) FROM attempts GROUP BY worker_id ORDER BY COUNT(*) DESC",
    )
    .fetch_all(pool)
    .await?;
    for s in &stores {
        s.close().await;
    }
    let tps = tasks as f64 / elapsed.as_secs_f64();
    let mut out = json!({
        "scenario": "noop",
        "store": "postgres",
        "db": redacted(url),
        "nodes": nodes,
        "tasks": tasks,
        "concurrency": concurrency,
        "prepare_s": round(prepare_s, 2),
        "elapsed_s": round(elapsed.as_secs_f64(), 3),
        "tasks_per_sec": round(tps, 0),
        "tasks_per_node": per_node,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "what": "N external no-op tasks submitted first (not timed), then drained by every node's engine at once (in-process nodes, each with its own pool, writer and engine)",
    });
    if nodes == 1 {
        out["goal"] = json!({"target": ">= 10000 tasks/s on one node", "met": tps >= 10_000.0});
    }
    Ok(out)
}

/// The human-readable lines of a PostgreSQL run.
pub(super) fn print_summary(out: &Value) {
    println!(
        "scenario    noop on PostgreSQL {} ({} tasks, {} node(s), concurrency {} per node)",
        out["postgres_version"].as_str().unwrap_or("?"),
        out["tasks"],
        out["nodes"],
        out["concurrency"]
    );
    println!(
        "queue       {} tasks/s ({} s); tasks per node {}",
        out["tasks_per_sec"], out["elapsed_s"], out["tasks_per_node"]
    );
    if let Some(goal) = out.get("goal") {
        let met = if goal["met"].as_bool() == Some(true) {
            "met"
        } else {
            "NOT met"
        };
        println!(
            "goal        {}: {met}",
            goal["target"].as_str().unwrap_or("")
        );
    }
}
