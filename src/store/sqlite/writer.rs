//! The single writer: receives operations, applies everything pending in
//! one `BEGIN IMMEDIATE` transaction, commits once, then answers.
//!
//! An operation's own failure (unknown id, bad state) is part of its answer
//! and does not disturb the batch; a database failure fails the whole batch
//! and every caller hears about it.

use sqlx::{AssertSqlSafe, Connection, Row, SqliteConnection};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::integrity::{EventContent, GENESIS_HASH, event_hash};
use crate::model::{
    AttemptStatus, RetryPolicy, TaskEvent, TaskKind, TaskSpec, TaskStatus, Timestamp,
};
use crate::store::{
    ClaimRequest, ClaimedTask, FinishAttempt, FinishOutcome, NewTask, Next, Reclaim, Submitted,
    WorkerInfo,
};

type Reply<T> = oneshot::Sender<Result<T>>;

/// Most operations committed together.
const MAX_BATCH: usize = 2048;
/// Rows per multi-row INSERT (SQLite allows 32766 bound parameters).
const ROWS_PER_INSERT: usize = 500;

pub(super) enum Op {
    Submit {
        tasks: Vec<NewTask>,
        reply: Reply<Vec<Submitted>>,
    },
    Claim {
        req: ClaimRequest,
        reply: Reply<Vec<ClaimedTask>>,
    },
    Finish {
        f: Box<FinishAttempt>,
        reply: Reply<FinishOutcome>,
    },
    Renew {
        worker_id: String,
        now: i64,
        lease_until: i64,
        reply: Reply<Vec<String>>,
    },
    Reclaim {
        scope: Reclaim,
        now: i64,
        reply: Reply<Vec<TaskEvent>>,
    },
    Cancel {
        id: String,
        now: i64,
        reason: Option<String>,
        reply: Reply<()>,
    },
    RegisterWorker {
        w: WorkerInfo,
        reply: Reply<()>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// The answer computed for an op inside the transaction, sent after commit.
enum Answer {
    Submit(Result<Vec<Submitted>>),
    Claim(Vec<ClaimedTask>),
    Finish(FinishOutcome),
    Renew(Vec<String>),
    Reclaim(Vec<TaskEvent>),
    Unit(Result<()>),
}

/// An audit event before its place in the chain is known.
struct AuditDraft {
    at: i64,
    task_id: String,
    kind: &'static str,
    from: Option<&'static str>,
    to: &'static str,
    detail: String,
}

/// An attempt row to insert.
struct AttemptRow {
    task_id: String,
    attempt: u32,
    worker_id: String,
    status: AttemptStatus,
    started_at: i64,
    finished_at: i64,
    exit_code: Option<i32>,
    signal: Option<i32>,
    duration_ms: i64,
    error: Option<String>,
    result: String,
}

/// What one transaction accumulates besides its answers.
#[derive(Default)]
struct Batch {
    audit: Vec<AuditDraft>,
    attempts: Vec<AttemptRow>,
    events: Vec<TaskEvent>,
}

impl Batch {
    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        at: i64,
        task_id: &str,
        name: &str,
        kind: &'static str,
        from: Option<TaskStatus>,
        to: TaskStatus,
        attempt: u32,
        detail: String,
    ) {
        self.audit.push(AuditDraft {
            at,
            task_id: task_id.to_string(),
            kind,
            from: from.map(|s| s.as_str()),
            to: to.as_str(),
            detail,
        });
        self.events.push(TaskEvent {
            task_id: task_id.to_string(),
            name: name.to_string(),
            status: to,
            attempt,
            at: Timestamp(at),
        });
    }
}

pub(super) async fn run(
    mut conn: SqliteConnection,
    mut rx: mpsc::Receiver<Op>,
    events: broadcast::Sender<TaskEvent>,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    while let Some(op) = rx.recv().await {
        ops.push(op);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        let closing = ops.iter().any(|o| matches!(o, Op::Close { .. }));
        let mut batch = Batch::default();
        let started = std::time::Instant::now();
        let result = apply_all(&mut conn, &ops, &mut batch).await;
        tracing::trace!(
            ops = ops.len(),
            micros = started.elapsed().as_micros() as u64,
            "write batch"
        );
        match result {
            Ok(answers) => {
                for (op, answer) in ops.drain(..).zip(answers) {
                    deliver(op, Ok(answer));
                }
                for e in batch.events {
                    let _ = events.send(e);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, ops = ops.len(), "store write failed; the batch was rolled back");
                let msg = e.to_string();
                for op in ops.drain(..) {
                    deliver(op, Err(Error::Store(msg.clone())));
                }
            }
        }
        if closing {
            let _ = conn.close().await;
            return;
        }
    }
}

fn deliver(op: Op, answer: Result<Answer>) {
    fn send<T>(reply: Reply<T>, r: Result<T>) {
        let _ = reply.send(r);
    }
    match (op, answer) {
        (Op::Submit { reply, .. }, Ok(Answer::Submit(r))) => send(reply, r),
        (Op::Claim { reply, .. }, Ok(Answer::Claim(v))) => send(reply, Ok(v)),
        (Op::Finish { reply, .. }, Ok(Answer::Finish(v))) => send(reply, Ok(v)),
        (Op::Renew { reply, .. }, Ok(Answer::Renew(v))) => send(reply, Ok(v)),
        (Op::Reclaim { reply, .. }, Ok(Answer::Reclaim(v))) => send(reply, Ok(v)),
        (Op::Cancel { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::RegisterWorker { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::Close { reply }, Ok(Answer::Unit(r))) => send(reply, r),
        (op, Err(e)) => match op {
            Op::Submit { reply, .. } => send(reply, Err(e)),
            Op::Claim { reply, .. } => send(reply, Err(e)),
            Op::Finish { reply, .. } => send(reply, Err(e)),
            Op::Renew { reply, .. } => send(reply, Err(e)),
            Op::Reclaim { reply, .. } => send(reply, Err(e)),
            Op::Cancel { reply, .. } | Op::RegisterWorker { reply, .. } | Op::Close { reply } => {
                send(reply, Err(e))
            }
        },
        (_, Ok(_)) => unreachable!("answer kind always matches its op"),
    }
}

async fn apply_all(
    conn: &mut SqliteConnection,
    ops: &[Op],
    batch: &mut Batch,
) -> Result<Vec<Answer>> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    // All submits of the batch go in together: one multi-row INSERT for
    // many concurrent submitters.
    let new_tasks: Vec<&NewTask> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Submit { tasks, .. } => Some(tasks.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let mut submitted = submit(&mut tx, &new_tasks, batch).await?.into_iter();
    // Likewise all finishes: one UPDATE for the whole batch.
    let finishes: Vec<&FinishAttempt> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Finish { f, .. } => Some(f.as_ref()),
            _ => None,
        })
        .collect();
    let mut finished = finish_all(&mut tx, &finishes, batch).await?.into_iter();
    let mut answers = Vec::with_capacity(ops.len());
    for op in ops {
        let answer = match op {
            Op::Submit { tasks, .. } => {
                Answer::Submit(Ok(submitted.by_ref().take(tasks.len()).collect()))
            }
            Op::Claim { req, .. } => Answer::Claim(claim(&mut tx, req, batch).await?),
            Op::Finish { .. } => Answer::Finish(finished.next().expect("one outcome per finish")),
            Op::Renew {
                worker_id,
                now,
                lease_until,
                ..
            } => Answer::Renew(renew(&mut tx, worker_id, *now, *lease_until).await?),
            Op::Reclaim { scope, now, .. } => {
                Answer::Reclaim(reclaim(&mut tx, scope, *now, batch).await?)
            }
            Op::Cancel {
                id, now, reason, ..
            } => Answer::Unit(cancel(&mut tx, id, *now, reason, batch).await?),
            Op::RegisterWorker { w, .. } => {
                Answer::Unit(register_worker(&mut tx, w).await.map(|_| Ok(()))?)
            }
            Op::Close { .. } => Answer::Unit(Ok(())),
        };
        answers.push(answer);
    }
    flush_attempts(&mut tx, &batch.attempts).await?;
    flush_audit(&mut tx, &batch.audit).await?;
    tx.commit().await?;
    Ok(answers)
}

async fn submit(
    conn: &mut SqliteConnection,
    tasks: &[&NewTask],
    batch: &mut Batch,
) -> Result<Vec<Submitted>> {
    let mut out: Vec<Option<Submitted>> = vec![None; tasks.len()];
    // Idempotency: existing keys return the earlier task; repeated keys in
    // this batch return the first of them.
    let keyed: Vec<(usize, &str)> = tasks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.idempotency_key.as_deref().map(|k| (i, k)))
        .collect();
    let mut seen_keys: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    if !keyed.is_empty() {
        for chunk in keyed.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT idempotency_key, id, name, status FROM tasks WHERE idempotency_key IN ({})",
                placeholders(chunk.len())
            );
            let mut q = sqlx::query(AssertSqlSafe(sql));
            for (_, k) in chunk {
                q = q.bind(*k);
            }
            for row in q.fetch_all(&mut *conn).await? {
                let key: String = row.get(0);
                let status: String = row.get(3);
                for (i, k) in chunk {
                    if *k == key {
                        out[*i] = Some(Submitted {
                            id: row.get(1),
                            name: row.get(2),
                            created: false,
                            status: status.parse().unwrap_or(TaskStatus::Queued),
                        });
                    }
                }
            }
        }
    }
    let mut to_insert: Vec<&NewTask> = Vec::with_capacity(tasks.len());
    let mut duplicate_of: Vec<(usize, usize)> = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        if out[i].is_some() {
            continue;
        }
        if let Some(k) = t.idempotency_key.as_deref() {
            if let Some(&first) = seen_keys.get(k) {
                duplicate_of.push((i, first));
                continue;
            }
            seen_keys.insert(k, i);
        }
        out[i] = Some(Submitted {
            id: t.id.clone(),
            name: t.name.clone(),
            created: true,
            status: TaskStatus::Queued,
        });
        to_insert.push(t);
    }
    for (i, first) in duplicate_of {
        let mut s = out[first].clone().expect("first occurrence is set");
        s.created = false;
        out[i] = Some(s);
    }
    if !to_insert.is_empty() {
        // One statement, one bound JSON array: the SQL text never changes, so
        // it is prepared once, and no per-value binding happens.
        let rows: Vec<serde_json::Value> = to_insert
            .iter()
            .map(|t| {
                serde_json::json!([
                    t.id,
                    t.name,
                    t.kind.as_str(),
                    t.project,
                    serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
                    t.priority,
                    t.max_attempts,
                    t.now,
                    t.idempotency_key,
                    t.spec_json,
                    t.spec_hash
                ])
            })
            .collect();
        sqlx::query(
            "INSERT INTO tasks (id, name, kind, project, tags, status, priority, attempts, max_attempts, \
             run_at, created_at, updated_at, idempotency_key, spec, spec_hash) \
             SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, 'queued', value ->> 5, 0, \
             value ->> 6, value ->> 7, value ->> 7, value ->> 7, value ->> 8, value ->> 9, value ->> 10 \
             FROM json_each(jsonb(?1)) ORDER BY key",
        )
        .bind(serde_json::Value::Array(rows).to_string())
        .execute(&mut *conn)
        .await?;
        for t in &to_insert {
            batch.transition(
                t.now,
                &t.id,
                &t.name,
                "submitted",
                None,
                TaskStatus::Queued,
                0,
                format!("{{\"spec_hash\":\"{}\"}}", t.spec_hash),
            );
        }
    }
    Ok(out
        .into_iter()
        .map(|s| s.expect("every task answered"))
        .collect())
}

