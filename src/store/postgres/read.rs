//! Queries served by the pool (reads need no writer).

use futures_util::TryStreamExt;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};

use crate::error::{Error, Result};
use crate::integrity::{AuditEvent, AuditReport, ChainVerifier};
use crate::model::WorkflowStatus;
use crate::model::{
    Attempt, AttemptStatus, Condition, DependencyEdge, EdgeState, LogChunk, ScheduleRecord,
    TaskKind, TaskRecord, TaskResult, TaskSpec, TaskStatus, Timestamp, WorkflowDetail,
    WorkflowRecord,
};
use crate::store::{
    ClaimRequest, QueueStats, StatusCounts, StreamEvent, TaskFilter, WorkerInfo, WorkflowFilter,
};

const TASK_COLUMNS: &str = "seq, id, name, kind, project, tags, status, priority, attempts, max_attempts, \
    run_at, created_at, updated_at, started_at, finished_at, lease_owner, lease_expires_at, \
    idempotency_key, spec, spec_hash, result, error, workflow_id, schedule_id, deps_pending, approval";

fn task_from_row(row: &PgRow) -> Result<(i64, TaskRecord)> {
    let id: String = row.get(1);
    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
        Error::Store(format!("task {id}: stored {what} is unreadable: {e}"))
    };
    let kind: String = row.get(3);
    let status: String = row.get(6);
    let tags: String = row.get(5);
    let spec: String = row.get(18);
    let result: Option<String> = row.get(20);
    let record = TaskRecord {
        id: id.clone(),
        name: row.get(2),
        kind: match kind.as_str() {
            "http" => TaskKind::Http,
            "external" => TaskKind::External,
            _ => TaskKind::Command,
        },
        project: row.get(4),
        tags: serde_json::from_str(&tags).map_err(|e| corrupt("tags", &e))?,
        status: status.parse().map_err(|e: String| corrupt("status", &e))?,
        priority: row.get(7),
        attempts: row.get::<i64, _>(8) as u32,
        max_attempts: row.get::<i64, _>(9) as u32,
        run_at: Timestamp(row.get(10)),
        created_at: Timestamp(row.get(11)),
        updated_at: Timestamp(row.get(12)),
        started_at: row.get::<Option<i64>, _>(13).map(Timestamp),
        finished_at: row.get::<Option<i64>, _>(14).map(Timestamp),
        lease_owner: row.get(15),
        lease_expires_at: row.get::<Option<i64>, _>(16).map(Timestamp),
        idempotency_key: row.get(17),
        spec: serde_json::from_str::<TaskSpec>(&spec).map_err(|e| corrupt("spec", &e))?,
        spec_hash: row.get(19),
        result: match result {
            Some(r) => {
                Some(serde_json::from_str::<TaskResult>(&r).map_err(|e| corrupt("result", &e))?)
            }
            None => None,
        },
        error: row.get(21),
        workflow_id: row.get(22),
        schedule_id: row.get(23),
        deps_pending: row.get::<i64, _>(24) as u32,
        approval: match row.get::<Option<String>, _>(25) {
            Some(a) => Some(serde_json::from_str(&a).map_err(|e| corrupt("approval", &e))?),
            None => None,
        },
    };
    Ok((row.get(0), record))
}

/// A read-only transaction whose reads all see one snapshot.
pub(super) async fn snapshot(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    Ok(pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .await?)
}

pub(super) async fn get<'e>(ex: impl sqlx::PgExecutor<'e>, id: &str) -> Result<Option<TaskRecord>> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(ex)
        .await?;
    row.map(|r| task_from_row(&r).map(|(_, t)| t)).transpose()
}

pub(super) async fn list(pool: &PgPool, f: &TaskFilter) -> Result<Vec<(i64, TaskRecord)>> {
    let mut n = Params::default();
    let mut sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE 1 = 1");
    if !f.statuses.is_empty() {
        sql.push_str(&format!(" AND status IN ({})", n.list(f.statuses.len())));
    }
    if f.project.is_some() {
        sql.push_str(&format!(" AND project = {}", n.next()));
    }
    if f.tag.is_some() {
        sql.push_str(&format!(
            " AND tags::jsonb @> jsonb_build_array({}::text)",
            n.next()
        ));
    }
    if f.name.is_some() {
        sql.push_str(&format!(" AND name = {}", n.next()));
    }
    if f.workflow_id.is_some() {
        sql.push_str(&format!(" AND workflow_id = {}", n.next()));
    }
    if !f.ids.is_empty() {
        sql.push_str(&format!(" AND id IN ({})", n.list(f.ids.len())));
    }
    if f.before_seq.is_some() {
        sql.push_str(&format!(" AND seq < {}", n.next()));
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", n.next()));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for s in &f.statuses {
        q = q.bind(s.as_str());
    }
    if let Some(p) = &f.project {
        q = q.bind(p);
    }
    if let Some(t) = &f.tag {
        q = q.bind(t);
    }
    if let Some(n) = &f.name {
        q = q.bind(n);
    }
    if let Some(w) = &f.workflow_id {
        q = q.bind(w);
    }
    for id in &f.ids {
        q = q.bind(id);
    }
    if let Some(b) = f.before_seq {
        q = q.bind(b);
    }
    let limit = if f.limit == 0 { 100 } else { f.limit };
    q = q.bind(limit as i64);
    q.fetch_all(pool).await?.iter().map(task_from_row).collect()
}

/// Numbers `$1, $2, ...` in the order a query is built.
#[derive(Default)]
pub(super) struct Params(usize);

impl Params {
    pub(super) fn next(&mut self) -> String {
        self.0 += 1;
        format!("${}", self.0)
    }
    pub(super) fn list(&mut self, n: usize) -> String {
        (0..n).map(|_| self.next()).collect::<Vec<_>>().join(",")
    }
}

/// A task and its attempts from one snapshot.
pub(super) async fn task_with_attempts(
    pool: &PgPool,
    id: &str,
) -> Result<Option<(TaskRecord, Vec<Attempt>)>> {
    let mut tx = snapshot(pool).await?;
    let out = match get(&mut *tx, id).await? {
        Some(t) => Some((t, attempts(&mut *tx, id).await?)),
        None => None,
    };
    tx.commit().await?;
    Ok(out)
}

pub(super) async fn attempts<'e>(ex: impl sqlx::PgExecutor<'e>, id: &str) -> Result<Vec<Attempt>> {
    let rows = sqlx::query(
        "SELECT task_id, attempt, worker_id, status, started_at, finished_at, error, result \
         FROM attempts WHERE task_id = $1 ORDER BY attempt",
    )
    .bind(id)
    .fetch_all(ex)
    .await?;
    rows.iter()
        .map(|r| {
            let status: String = r.get(3);
            let result: String = r.get(7);
            let mut result: TaskResult = serde_json::from_str(&result)
                .map_err(|e| Error::Store(format!("attempt result is unreadable: {e}")))?;
            result.attempt = r.get::<i64, _>(1) as u32;
            Ok(Attempt {
                task_id: r.get(0),
                worker_id: r.get(2),
                status: AttemptStatus::parse(&status).unwrap_or(AttemptStatus::Failed),
                started_at: Timestamp(r.get(4)),
                finished_at: Timestamp(r.get(5)),
                error: r.get(6),
                result,
            })
        })
        .collect()
}

pub(super) async fn logs(pool: &PgPool, id: &str, attempt: Option<u32>) -> Result<Vec<LogChunk>> {
    let rows = sqlx::query(
        "SELECT attempt, stream, data, dropped_bytes FROM task_logs \
         WHERE task_id = $1 AND ($2 IS NULL OR attempt = $2) ORDER BY attempt, stream DESC",
    )
    .bind(id)
    .bind(attempt.map(|a| a as i64))
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let data: Vec<u8> = r.get(2);
            LogChunk {
                attempt: r.get::<i64, _>(0) as u32,
                stream: r.get(1),
                text: String::from_utf8_lossy(&data).into_owned(),
                dropped_bytes: r.get::<i64, _>(3) as u64,
            }
        })
        .collect())
}