/// The claim query. `?1` = now, `?2` = limit, `?3...` the external names.
/// (sqlx numbers anonymous `?` on its own, so never mix them with `?N`.)
pub(super) fn claim_sql(commands: bool, external_names: usize) -> String {
    let kind_filter = match (commands, external_names) {
        (true, 0) => "AND kind = 'command'".to_string(),
        (true, n) => format!(
            "AND (kind = 'command' OR (kind = 'external' AND name IN ({})))",
            numbered_placeholders(3, n)
        ),
        (false, n) => format!(
            "AND kind = 'external' AND name IN ({})",
            numbered_placeholders(3, n)
        ),
    };
    format!(
        "SELECT seq, id, name, kind, priority, status, attempts, max_attempts, spec, spec_hash \
         FROM tasks INDEXED BY tasks_ready \
         WHERE status IN ('queued', 'retrying') AND run_at <= ?1 {kind_filter} \
         ORDER BY priority DESC, seq LIMIT ?2"
    )
}

async fn claim(
    conn: &mut SqliteConnection,
    req: &ClaimRequest,
    batch: &mut Batch,
) -> Result<Vec<ClaimedTask>> {
    let sql = claim_sql(req.commands, req.external_names.len());
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(req.now)
        .bind(req.limit as i64);
    for n in &req.external_names {
        q = q.bind(n);
    }
    let rows = q.fetch_all(&mut *conn).await?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut claimed = Vec::with_capacity(rows.len());
    let mut from = Vec::with_capacity(rows.len());
    for row in &rows {
        let kind: String = row.get(3);
        let status: String = row.get(5);
        let attempts: i64 = row.get(6);
        claimed.push(ClaimedTask {
            seq: row.get(0),
            id: row.get(1),
            name: row.get(2),
            kind: if kind == "external" {
                TaskKind::External
            } else {
                TaskKind::Command
            },
            priority: row.get(4),
            attempt: attempts as u32 + 1,
            max_attempts: row.get::<i64, _>(7) as u32,
            spec_json: row.get(8),
            spec_hash: row.get(9),
            started_at: req.now,
        });
        from.push(if status == "retrying" {
            TaskStatus::Retrying
        } else {
            TaskStatus::Queued
        });
    }
    let sql = format!(
        "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = ?1, \
         lease_expires_at = ?2, started_at = ?3, updated_at = ?3, run_at = ?3 WHERE seq IN ({})",
        numbered_placeholders(4, claimed.len())
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(&req.worker_id)
        .bind(req.lease_until)
        .bind(req.now);
    for c in &claimed {
        q = q.bind(c.seq);
    }
    q.execute(&mut *conn).await?;
    for (c, f) in claimed.iter().zip(from) {
        batch.transition(
            req.now,
            &c.id,
            &c.name,
            "claimed",
            Some(f),
            TaskStatus::Running,
            c.attempt,
            format!(
                "{{\"attempt\":{},\"worker\":{}}}",
                c.attempt,
                json_str(&req.worker_id)
            ),
        );
    }
    Ok(claimed)
}

/// Applies every finish of the batch with one fenced UPDATE: a finish
/// counts only if the task is still `running` under the same worker and
/// attempt. Every attempt is recorded either way.
async fn finish_all(
    conn: &mut SqliteConnection,
    finishes: &[&FinishAttempt],
    batch: &mut Batch,
) -> Result<Vec<FinishOutcome>> {
    if finishes.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows = Vec::with_capacity(finishes.len());
    let mut planned = Vec::with_capacity(finishes.len());
    for f in finishes {
        let result_json =
            serde_json::to_string(&f.result).map_err(|e| Error::Store(e.to_string()))?;
        let (status, run_at, finished_at) = match f.next {
            Next::Done(s) => (s, None, Some(f.now)),
            Next::Retry { run_at } => (TaskStatus::Retrying, Some(run_at), None),
        };
        rows.push(serde_json::json!([
            f.task_id,
            status.as_str(),
            run_at,
            finished_at,
            f.now,
            result_json,
            f.error,
            f.worker_id,
            f.attempt
        ]));
        planned.push((status, run_at));
        batch.attempts.push(AttemptRow {
            task_id: f.task_id.clone(),
            attempt: f.attempt,
            worker_id: f.worker_id.clone(),
            status: f.status,
            started_at: f.started_at,
            finished_at: f.now,
            exit_code: f.result.exit_code,
            signal: f.result.signal,
            duration_ms: f.result.duration_ms as i64,
            error: f.error.clone(),
            result: result_json,
        });
        for log in &f.logs {
            if log.data.is_empty() && log.dropped_bytes == 0 {
                continue;
            }
            sqlx::query(
                "INSERT OR REPLACE INTO task_logs (task_id, attempt, stream, data, dropped_bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .bind(&f.task_id)
            .bind(f.attempt as i64)
            .bind(log.stream)
            .bind(&log.data)
            .bind(log.dropped_bytes as i64)
            .execute(&mut *conn)
            .await?;
        }
    }
    let applied: Vec<(String, String)> = sqlx::query_as(
        "UPDATE tasks SET status = v.value ->> 1, run_at = COALESCE(v.value ->> 2, tasks.run_at), \
         finished_at = v.value ->> 3, updated_at = v.value ->> 4, lease_owner = NULL, \
         lease_expires_at = NULL, result = v.value ->> 5, error = v.value ->> 6 \
         FROM json_each(jsonb(?1)) AS v \
         WHERE tasks.id = v.value ->> 0 AND +tasks.status = 'running' \
         AND tasks.lease_owner = v.value ->> 7 AND tasks.attempts = v.value ->> 8 \
         RETURNING tasks.id, tasks.name",
    )
    .bind(serde_json::Value::Array(rows).to_string())
    .fetch_all(&mut *conn)
    .await?;
    let applied: std::collections::HashMap<String, String> = applied.into_iter().collect();
    let mut out = Vec::with_capacity(finishes.len());
    for (f, (status, run_at)) in finishes.iter().zip(planned) {
        let Some(name) = applied.get(&f.task_id) else {
            let current: Option<String> =
                sqlx::query_scalar("SELECT status FROM tasks WHERE id = ?1")
                    .bind(&f.task_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let current = current
                .and_then(|s| s.parse().ok())
                .unwrap_or(TaskStatus::Failed);
            out.push(FinishOutcome::Stale(current));
            continue;
        };
        let mut detail = serde_json::json!({"attempt": f.attempt, "outcome": f.status.as_str()});
        if let Some(code) = f.result.exit_code {
            detail["exit_code"] = code.into();
        }
        if let Some(sig) = f.result.signal {
            detail["signal"] = sig.into();
        }
        if let Some(e) = &f.error {
            detail["error"] = e.as_str().into();
        }
        if let Some(r) = run_at {
            detail["retry_at"] = r.into();
        }
        batch.transition(
            f.now,
            &f.task_id,
            name,
            "finished",
            Some(TaskStatus::Running),
            status,
            f.attempt,
            detail.to_string(),
        );
        out.push(FinishOutcome::Applied(status));
    }
    Ok(out)
}

async fn renew(
    conn: &mut SqliteConnection,
    worker_id: &str,
    now: i64,
    lease_until: i64,
) -> Result<Vec<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE tasks SET lease_expires_at = ?1 WHERE lease_owner = ?2 AND status = 'running' RETURNING id",
    )
    .bind(lease_until)
    .bind(worker_id)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("UPDATE workers SET last_seen = ? WHERE id = ?")
        .bind(now)
        .bind(worker_id)
        .execute(&mut *conn)
        .await?;
    Ok(ids)
}

async fn reclaim(
    conn: &mut SqliteConnection,
    scope: &Reclaim,
    now: i64,
    batch: &mut Batch,
) -> Result<Vec<TaskEvent>> {
    let base = "SELECT id, name, attempts, max_attempts, spec, lease_owner, started_at FROM tasks WHERE status = 'running'";
    let rows = match scope {
        Reclaim::Expired => {
            sqlx::query(AssertSqlSafe(format!("{base} AND lease_expires_at < ?1")))
                .bind(now)
                .fetch_all(&mut *conn)
                .await?
        }
        Reclaim::Workers(ids) if ids.is_empty() => Vec::new(),
        Reclaim::Workers(ids) => {
            let mut q = sqlx::query(AssertSqlSafe(format!(
                "{base} AND lease_owner IN ({})",
                placeholders(ids.len())
            )));
            for id in ids {
                q = q.bind(id);
            }
            q.fetch_all(&mut *conn).await?
        }
    };
    let first = batch.events.len();
    for row in rows {
        let id: String = row.get(0);
        let name: String = row.get(1);
        let attempts = row.get::<i64, _>(2) as u32;
        let max_attempts = row.get::<i64, _>(3) as u32;
        let spec: String = row.get(4);
        let owner: Option<String> = row.get(5);
        let started_at: Option<i64> = row.get(6);
        let owner = owner.unwrap_or_default();
        let error = format!(
            "attempt {attempts} was lost: worker {owner} stopped renewing its lease (crashed, killed or cut off from the database)"
        );
        let (status, run_at) = if attempts < max_attempts {
            let policy = serde_json::from_str::<TaskSpec>(&spec)
                .ok()
                .and_then(|s| s.retry)
                .unwrap_or_else(RetryPolicy::standard);
            let delay = policy.delay_after(attempts, &mut rand::rng());
            (TaskStatus::Retrying, Some(now + delay.as_millis() as i64))
        } else {
            (TaskStatus::Failed, None)
        };
        let finished_at = if status.is_terminal() {
            Some(now)
        } else {
            None
        };
        sqlx::query(
            "UPDATE tasks SET status = ?1, run_at = COALESCE(?2, run_at), finished_at = ?3, updated_at = ?4, \
             lease_owner = NULL, lease_expires_at = NULL, error = ?5 WHERE id = ?6",
        )
        .bind(status.as_str())
        .bind(run_at)
        .bind(finished_at)
        .bind(now)
        .bind(&error)
        .bind(&id)
        .execute(&mut *conn)
        .await?;
        let started = started_at.unwrap_or(now);
        batch.attempts.push(AttemptRow {
            task_id: id.clone(),
            attempt: attempts,
            worker_id: owner.clone(),
            status: AttemptStatus::Lost,
            started_at: started,
            finished_at: now,
            exit_code: None,
            signal: None,
            duration_ms: (now - started).max(0),
            error: Some(error.clone()),
            result: format!(
                "{{\"attempt\":{attempts},\"duration_ms\":{}}}",
                (now - started).max(0)
            ),
        });
        batch.transition(
            now,
            &id,
            &name,
            "lease_expired",
            Some(TaskStatus::Running),
            status,
            attempts,
            format!("{{\"attempt\":{attempts},\"worker\":{}}}", json_str(&owner)),
        );
    }
    Ok(batch.events[first..].to_vec())
}

async fn cancel(
    conn: &mut SqliteConnection,
    id: &str,
    now: i64,
    reason: &Option<String>,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row = sqlx::query("SELECT status, name, attempts FROM tasks WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(Err(Error::task_not_found(id)));
    };
    let status: TaskStatus = row
        .get::<String, _>(0)
        .parse()
        .unwrap_or(TaskStatus::Failed);
    let name: String = row.get(1);
    let attempts = row.get::<i64, _>(2) as u32;
    if status == TaskStatus::Cancelled {
        return Ok(Ok(()));
    }
    if status.is_terminal() {
        return Ok(Err(Error::Conflict(format!(
            "task {id} already {status}; only tasks that have not finished can be cancelled"
        ))));
    }
    let error = reason
        .clone()
        .unwrap_or_else(|| "cancelled by request".to_string());
    sqlx::query(
        "UPDATE tasks SET status = 'cancelled', finished_at = ?1, updated_at = ?1, lease_owner = NULL, \
         lease_expires_at = NULL, error = ?2 WHERE id = ?3",
    )
    .bind(now)
    .bind(&error)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    batch.transition(
        now,
        id,
        &name,
        "cancelled",
        Some(status),
        TaskStatus::Cancelled,
        attempts,
        format!("{{\"reason\":{}}}", json_str(&error)),
    );
    Ok(Ok(()))
}

async fn register_worker(conn: &mut SqliteConnection, w: &WorkerInfo) -> Result<()> {
    sqlx::query(
        "INSERT OR REPLACE INTO workers (id, host, pid, pid_start, started_at, last_seen) VALUES (?,?,?,?,?,?)",
    )
    .bind(&w.id)
    .bind(&w.host)
    .bind(w.pid)
    .bind(w.pid_start)
    .bind(w.started_at)
    .bind(w.started_at)
    .execute(&mut *conn)
    .await?;
    // Forget workers that hold nothing and have not been seen for a day.
    sqlx::query(
        "DELETE FROM workers WHERE last_seen < ?1 AND id NOT IN \
         (SELECT lease_owner FROM tasks WHERE status = 'running' AND lease_owner IS NOT NULL)",
    )
    .bind(w.started_at - 86_400_000)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn flush_attempts(conn: &mut SqliteConnection, rows: &[AttemptRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!([
                r.task_id,
                r.attempt,
                r.worker_id,
                r.status.as_str(),
                r.started_at,
                r.finished_at,
                r.exit_code,
                r.signal,
                r.duration_ms,
                r.error,
                r.result
            ])
        })
        .collect();
    sqlx::query(
        "INSERT OR IGNORE INTO attempts (task_id, attempt, worker_id, status, started_at, finished_at, \
         exit_code, signal, duration_ms, error, result) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, \
         value ->> 6, value ->> 7, value ->> 8, value ->> 9, value ->> 10 FROM json_each(jsonb(?1)) ORDER BY key",
    )
    .bind(serde_json::Value::Array(json).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn flush_audit(conn: &mut SqliteConnection, drafts: &[AuditDraft]) -> Result<()> {
    if drafts.is_empty() {
        return Ok(());
    }
    // Inside BEGIN IMMEDIATE no other process can append, so the head read
    // here is the head the new events chain onto.
    let head: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut *conn)
            .await?;
    let (mut seq, mut prev) = head.unwrap_or((0, GENESIS_HASH.to_string()));
    let mut json = Vec::with_capacity(drafts.len());
    for d in drafts {
        seq += 1;
        let hash = event_hash(
            &prev,
            &EventContent {
                seq,
                at: d.at,
                task_id: &d.task_id,
                kind: d.kind,
                from_status: d.from,
                to_status: d.to,
                detail: &d.detail,
            },
        );
        let prev_hash = std::mem::replace(&mut prev, hash);
        json.push(serde_json::json!([
            seq, d.at, d.task_id, d.kind, d.from, d.to, d.detail, prev_hash, prev
        ]));
    }
    sqlx::query(
        "INSERT INTO audit_events (seq, at, task_id, kind, from_status, to_status, detail, prev_hash, hash) \
         SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5, value ->> 6, \
         value ->> 7, value ->> 8 FROM json_each(jsonb(?1)) ORDER BY key",
    )
    .bind(serde_json::Value::Array(json).to_string())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

fn placeholders(n: usize) -> String {
    let mut s = String::with_capacity(n * 2);
    for i in 0..n {
        if i > 0 {
            s.push(',');
        }
        s.push('?');
    }
    s
}

/// `?3,?4,...`: numbered so they follow numbered parameters.
fn numbered_placeholders(start: usize, n: usize) -> String {
    (start..start + n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}