fn audit_from_row(r: &PgRow) -> AuditEvent {
    AuditEvent {
        seq: r.get(0),
        at: r.get(1),
        task_id: r.get(2),
        kind: r.get(3),
        from_status: r.get(4),
        to_status: r.get(5),
        detail: r.get(6),
        prev_hash: r.get(7),
        hash: r.get(8),
    }
}

const AUDIT_COLUMNS: &str =
    "seq, at, task_id, kind, from_status, to_status, detail, prev_hash, hash";

pub(super) async fn audit_events(
    pool: &PgPool,
    task_id: Option<&str>,
    limit: usize,
) -> Result<Vec<AuditEvent>> {
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit_events WHERE ($1 IS NULL OR task_id = $1) ORDER BY seq LIMIT $2"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(task_id)
        .bind(limit.max(1) as i64)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(audit_from_row).collect())
}

pub(super) async fn events_after(
    pool: &PgPool,
    after: i64,
    workflow_id: Option<&str>,
    project: Option<&str>,
    limit: usize,
) -> Result<Vec<StreamEvent>> {
    // Task events join their task; workflow events (task_id = the workflow
    // id) join their workflow. Schedule events are left out.
    let rows = sqlx::query(
        "SELECT a.seq, a.at, a.task_id, a.kind, a.from_status, a.to_status, a.detail, \
         COALESCE(t.name, w.name), COALESCE(t.workflow_id, w.id), COALESCE(t.project, w.project), \
         w.id IS NOT NULL \
         FROM audit_events a \
         LEFT JOIN tasks t ON t.id = a.task_id \
         LEFT JOIN workflows w ON w.id = a.task_id \
         WHERE a.seq > $1 AND (t.id IS NOT NULL OR w.id IS NOT NULL) \
         AND ($2 IS NULL OR COALESCE(t.workflow_id, w.id) = $2) \
         AND ($3 IS NULL OR COALESCE(t.project, w.project) = $3) \
         ORDER BY a.seq LIMIT $4",
    )
    .bind(after)
    .bind(workflow_id)
    .bind(project)
    .bind(limit.max(1) as i64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let is_workflow: bool = r.get(10);
            let detail: String = r.get(6);
            let subject: String = r.get(2);
            StreamEvent {
                seq: r.get(0),
                at: Timestamp(r.get(1)),
                object: if is_workflow { "workflow" } else { "task" }.to_string(),
                kind: r.get(3),
                task_id: (!is_workflow).then(|| subject.clone()),
                name: r.get(7),
                workflow_id: r.get(8),
                project: r.get(9),
                from: r.get(4),
                to: r.get(5),
                detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
            }
        })
        .collect())
}

pub(super) async fn verify_audit(pool: &PgPool) -> Result<AuditReport> {
    let sql = format!("SELECT {AUDIT_COLUMNS} FROM audit_events ORDER BY seq");
    let mut verifier = ChainVerifier::default();
    let mut conn = pool.acquire().await?;
    let mut rows = sqlx::query(AssertSqlSafe(sql)).fetch(&mut *conn);
    while let Some(row) = rows.try_next().await? {
        if !verifier.push(&audit_from_row(&row)) {
            break;
        }
    }
    drop(rows);
    let mut report = verifier.finish();
    if report.ok {
        let row: Option<(String, String, Option<i64>, Option<String>)> =
            sqlx::query_as(crate::integrity::HEAD_MISMATCH_SQL)
                .fetch_optional(&mut *conn)
                .await?;
        crate::integrity::check_task_heads(
            &mut report,
            row.map(|(id, st, seq, to)| (id, st, seq.zip(to))),
        );
    }
    Ok(report)
}

pub(super) async fn counts<'e>(ex: impl sqlx::PgExecutor<'e>) -> Result<StatusCounts> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM tasks GROUP BY status")
            .fetch_all(ex)
            .await?;
    let mut out = StatusCounts::new();
    for (s, n) in rows {
        if let Ok(st) = s.parse::<TaskStatus>() {
            out.insert(st, n as u64);
        }
    }
    Ok(out)
}

/// The queue's numbers, read in one transaction so that they add up.
pub(super) async fn stats(pool: &PgPool, now: i64) -> Result<QueueStats> {
    let mut tx = snapshot(pool).await?;
    let out = stats_in(&mut tx, now).await?;
    tx.commit().await?;
    Ok(out)
}

async fn stats_in(conn: &mut sqlx::PgConnection, now: i64) -> Result<QueueStats> {
    let mut out = QueueStats {
        tasks: counts(&mut *conn).await?,
        ..QueueStats::default()
    };
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT project, status, COUNT(*) FROM tasks \
         WHERE project IS NOT NULL GROUP BY project, status",
    )
    .fetch_all(&mut *conn)
    .await?;
    for (p, s, n) in rows {
        if let Ok(st) = s.parse::<TaskStatus>() {
            out.by_project.entry(p).or_default().insert(st, n as u64);
        }
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM workflows GROUP BY status")
            .fetch_all(&mut *conn)
            .await?;
    for (s, n) in rows {
        if let Ok(st) = s.parse::<WorkflowStatus>() {
            out.workflows.insert(st, n as u64);
        }
    }
    let (ready, oldest): (i64, Option<i64>) = sqlx::query_as(
        "SELECT COUNT(*), MIN(run_at) FROM tasks \
         WHERE status IN ('queued', 'retrying') AND run_at <= $1",
    )
    .bind(now)
    .fetch_one(&mut *conn)
    .await?;
    out.ready = ready as u64;
    out.oldest_ready_ms = oldest.map(|t| (now - t).max(0));
    let (active, paused): (i64, i64) = sqlx::query_as(
        "SELECT COUNT(*) FILTER (WHERE paused = 0), COUNT(*) FILTER (WHERE paused <> 0) FROM schedules",
    )
    .fetch_one(&mut *conn)
    .await?;
    out.schedules_active = active as u64;
    out.schedules_paused = paused as u64;
    let leases: Vec<(String, i64)> = sqlx::query_as(
        "SELECT lease_owner, COUNT(*) FROM tasks \
         WHERE status = 'running' AND lease_owner IS NOT NULL GROUP BY lease_owner",
    )
    .fetch_all(&mut *conn)
    .await?;
    out.leases_by_worker = leases.into_iter().map(|(w, n)| (w, n as u64)).collect();
    Ok(out)
}

pub(super) async fn runnable_count(pool: &PgPool, req: &ClaimRequest) -> Result<u64> {
    // The claim query's filter, without its ordering and limit.
    let claim = super::writer::claim_sql(req);
    let filter_start = claim.find("AND kind").or_else(|| claim.find("AND (kind"));
    let filter_end = claim.find(" ORDER BY");
    let kind_filter = match (filter_start, filter_end) {
        (Some(a), Some(b)) => &claim[a..b],
        _ => "AND false",
    };
    let n = 3 + super::writer::claim_binds(req).len();
    let sql = format!(
        "SELECT (SELECT COUNT(*) FROM tasks WHERE status IN ('queued', 'retrying') AND $1 = $1 AND $2 = $2 {kind_filter}) + \
         (SELECT COUNT(*) FROM tasks WHERE status = 'pending' AND deps_pending = 0 AND schedule_id IS NULL AND run_at <= $1 {kind_filter}) + \
         (SELECT COUNT(*) FROM tasks WHERE status = 'running' AND (lease_owner = ${n} OR lease_expires_at < $1))"
    );
    let mut q = sqlx::query_scalar::<_, i64>(AssertSqlSafe(sql))
        .bind(req.now)
        .bind(req.limit as i64);
    for v in super::writer::claim_binds(req) {
        q = q.bind(v);
    }
    let n = q.bind(&req.worker_id).fetch_one(pool).await?;
    Ok(n as u64)
}

pub(super) async fn next_run_at(pool: &PgPool, now: i64) -> Result<Option<i64>> {
    let v: Option<i64> = sqlx::query_scalar(
        // Queued tasks are due; retrying ones and timers wait for run_at;
        // schedules for their next firing.
        "SELECT MIN(t) FROM ( \
           SELECT MIN(run_at) AS t FROM tasks WHERE status = 'retrying' AND run_at > $1 \
           UNION ALL SELECT MIN(run_at) FROM tasks WHERE status = 'pending' AND deps_pending = 0 AND run_at > $1 \
           UNION ALL SELECT MIN(next_fire_at) FROM schedules WHERE paused = 0 AND next_fire_at > $1) AS due",
    )
    .bind(now)
    .fetch_one(pool)
    .await?;
    Ok(v)
}

pub(super) async fn dependencies(pool: &PgPool, id: &str) -> Result<Vec<DependencyEdge>> {
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT dep_id, task_id, condition, state FROM task_deps WHERE task_id = $1 \
         UNION ALL SELECT dep_id, task_id, condition, state FROM task_deps WHERE dep_id = $1",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(edge_from).collect())
}

fn edge_from(
    (dep_id, task_id, condition, state): (String, String, String, String),
) -> DependencyEdge {
    DependencyEdge {
        dep_id,
        task_id,
        condition: serde_json::from_str(&condition).unwrap_or(Condition::Success),
        state: EdgeState::parse(&state),
    }
}

const WORKFLOW_COLUMNS: &str = "seq, id, name, project, tags, description, status, schedule_id, \
    tasks_total, tasks_done, created_at, updated_at, finished_at, idempotency_key";

fn workflow_from_row(r: &PgRow) -> Result<(i64, WorkflowRecord)> {
    let tags: String = r.get(4);
    let status: String = r.get(6);
    Ok((
        r.get(0),
        WorkflowRecord {
            id: r.get(1),
            name: r.get(2),
            project: r.get(3),
            tags: serde_json::from_str(&tags).unwrap_or_default(),
            description: r.get(5),
            status: status
                .parse()
                .map_err(|e: String| Error::Store(format!("workflow status: {e}")))?,
            schedule_id: r.get(7),
            tasks_total: r.get::<i64, _>(8) as u64,
            tasks_done: r.get::<i64, _>(9) as u64,
            created_at: Timestamp(r.get(10)),
            updated_at: Timestamp(r.get(11)),
            finished_at: r.get::<Option<i64>, _>(12).map(Timestamp),
            idempotency_key: r.get(13),
        },
    ))
}

/// The workflow whose `column` (a unique one: `id` or `idempotency_key`)
/// is `value`.
async fn workflow_where<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    column: &'static str,
    value: &str,
) -> Result<Option<WorkflowRecord>> {
    let sql = format!("SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE {column} = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(value)
        .fetch_optional(ex)
        .await?;
    row.map(|r| workflow_from_row(&r).map(|(_, w)| w))
        .transpose()
}

pub(super) async fn workflow_by_key(pool: &PgPool, key: &str) -> Result<Option<WorkflowRecord>> {
    workflow_where(pool, "idempotency_key", key).await
}

pub(super) async fn workflow(pool: &PgPool, id: &str) -> Result<Option<WorkflowRecord>> {
    workflow_where(pool, "id", id).await
}

/// A workflow with its tasks and edges, read in one transaction so that
/// its status, its tasks' statuses and its edges' states agree.
pub(super) async fn workflow_detail(pool: &PgPool, id: &str) -> Result<Option<WorkflowDetail>> {
    let mut tx = snapshot(pool).await?;
    let out = workflow_detail_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(out)
}

async fn workflow_detail_in(
    conn: &mut sqlx::PgConnection,
    id: &str,
) -> Result<Option<WorkflowDetail>> {
    let Some(workflow) = workflow_where(&mut *conn, "id", id).await? else {
        return Ok(None);
    };
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE workflow_id = $1 ORDER BY seq");
    let tasks: Vec<TaskRecord> = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|r| task_from_row(r).map(|(_, t)| t))
        .collect::<Result<_>>()?;
    let rows: Vec<(String, String, String, String)> = sqlx::query_as(
        "SELECT d.dep_id, d.task_id, d.condition, d.state FROM task_deps d \
         JOIN tasks t ON t.id = d.task_id WHERE t.workflow_id = $1 ORDER BY t.seq",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    let mut counts = std::collections::BTreeMap::new();
    for t in &tasks {
        *counts.entry(t.status).or_insert(0u64) += 1;
    }
    Ok(Some(WorkflowDetail {
        workflow,
        counts,
        tasks,
        edges: rows.into_iter().map(edge_from).collect(),
    }))
}

pub(super) async fn list_workflows(
    pool: &PgPool,
    f: &WorkflowFilter,
) -> Result<Vec<(i64, WorkflowRecord)>> {
    let mut n = Params::default();
    let mut sql = format!("SELECT {WORKFLOW_COLUMNS} FROM workflows WHERE 1 = 1");
    if !f.statuses.is_empty() {
        sql.push_str(&format!(" AND status IN ({})", n.list(f.statuses.len())));
    }
    if f.project.is_some() {
        sql.push_str(&format!(" AND project = {}", n.next()));
    }
    if f.name.is_some() {
        sql.push_str(&format!(" AND name = {}", n.next()));
    }
    if f.schedule_id.is_some() {
        sql.push_str(&format!(" AND schedule_id = {}", n.next()));
    }
    if f.before_seq.is_some() {
        sql.push_str(&format!(" AND seq < {}", n.next()));
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", n.next()));
    let mut q = sqlx::query(AssertSqlSafe(sql));
    for s in &f.statuses {
        q = q.bind(s.as_str());
    }
    if let Some(p) = &f.project {
        q = q.bind(p);
    }
    if let Some(n) = &f.name {
        q = q.bind(n);
    }
    if let Some(s) = &f.schedule_id {
        q = q.bind(s);
    }
    if let Some(b) = f.before_seq {
        q = q.bind(b);
    }
    let limit = if f.limit == 0 { 100 } else { f.limit };
    q = q.bind(limit as i64);
    q.fetch_all(pool)
        .await?
        .iter()
        .map(workflow_from_row)
        .collect()
}

const SCHEDULE_COLUMNS: &str = "id, name, project, cron, timezone, paused, next_fire_at, \
    upcoming_run, last_fired_at, runs, created_at, template";

fn schedule_from_row(r: &PgRow) -> ScheduleRecord {
    let template: String = r.get(11);
    ScheduleRecord {
        id: r.get(0),
        name: r.get(1),
        project: r.get(2),
        cron: r.get(3),
        timezone: r.get(4),
        paused: r.get::<i64, _>(5) != 0,
        next_fire_at: r.get::<Option<i64>, _>(6).map(Timestamp),
        upcoming_run: r.get(7),
        last_fired_at: r.get::<Option<i64>, _>(8).map(Timestamp),
        runs: r.get::<i64, _>(9) as u64,
        created_at: Timestamp(r.get(10)),
        template: serde_json::from_str(&template).unwrap_or(serde_json::Value::Null),
    }
}

pub(super) async fn schedule(pool: &PgPool, id: &str) -> Result<Option<ScheduleRecord>> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE id = $1");
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    Ok(row.as_ref().map(schedule_from_row))
}

pub(super) async fn list_schedules(pool: &PgPool) -> Result<Vec<ScheduleRecord>> {
    let sql = format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY seq");
    let rows = sqlx::query(AssertSqlSafe(sql)).fetch_all(pool).await?;
    Ok(rows.iter().map(schedule_from_row).collect())
}

pub(super) async fn due_schedules(pool: &PgPool, now: i64) -> Result<Vec<ScheduleRecord>> {
    let sql = format!(
        "SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE paused = 0 AND next_fire_at IS NOT NULL \
         AND next_fire_at <= $1 ORDER BY next_fire_at LIMIT 100"
    );
    let rows = sqlx::query(AssertSqlSafe(sql))
        .bind(now)
        .fetch_all(pool)
        .await?;
    Ok(rows.iter().map(schedule_from_row).collect())
}

pub(super) async fn workers_with_leases(pool: &PgPool, host: &str) -> Result<Vec<WorkerInfo>> {
    let rows = sqlx::query(
        "SELECT id, host, pid, pid_start, started_at FROM workers WHERE host = $1 AND id IN \
         (SELECT lease_owner FROM tasks WHERE status = 'running' AND lease_owner IS NOT NULL)",
    )
    .bind(host)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|r| WorkerInfo {
            id: r.get(0),
            host: r.get(1),
            pid: r.get(2),
            pid_start: r.get(3),
            started_at: r.get(4),
        })
        .collect())
}
