//! This node's writer: receives operations, applies everything pending in
//! one transaction, commits once, then answers. The same operations as the
//! SQLite writer, made safe for other nodes writing at the same time:
//! claims take rows `FOR UPDATE SKIP LOCKED`, read-then-write steps lock
//! the rows they read (`FOR UPDATE`), and the audit chain is appended under
//! an advisory lock. A batch that loses a deadlock or a race on an
//! idempotency key is rolled back and applied again from the start.
//!
//! An operation's own failure (unknown id, bad state) is part of its answer
//! and does not disturb the batch; a database failure fails the whole batch
//! and every caller hears about it.

use sqlx::{AssertSqlSafe, PgConnection, PgPool, Row};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::integrity::{EventContent, GENESIS_HASH, event_hash};
use std::collections::{HashMap, HashSet};

use crate::model::{
    Approval, AttemptStatus, Condition, RetryPolicy, TaskEvent, TaskKind, TaskResult, TaskSpec,
    TaskStatus, Timestamp, WorkflowEvent, WorkflowStatus,
};
use crate::store::{
    ApprovalDecision, AttemptRow, ClaimRequest, ClaimedTask, FinishAttempt, FinishOutcome,
    FireSchedule, NewSchedule, NewSubmission, NewTask, Next, Reclaim, ScheduleChange, StreamLog,
    Submitted, TokenRecord, WorkerInfo,
};

type Reply<T> = oneshot::Sender<Result<T>>;

/// The advisory lock key that serialises audit-chain appends ("tq-audit").
const AUDIT_CHAIN_LOCK: i64 = 0x7471_2d61_7564_6974;

/// Most operations committed together.
const MAX_BATCH: usize = 2048;
/// Rows per multi-row INSERT (SQLite allows 32766 bound parameters).
const ROWS_PER_INSERT: usize = 500;

pub(super) enum Op {
    Submit {
        sub: Box<NewSubmission>,
        reply: Reply<Vec<Submitted>>,
    },
    CancelWorkflow {
        id: String,
        now: i64,
        reason: Option<String>,
        reply: Reply<Vec<String>>,
    },
    Approve {
        id: String,
        decision: ApprovalDecision,
        now: i64,
        reply: Reply<()>,
    },
    Retry {
        id: String,
        now: i64,
        reply: Reply<()>,
    },
    Heartbeat {
        task_id: String,
        worker_id: String,
        lease_until: i64,
        reply: Reply<()>,
    },
    PutLogs {
        task_id: String,
        attempt: u32,
        logs: Vec<StreamLog>,
        reply: Reply<()>,
    },
    FireSchedule {
        f: Box<FireSchedule>,
        reply: Reply<bool>,
    },
    ChangeSchedule {
        id: String,
        change: Box<ScheduleChange>,
        now: i64,
        reply: Reply<bool>,
    },
    Claim {
        req: ClaimRequest,
        reply: Reply<Vec<ClaimedTask>>,
    },
    /// A finish, with the claim that takes its slot (`next`), if any.
    Finish {
        f: Box<FinishAttempt>,
        next: Option<Box<ClaimRequest>>,
        reply: Reply<(FinishOutcome, Vec<ClaimedTask>)>,
    },
    Renew {
        worker_id: String,
        task_ids: Vec<String>,
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
    /// Inserts a token, or revokes one (`revoke: Some(now)`).
    Token {
        token: Box<TokenRecord>,
        hash: String,
        revoke: Option<i64>,
        reply: Reply<bool>,
    },
    Close {
        reply: Reply<()>,
    },
}

/// The answer computed for an op inside the transaction, sent after commit.
enum Answer {
    Submit(Result<Vec<Submitted>>),
    Ids(Result<Vec<String>>),
    Bool(Result<bool>),
    Claim(Vec<ClaimedTask>),
    Finish(FinishOutcome, Vec<ClaimedTask>),
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

/// A task that reached a terminal state in this transaction.
struct Terminal {
    id: String,
    status: TaskStatus,
    workflow_id: Option<String>,
}

/// What one transaction accumulates besides its answers.
#[derive(Default)]
struct Batch {
    audit: Vec<AuditDraft>,
    attempts: Vec<AttemptRow>,
    events: Vec<TaskEvent>,
    workflow_events: Vec<WorkflowEvent>,
    /// Terminal transitions: their dependents are resolved and their
    /// workflows' counters moved before commit.
    terminal: Vec<Terminal>,
    /// Finished tasks whose waiting dependents need resolving (terminal
    /// transitions, and already-finished dependencies of new tasks).
    resolve: Vec<(String, TaskStatus, Option<serde_json::Value>)>,
    /// The latest status of tasks moved after their op answered (submit).
    latest: HashMap<String, TaskStatus>,
}

impl Batch {
    /// Records a task's move into a terminal state.
    fn terminal(
        &mut self,
        id: &str,
        status: TaskStatus,
        output: Option<serde_json::Value>,
        workflow_id: Option<String>,
    ) {
        self.resolve.push((id.to_string(), status, output));
        self.terminal.push(Terminal {
            id: id.to_string(),
            status,
            workflow_id,
        });
    }

    /// An audit event for something that is not a task (workflow, schedule).
    fn audit_other(
        &mut self,
        at: i64,
        subject: &str,
        kind: &'static str,
        from: Option<&'static str>,
        to: &'static str,
        detail: String,
    ) {
        self.audit.push(AuditDraft {
            at,
            task_id: subject.to_string(),
            kind,
            from,
            to,
            detail,
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn transition(
        &mut self,
        at: i64,
        task_id: &str,
        name: &str,
        workflow_id: Option<&str>,
        kind: &'static str,
        from: Option<TaskStatus>,
        to: TaskStatus,
        attempt: u32,
        detail: String,
    ) {
        self.latest.insert(task_id.to_string(), to);
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
            workflow_id: workflow_id.map(str::to_string),
            name: name.to_string(),
            status: to,
            attempt,
            at: Timestamp(at),
        });
    }
}

/// This node's name in notifications, and its queue's channel.
pub(super) struct Node {
    pub id: String,
    pub channel: String,
    /// Attempts this node's writers marked for records since it last
    /// started writing them.
    pub pending_records: std::sync::atomic::AtomicUsize,
    /// Whether this node is writing pending records now.
    pub writing_records: std::sync::atomic::AtomicBool,
}

/// Where committed changes are announced.
pub(super) struct Announce {
    pub tasks: broadcast::Sender<TaskEvent>,
    pub workflows: broadcast::Sender<WorkflowEvent>,
}

/// One of a node's writers. Several share the queue of operations: while
/// one waits for its commit, the next takes what arrived meanwhile. They
/// stay out of each other's way (and other nodes') through the same row
/// locks as writers of different nodes.
pub(super) async fn run(
    pool: PgPool,
    rx: std::sync::Arc<tokio::sync::Mutex<mpsc::Receiver<Op>>>,
    announce: std::sync::Arc<Announce>,
    node: std::sync::Arc<Node>,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    loop {
        {
            let mut rx = rx.lock().await;
            let Some(op) = rx.recv().await else {
                return;
            };
            ops.push(op);
            while ops.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
        }
        let closing = ops.iter().any(|o| matches!(o, Op::Close { .. }));
        let started = std::time::Instant::now();
        let result = apply_retrying(&pool, &ops, &node).await;
        tracing::trace!(
            ops = ops.len(),
            micros = started.elapsed().as_micros() as u64,
            "write batch"
        );
        match result {
            Ok((answers, batch)) => {
                records_added(&pool, &node, batch.attempts.len());
                for (op, answer) in ops.drain(..).zip(answers) {
                    deliver(op, Ok(answer));
                }
                for e in batch.events {
                    let _ = announce.tasks.send(e);
                }
                for e in batch.workflow_events {
                    let _ = announce.workflows.send(e);
                }
            }
            // One op's failure must not fail the others it was batched
            // with: the batch was rolled back, so apply them again one by
            // one, each in its own transaction.
            Err(e) if ops.len() > 1 && !closing && fails_alone(&e) => {
                tracing::warn!(error = %e, ops = ops.len(), "a write batch failed; applying its operations one at a time");
                for op in ops.drain(..) {
                    let one = std::slice::from_ref(&op);
                    match apply_retrying(&pool, one, &node).await {
                        Ok((mut answers, batch)) => {
                            records_added(&pool, &node, batch.attempts.len());
                            deliver(op, Ok(answers.pop().expect("one answer per op")));
                            for e in batch.events {
                                let _ = announce.tasks.send(e);
                            }
                            for e in batch.workflow_events {
                                let _ = announce.workflows.send(e);
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "store write failed; the operation was rolled back");
                            deliver(op, Err(Error::Store(e.to_string())));
                        }
                    }
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
            return;
        }
    }
}

/// Whether a batch's error can be one operation's fault, so that applying
/// the operations one by one isolates it: the server refused a statement
/// for its data (SQLSTATE class 22), a constraint (23), the statement
/// itself (42) or a limit (54), or a later statement found the
/// transaction aborted by such a refusal (25P02). Not for a lost connection or a pool
/// timeout: each operation would wait out the same failure in turn, and a
/// connection lost during COMMIT may have committed the batch already.
fn fails_alone(e: &Error) -> bool {
    let msg = e.to_string();
    [
        "(SQLSTATE 22",
        "(SQLSTATE 23",
        "(SQLSTATE 42",
        "(SQLSTATE 54",
        "(SQLSTATE 25P02",
    ]
    .iter()
    .any(|class| msg.contains(class))
}

/// Counts attempts marked for records; once enough are pending, writes
/// them in a transaction of its own beside the writers (one at a time per
/// node; marks another node is writing are left to it).
fn records_added(pool: &PgPool, node: &std::sync::Arc<Node>, added: usize) {
    use std::sync::atomic::Ordering;
    if added == 0
        || node.pending_records.fetch_add(added, Ordering::Relaxed) + added
            < super::history::RECORDS_PER_WRITE
        || node.writing_records.swap(true, Ordering::AcqRel)
    {
        return;
    }
    node.pending_records.store(0, Ordering::Relaxed);
    let pool = pool.clone();
    let node = node.clone();
    tokio::spawn(async move {
        if let Err(e) = super::history::write_pending_records_now(&pool, true).await {
            tracing::warn!(error = %e, "writing interaction records failed; a later write or read retries");
        }
        node.writing_records.store(false, Ordering::Release);
    });
}

/// Most times a batch is applied again after losing a race with another node.
const MAX_TRIES: u32 = 20;

/// Applies a batch, again from the start (with a fresh connection from the
/// pool, so a lost connection is replaced) when another node got in the way.
async fn apply_retrying(pool: &PgPool, ops: &[Op], node: &Node) -> Result<(Vec<Answer>, Batch)> {
    let mut tries = 0;
    loop {
        tries += 1;
        let mut batch = Batch::default();
        let result = match pool.acquire().await {
            Ok(mut conn) => apply_all(&mut conn, ops, &mut batch, node).await,
            Err(e) => Err(Error::from(e)),
        };
        match result {
            Ok(answers) => return Ok((answers, batch)),
            Err(e) if tries < MAX_TRIES && super::retryable(&e) => {
                tracing::debug!(error = %e, tries, "write batch lost a race with another node; applying it again");
                let jitter = rand::random_range(0..(5 * u64::from(tries)));
                tokio::time::sleep(std::time::Duration::from_millis(jitter)).await;
            }
            Err(e) => return Err(e),
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
        (Op::Finish { reply, .. }, Ok(Answer::Finish(v, c))) => send(reply, Ok((v, c))),
        (Op::Renew { reply, .. }, Ok(Answer::Renew(v))) => send(reply, Ok(v)),
        (Op::Reclaim { reply, .. }, Ok(Answer::Reclaim(v))) => send(reply, Ok(v)),
        (Op::CancelWorkflow { reply, .. }, Ok(Answer::Ids(r))) => send(reply, r),
        (Op::Token { reply, .. }, Ok(Answer::Bool(r)))
        | (Op::FireSchedule { reply, .. }, Ok(Answer::Bool(r)))
        | (Op::ChangeSchedule { reply, .. }, Ok(Answer::Bool(r))) => send(reply, r),
        (Op::Cancel { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::Approve { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::Retry { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::Heartbeat { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::PutLogs { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::RegisterWorker { reply, .. }, Ok(Answer::Unit(r)))
        | (Op::Close { reply }, Ok(Answer::Unit(r))) => send(reply, r),
        (op, Err(e)) => match op {
            Op::Submit { reply, .. } => send(reply, Err(e)),
            Op::Claim { reply, .. } => send(reply, Err(e)),
            Op::Finish { reply, .. } => send(reply, Err(e)),
            Op::Renew { reply, .. } => send(reply, Err(e)),
            Op::Reclaim { reply, .. } => send(reply, Err(e)),
            Op::CancelWorkflow { reply, .. } => send(reply, Err(e)),
            Op::FireSchedule { reply, .. }
            | Op::ChangeSchedule { reply, .. }
            | Op::Token { reply, .. } => send(reply, Err(e)),
            Op::Cancel { reply, .. }
            | Op::Approve { reply, .. }
            | Op::Retry { reply, .. }
            | Op::Heartbeat { reply, .. }
            | Op::PutLogs { reply, .. }
            | Op::RegisterWorker { reply, .. }
            | Op::Close { reply } => send(reply, Err(e)),
        },
        (_, Ok(_)) => unreachable!("answer kind always matches its op"),
    }
}

async fn apply_all(
    conn: &mut PgConnection,
    ops: &[Op],
    batch: &mut Batch,
    node: &Node,
) -> Result<Vec<Answer>> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // All submits of the batch go in together: one multi-row INSERT for
    // many concurrent submitters.
    let subs: Vec<&NewSubmission> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Submit { sub, .. } => Some(sub.as_ref()),
            _ => None,
        })
        .collect();
    let mut submitted = submit_all(&mut tx, &subs, batch).await?.into_iter();
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
            Op::Submit { .. } => Answer::Submit(submitted.next().expect("one answer per submit")),
            Op::Claim { req, .. } => Answer::Claim(claim(&mut tx, req, batch).await?),
            Op::Finish { .. } => {
                Answer::Finish(finished.next().expect("one outcome per finish"), Vec::new())
            }
            Op::Renew {
                worker_id,
                task_ids,
                now,
                lease_until,
                ..
            } => Answer::Renew(renew(&mut tx, worker_id, task_ids, *now, *lease_until).await?),
            Op::Reclaim { scope, now, .. } => {
                Answer::Reclaim(reclaim(&mut tx, scope, *now, batch).await?)
            }
            Op::Cancel {
                id, now, reason, ..
            } => Answer::Unit(cancel(&mut tx, id, *now, reason, batch).await?),
            Op::CancelWorkflow {
                id, now, reason, ..
            } => Answer::Ids(cancel_workflow(&mut tx, id, *now, reason, batch).await?),
            Op::Approve {
                id, decision, now, ..
            } => Answer::Unit(approve(&mut tx, id, decision, *now, batch).await?),
            Op::Retry { id, now, .. } => Answer::Unit(retry(&mut tx, id, *now, batch).await?),
            Op::Heartbeat {
                task_id,
                worker_id,
                lease_until,
                ..
            } => Answer::Unit(heartbeat(&mut tx, task_id, worker_id, *lease_until).await?),
            Op::PutLogs {
                task_id,
                attempt,
                logs,
                ..
            } => {
                put_logs(&mut tx, task_id, *attempt, logs).await?;
                Answer::Unit(Ok(()))
            }
            Op::FireSchedule { f, .. } => Answer::Bool(fire_schedule(&mut tx, f, batch).await?),
            Op::ChangeSchedule {
                id, change, now, ..
            } => Answer::Bool(change_schedule(&mut tx, id, change, *now, batch).await?),
            Op::Token {
                token,
                hash,
                revoke,
                ..
            } => Answer::Bool(Ok(write_token(&mut tx, token, hash, *revoke).await?)),
            Op::RegisterWorker { w, .. } => {
                Answer::Unit(register_worker(&mut tx, w).await.map(|_| Ok(()))?)
            }
            Op::Close { .. } => Answer::Unit(Ok(())),
        };
        answers.push(answer);
    }
    resolve_dependents(&mut tx, batch).await?;
    update_workflows(&mut tx, batch).await?;
    // The claims that come with finishes, merged into one claim for the
    // slots the batch's finished attempts free; after the dependents are
    // resolved, so a slot can take a task its own finish made ready.
    let mut replacements = claim_for_finishes(&mut tx, ops, batch).await?.into_iter();
    for a in &mut answers {
        if let Answer::Finish(_, next) = a {
            *next = replacements.next().expect("one claim answer per finish");
        }
    }
    // A new task may have been resolved within this transaction.
    for a in &mut answers {
        if let Answer::Submit(Ok(list)) = a {
            for s in list.iter_mut() {
                if let Some(st) = batch.latest.get(&s.id) {
                    s.status = *st;
                }
            }
        }
    }
    // Every finished attempt becomes an interaction record in the same
    // transaction (and statement), so history never misses or
    // half-records one.
    flush_attempts(&mut tx, &batch.attempts).await?;
    // Delivered to the other nodes on commit, never for a rolled-back batch.
    let payloads = super::notify::payloads(&node.id, &batch.events, &batch.workflow_events);
    flush_audit(&mut tx, &batch.audit, &node.channel, payloads).await?;
    tx.commit().await?;
    Ok(answers)
}

/// The status a task takes once its dependencies are met.
fn ready_status(needs_approval: bool, run_at: i64, now: i64) -> TaskStatus {
    if run_at > now {
        TaskStatus::Pending
    } else if needs_approval {
        TaskStatus::AwaitingApproval
    } else {
        TaskStatus::Queued
    }
}

/// Inserts the submissions of a batch. A submission whose dependency on an
/// existing task cannot be satisfied is answered with an error and stores nothing.
/// Stores a batch's submissions and answers each: a workflow whose
/// idempotency key is taken is answered by the workflow that has it (or by
/// the earlier submission of this batch with the same key) and stores
/// nothing. Two nodes storing the same new key at once: the unique index
/// fails the later batch, which is applied again and then finds the first.
async fn submit_all(
    conn: &mut PgConnection,
    subs: &[&NewSubmission],
    batch: &mut Batch,
) -> Result<Vec<Result<Vec<Submitted>>>> {
    let keys: Vec<&str> = subs
        .iter()
        .filter_map(|s| crate::store::workflow_key(s))
        .collect();
    if keys.is_empty() {
        return submit_fresh(conn, subs, batch).await;
    }
    let mut existing: HashMap<String, String> = HashMap::new();
    for row in sqlx::query(
        "SELECT idempotency_key, id FROM workflows WHERE idempotency_key = ANY($1::text[])",
    )
    .bind(&keys)
    .fetch_all(&mut *conn)
    .await?
    {
        existing.insert(row.try_get(0)?, row.try_get(1)?);
    }
    let mut tasks: HashMap<String, Vec<Submitted>> = HashMap::new();
    for id in existing.values() {
        let rows = sqlx::query(
            "SELECT id, name, status, schedule_id FROM tasks WHERE workflow_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch_all(&mut *conn)
        .await?;
        let mut list = Vec::with_capacity(rows.len());
        for row in rows {
            let status: String = row.try_get(2)?;
            list.push(Submitted {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                created: false,
                status: status.parse().unwrap_or(TaskStatus::Queued),
                schedule_id: row.try_get(3)?,
                workflow_id: Some(id.clone()),
            });
        }
        tasks.insert(id.clone(), list);
    }
    let mut rounds = crate::store::KeyedRounds::new(subs, &existing);
    while let Some(fresh) = rounds.fresh() {
        let answers = submit_fresh(conn, &fresh, batch).await?;
        rounds.answer(answers, &tasks);
    }
    Ok(rounds.finish())
}

async fn submit_fresh(
    conn: &mut PgConnection,
    subs: &[&NewSubmission],
    batch: &mut Batch,
) -> Result<Vec<Result<Vec<Submitted>>>> {
    let tasks: Vec<&NewTask> = subs.iter().flat_map(|s| s.tasks.iter()).collect();
    if tasks.is_empty()
        && subs
            .iter()
            .all(|s| s.workflow.is_none() && s.schedules.is_empty())
    {
        return Ok(subs.iter().map(|_| Ok(Vec::new())).collect());
    }
    let mut out: Vec<Option<Submitted>> = vec![None; tasks.len()];
    // Idempotency: existing keys return the earlier task; repeated keys in
    // this batch return the first of them.
    let keyed: Vec<(usize, &str)> = tasks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.idempotency_key.as_deref().map(|k| (i, k)))
        .collect();
    let mut seen_keys: HashMap<&str, usize> = HashMap::new();
    if !keyed.is_empty() {
        for chunk in keyed.chunks(ROWS_PER_INSERT) {
            let sql = format!(
                "SELECT idempotency_key, id, name, status, schedule_id, workflow_id FROM tasks WHERE idempotency_key IN ({})",
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
                            schedule_id: row.get(4),
                            workflow_id: row.get(5),
                        });
                    }
                }
            }
        }
    }
    let outside_ids: Vec<String> = crate::store::outside_deps(subs)
        .into_iter()
        .map(str::to_string)
        .collect();
    let stored: HashSet<String> = if outside_ids.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar::<_, String>("SELECT id FROM tasks WHERE id = ANY($1)")
            .bind(&outside_ids)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    };
    let refused_early = crate::store::refused_for_deps(subs, &stored);
    let sub_of = crate::store::submission_of_each_task(subs);
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
            // A task of a submission that will be refused answers no other.
            if !refused_early[sub_of[i]] {
                seen_keys.insert(k, i);
            }
        }
        let status = if t.deps.is_empty() {
            ready_status(t.needs_approval, t.run_at, t.now)
        } else {
            TaskStatus::Pending
        };
        out[i] = Some(Submitted {
            id: t.id.clone(),
            name: t.name.clone(),
            created: true,
            status,
            schedule_id: t.schedule_id.clone(),
            workflow_id: t.workflow_id.clone(),
        });
    }
    for (i, first) in duplicate_of {
        let mut s = out[first].clone().expect("first occurrence is set");
        s.created = false;
        out[i] = Some(s);
    }
    let out: Vec<Submitted> = out
        .into_iter()
        .map(|s| s.expect("every task answered"))
        .collect();
    // A task answered by an earlier one stands in for it as a dependency.
    let remap: HashMap<&str, &str> = tasks
        .iter()
        .zip(&out)
        .filter(|(t, s)| !s.created && t.id != s.id)
        .map(|(t, s)| (t.id.as_str(), s.id.as_str()))
        .collect();
    let inserted: HashSet<&str> = tasks
        .iter()
        .zip(&out)
        .filter(|(_, s)| s.created)
        .map(|(t, _)| t.id.as_str())
        .collect();
    // Dependencies on tasks outside the inserted set must exist; their
    // state decides at once if they already finished.
    let mut outside: Vec<&str> = Vec::new();
    for (t, s) in tasks.iter().zip(&out) {
        if !s.created {
            continue;
        }
        for d in &t.deps {
            let id = remap.get(d.dep_id.as_str()).copied().unwrap_or(&d.dep_id);
            if !inserted.contains(id) {
                outside.push(id);
            }
        }
    }
    outside.sort_unstable();
    outside.dedup();
    // FOR SHARE: a node finishing one of them now either commits first (its
    // row is read after that commit, terminal, and resolved below) or waits
    // for this transaction, and its look-up of waiting dependents then sees
    // the dependency rows written here. Unlocked, both could miss each
    // other and leave the dependent waiting forever. Sorted ids keep the
    // lock order the same for every submitter.
    let mut known: HashMap<String, (TaskStatus, Option<String>)> = HashMap::new();
    for chunk in outside.chunks(ROWS_PER_INSERT) {
        let sql = format!(
            "SELECT id, status, result FROM tasks WHERE id IN ({}) ORDER BY id FOR SHARE",
            placeholders(chunk.len())
        );
        let mut q = sqlx::query(AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(*id);
        }
        for row in q.fetch_all(&mut *conn).await? {
            let status: String = row.get(1);
            known.insert(
                row.get(0),
                (status.parse().unwrap_or(TaskStatus::Failed), row.get(2)),
            );
        }
    }
    // Answer each submission; one with a missing dependency is refused whole.
    let mut answers = Vec::with_capacity(subs.len());
    let mut refused: HashSet<usize> = HashSet::new();
    let mut offset = 0;
    for (si, sub) in subs.iter().enumerate() {
        let range = offset..offset + sub.tasks.len();
        offset += sub.tasks.len();
        let mut missing = None;
        'find: for (ti, (t, s)) in sub.tasks.iter().zip(&out[range.clone()]).enumerate() {
            // A task answered by an existing one is not stored: its
            // dependencies are that task's, already in place.
            if !s.created {
                continue;
            }
            for (di, d) in t.deps.iter().enumerate() {
                let id = remap.get(d.dep_id.as_str()).copied().unwrap_or(&d.dep_id);
                if !inserted.contains(id) && !known.contains_key(id) {
                    missing = Some(Error::invalid(
                        format!("tasks[{ti}].depends_on[{di}]"),
                        format!("no task has id {id}"),
                    ));
                    break 'find;
                }
            }
        }
        match missing {
            Some(e) => {
                refused.insert(si);
                answers.push(Err(e));
            }
            None => answers.push(Ok(out[range].to_vec())),
        }
    }
    let mut task_rows = Vec::new();
    let mut dep_rows = Vec::new();
    let mut offset = 0;
    let mut workflow_totals: HashMap<&str, i64> = HashMap::new();
    for (si, sub) in subs.iter().enumerate() {
        let range = offset..offset + sub.tasks.len();
        offset += sub.tasks.len();
        if refused.contains(&si) {
            continue;
        }
        for (t, s) in sub.tasks.iter().zip(&out[range]) {
            if !s.created {
                continue;
            }
            if let Some(w) = &t.workflow_id {
                *workflow_totals.entry(w.as_str()).or_default() += 1;
            }
            let deps = crate::store::distinct_deps(t, &remap);
            task_rows.push(serde_json::json!([
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
                t.spec_hash,
                s.status.as_str(),
                t.run_at,
                t.workflow_id,
                t.schedule_id,
                deps.len(),
                t.needs_approval
            ]));
            for (dep_id, condition) in deps {
                dep_rows.push(serde_json::json!([
                    dep_id,
                    t.id,
                    serde_json::to_string(condition).unwrap_or_else(|_| "\"success\"".into())
                ]));
                if let Some((st, result)) = known.get(dep_id)
                    && st.is_terminal()
                {
                    let output = result
                        .as_deref()
                        .and_then(|r| serde_json::from_str::<TaskResult>(r).ok())
                        .and_then(|r| r.output);
                    batch.resolve.push((dep_id.to_string(), *st, output));
                }
            }
            batch.transition(
                t.now,
                &t.id,
                &t.name,
                t.workflow_id.as_deref(),
                "submitted",
                None,
                s.status,
                0,
                format!("{{\"spec_hash\":\"{}\"}}", t.spec_hash),
            );
        }
    }
    // Workflows and schedules first, so the audit chain reads in order.
    for (si, sub) in subs.iter().enumerate() {
        if refused.contains(&si) {
            continue;
        }
        if crate::store::stores_nothing_new(sub, &answers[si]) {
            continue;
        }
        for sc in &sub.schedules {
            insert_schedule(conn, sc, batch).await?;
        }
        if let Some(w) = &sub.workflow {
            // Every task may have been answered by an earlier one (idempotency
            // keys): then the workflow has nothing of its own to run.
            let total = workflow_totals.get(w.id.as_str()).copied().unwrap_or(0);
            let status = if total == 0 {
                WorkflowStatus::Succeeded
            } else {
                WorkflowStatus::Running
            };
            sqlx::query(
                "INSERT INTO workflows (id, name, project, tags, description, status, schedule_id, \
                 tasks_total, created_at, updated_at, finished_at, idempotency_key) \
                 VALUES ($1, $2, $3, $4, $5, $9, $6, $7, $8, $8, CASE WHEN $7 = 0 THEN $8 END, $10)",
            )
            .bind(&w.id)
            .bind(&w.name)
            .bind(&w.project)
            .bind(serde_json::to_string(&w.tags).unwrap_or_else(|_| "[]".into()))
            .bind(&w.description)
            .bind(&w.schedule_id)
            .bind(total)
            .bind(w.now)
            .bind(status.as_str())
            .bind(&w.idempotency_key)
            .execute(&mut *conn)
            .await?;
            batch.audit_other(
                w.now,
                &w.id,
                "workflow_submitted",
                None,
                status.as_str(),
                serde_json::json!({"name": w.name, "tasks": total}).to_string(),
            );
            batch.workflow_events.push(WorkflowEvent {
                workflow_id: w.id.clone(),
                name: w.name.clone(),
                status,
                at: Timestamp(w.now),
            });
        }
    }
    if !task_rows.is_empty() {
        // One statement, one bound JSON array: the SQL text never changes, so
        // it is prepared once, and no per-value binding happens.
        sqlx::query(
            "INSERT INTO tasks (id, name, kind, project, tags, status, priority, attempts, max_attempts, \
             run_at, created_at, updated_at, idempotency_key, spec, spec_hash, workflow_id, schedule_id, \
             deps_pending, needs_approval) \
             SELECT v ->> 0, v ->> 1, v ->> 2, v ->> 3, v ->> 4, v ->> 11, (v ->> 5)::bigint, 0, \
             (v ->> 6)::bigint, (v ->> 12)::bigint, (v ->> 7)::bigint, (v ->> 7)::bigint, v ->> 8, v ->> 9, \
             v ->> 10, v ->> 13, v ->> 14, (v ->> 15)::bigint, CASE WHEN (v ->> 16)::boolean THEN 1 ELSE 0 END \
             FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, ord) ORDER BY ord",
        )
        .bind(serde_json::Value::Array(task_rows).to_string())
        .execute(&mut *conn)
        .await?;
    }
    if !dep_rows.is_empty() {
        sqlx::query(
            "INSERT INTO task_deps (dep_id, task_id, condition) \
             SELECT v ->> 0, v ->> 1, v ->> 2 FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, ord) ORDER BY ord \
             ON CONFLICT DO NOTHING",
        )
        .bind(serde_json::Value::Array(dep_rows).to_string())
        .execute(&mut *conn)
        .await?;
    }
    Ok(answers)
}

async fn insert_schedule(
    conn: &mut PgConnection,
    sc: &NewSchedule,
    batch: &mut Batch,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO schedules (id, name, project, cron, timezone, template, next_fire_at, upcoming_run, \
         created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
    )
    .bind(&sc.id)
    .bind(&sc.name)
    .bind(&sc.project)
    .bind(&sc.cron)
    .bind(&sc.timezone)
    .bind(&sc.template)
    .bind(sc.next_fire_at)
    .bind(&sc.upcoming_run)
    .bind(sc.now)
    .execute(&mut *conn)
    .await?;
    batch.audit_other(
        sc.now,
        &sc.id,
        "schedule_created",
        None,
        "active",
        serde_json::json!({"name": sc.name, "cron": sc.cron, "timezone": sc.timezone, "next_fire_at": sc.next_fire_at})
            .to_string(),
    );
    Ok(())
}

/// Whether a finished dependency meets a condition: `Ok` if it does, else why not.
fn condition_holds(
    c: &Condition,
    status: TaskStatus,
    output: Option<&serde_json::Value>,
) -> std::result::Result<(), String> {
    let ok = match c {
        Condition::Success => status == TaskStatus::Succeeded,
        Condition::Failure => matches!(status, TaskStatus::Failed | TaskStatus::TimedOut),
        Condition::Completion => true,
        Condition::Schema(schema) => {
            if status != TaskStatus::Succeeded {
                false
            } else {
                let null = serde_json::Value::Null;
                let out = output.unwrap_or(&null);
                match jsonschema::validator_for(schema) {
                    Ok(v) => {
                        if let Some(e) = v.iter_errors(out).next() {
                            return Err(format!(
                                "its result output does not match the schema condition: {e}"
                            ));
                        }
                        true
                    }
                    Err(e) => return Err(format!("the schema condition is invalid: {e}")),
                }
            }
        }
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "it ended {status}, and the condition is {}",
            c.label()
        ))
    }
}

/// Resolves the dependents of every task that finished in this
/// transaction: met edges count down, an unmet one skips the dependent,
/// and skips cascade. A dependent whose count reaches zero becomes ready.
async fn resolve_dependents(conn: &mut PgConnection, batch: &mut Batch) -> Result<()> {
    while !batch.resolve.is_empty() {
        let round = std::mem::take(&mut batch.resolve);
        let mut finished: HashMap<String, (TaskStatus, Option<serde_json::Value>)> =
            HashMap::with_capacity(round.len());
        for (id, st, out) in round {
            finished.insert(id, (st, out));
        }
        // Locking the dependents serialises nodes that finish dependencies of
        // the same task: the second reads the count the first left.
        let ids: Vec<String> = finished.keys().cloned().collect();
        let rows = sqlx::query(
            "SELECT d.dep_id, d.task_id, d.condition, t.status, t.deps_pending, t.needs_approval, \
             t.run_at, t.name, t.workflow_id, t.attempts \
             FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.dep_id = ANY($1) AND d.state = 'waiting' \
             ORDER BY t.id FOR UPDATE OF t",
        )
        .bind(ids)
        .fetch_all(&mut *conn)
        .await?;
        if rows.is_empty() {
            continue;
        }
        struct Dependent {
            status: TaskStatus,
            pending: i64,
            needs_approval: bool,
            run_at: i64,
            name: String,
            workflow_id: Option<String>,
            attempts: u32,
            /// The dependency that ruled it out, and why.
            skip: Option<(String, String)>,
        }
        let mut dependents: HashMap<String, Dependent> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut edges = Vec::with_capacity(rows.len());
        for row in &rows {
            let dep_id: String = row.get(0);
            let task_id: String = row.get(1);
            let cond_json: String = row.get(2);
            let condition: Condition =
                serde_json::from_str(&cond_json).unwrap_or(Condition::Success);
            let (dst, dout) = finished
                .get(&dep_id)
                .map(|(s, o)| (*s, o.as_ref()))
                .unwrap_or((TaskStatus::Failed, None));
            let verdict = condition_holds(&condition, dst, dout);
            edges.push(serde_json::json!([
                dep_id,
                task_id,
                if verdict.is_ok() { "met" } else { "unmet" }
            ]));
            let d = dependents.entry(task_id.clone()).or_insert_with(|| {
                order.push(task_id.clone());
                let status: String = row.get(3);
                Dependent {
                    status: status.parse().unwrap_or(TaskStatus::Failed),
                    pending: row.get(4),
                    needs_approval: row.get::<i64, _>(5) != 0,
                    run_at: row.get(6),
                    name: row.get(7),
                    workflow_id: row.get(8),
                    attempts: row.get::<i64, _>(9) as u32,
                    skip: None,
                }
            });
            if d.status != TaskStatus::Pending {
                continue;
            }
            match verdict {
                Ok(()) => d.pending -= 1,
                Err(why) => {
                    if d.skip.is_none() {
                        d.skip = Some((dep_id.clone(), why));
                    }
                }
            }
        }
        let now = batch_now(batch);
        // Names of the dependencies that skipped something, for the reason text.
        let mut dep_names: HashMap<String, String> = HashMap::new();
        for d in dependents.values() {
            if let Some((dep, _)) = &d.skip
                && d.status == TaskStatus::Pending
                && !dep_names.contains_key(dep)
            {
                let name: Option<String> =
                    sqlx::query_scalar("SELECT name FROM tasks WHERE id = $1")
                        .bind(dep)
                        .fetch_optional(&mut *conn)
                        .await?;
                dep_names.insert(dep.clone(), name.unwrap_or_default());
            }
        }
        let mut updates = Vec::new();
        for id in order {
            let d = &dependents[&id];
            if d.status != TaskStatus::Pending {
                continue;
            }
            let (to, finished_at, error) = match &d.skip {
                Some((dep, why)) => (
                    TaskStatus::Skipped,
                    Some(now),
                    Some(format!(
                        "skipped: dependency {} ({dep}) can no longer meet its condition: {why}",
                        dep_names.get(dep).map(String::as_str).unwrap_or("")
                    )),
                ),
                None if d.pending <= 0 => {
                    (ready_status(d.needs_approval, d.run_at, now), None, None)
                }
                None => (TaskStatus::Pending, None, None),
            };
            updates.push(serde_json::json!([
                id,
                to.as_str(),
                if to == TaskStatus::Skipped {
                    0
                } else {
                    d.pending.max(0)
                },
                finished_at,
                error
            ]));
            if to == TaskStatus::Pending {
                continue;
            }
            let detail = match &error {
                Some(e) => serde_json::json!({ "reason": e }).to_string(),
                None => "{}".to_string(),
            };
            batch.transition(
                now,
                &id,
                &d.name,
                d.workflow_id.as_deref(),
                if to == TaskStatus::Skipped {
                    "skipped"
                } else {
                    "ready"
                },
                Some(TaskStatus::Pending),
                to,
                d.attempts,
                detail,
            );
            if to.is_terminal() {
                batch.terminal(&id, to, None, d.workflow_id.clone());
            }
        }
        sqlx::query(
            "UPDATE task_deps SET state = v ->> 2 FROM jsonb_array_elements($1::jsonb) AS e(v) \
             WHERE task_deps.dep_id = v ->> 0 AND task_deps.task_id = v ->> 1",
        )
        .bind(serde_json::Value::Array(edges).to_string())
        .execute(&mut *conn)
        .await?;
        if !updates.is_empty() {
            sqlx::query(
                "UPDATE tasks SET status = v ->> 1, deps_pending = (v ->> 2)::bigint, \
                 finished_at = (v ->> 3)::bigint, error = COALESCE(v ->> 4, tasks.error), \
                 updated_at = $2 FROM jsonb_array_elements($1::jsonb) AS e(v) WHERE tasks.id = v ->> 0",
            )
            .bind(serde_json::Value::Array(updates).to_string())
            .bind(now)
            .execute(&mut *conn)
            .await?;
        }
    }
    Ok(())
}

/// The time of the transaction's latest change (dependents resolve "now").
fn batch_now(batch: &Batch) -> i64 {
    batch.audit.iter().map(|a| a.at).max().unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })
}

/// Moves the counters of workflows whose tasks finished, and finishes a
/// workflow when its last task does.
async fn update_workflows(conn: &mut PgConnection, batch: &mut Batch) -> Result<()> {
    if batch.terminal.iter().all(|t| t.workflow_id.is_none()) {
        batch.terminal.clear();
        return Ok(());
    }
    let mut per: HashMap<String, (i64, i64, i64)> = HashMap::new();
    for t in batch.terminal.drain(..) {
        let Some(w) = t.workflow_id else { continue };
        let e = per.entry(w).or_default();
        e.0 += 1;
        if matches!(t.status, TaskStatus::Failed | TaskStatus::TimedOut) {
            e.1 += 1;
        }
        if t.status == TaskStatus::Cancelled {
            e.2 += 1;
        }
        let _ = t.id;
    }
    let rows: Vec<serde_json::Value> = per
        .iter()
        .map(|(w, (d, f, c))| serde_json::json!([w, d, f, c]))
        .collect();
    let now = batch_now(batch);
    let done: Vec<(String, String, String, i64, i64, i64, i64)> = sqlx::query_as(
        "UPDATE workflows SET tasks_done = tasks_done + (v ->> 1)::bigint, \
         tasks_failed = tasks_failed + (v ->> 2)::bigint, tasks_cancelled = tasks_cancelled + (v ->> 3)::bigint, \
         updated_at = $2 FROM jsonb_array_elements($1::jsonb) AS e(v) WHERE workflows.id = v ->> 0 \
         RETURNING workflows.id, workflows.name, workflows.status, workflows.tasks_total, \
         workflows.tasks_done, workflows.tasks_failed, workflows.tasks_cancelled",
    )
    .bind(serde_json::Value::Array(rows).to_string())
    .bind(now)
    .fetch_all(&mut *conn)
    .await?;
    for (id, name, status, total, done, failed, cancelled) in done {
        if status != "running" || done < total {
            continue;
        }
        // Its tasks skipped because a dependency outside it failed or was
        // cancelled (their unmet edges say which).
        let (outside_failed, outside_cancelled): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(DISTINCT CASE WHEN p.status IN ('failed', 'timed_out') THEN t.id END), \
             COUNT(DISTINCT CASE WHEN p.status = 'cancelled' THEN t.id END) \
             FROM tasks t JOIN task_deps d ON d.task_id = t.id AND d.state = 'unmet' \
             JOIN tasks p ON p.id = d.dep_id \
             WHERE t.workflow_id = $1 AND t.status = 'skipped' AND p.workflow_id IS DISTINCT FROM $1",
        )
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        let (to, detail) = crate::store::finished_workflow(
            total,
            (failed, cancelled),
            (outside_failed, outside_cancelled),
        );
        sqlx::query("UPDATE workflows SET status = $1, finished_at = $2 WHERE id = $3")
            .bind(to.as_str())
            .bind(now)
            .bind(&id)
            .execute(&mut *conn)
            .await?;
        batch.audit_other(
            now,
            &id,
            "workflow_finished",
            Some(WorkflowStatus::Running.as_str()),
            to.as_str(),
            detail,
        );
        batch.workflow_events.push(WorkflowEvent {
            workflow_id: id,
            name,
            status: to,
            at: Timestamp(now),
        });
    }
    Ok(())
}

/// The claim query. `$1` = now, `$2` = limit; the filter's values follow
/// from `$3` in the order [`claim_binds`] gives them. (sqlx numbers
/// anonymous `?` on its own, so never mix them with `?N`.)
pub(super) fn claim_sql(req: &ClaimRequest) -> String {
    let mut n = 3;
    let mut next = || {
        let p = format!("${n}");
        n += 1;
        p
    };
    let external = req.external.as_ref().map(|f| {
        let mut c = "kind = 'external'".to_string();
        if !f.names.is_empty() {
            // `prefix*` names are prefix patterns.
            let exact: Vec<String> = f
                .names
                .iter()
                .filter(|n| !n.ends_with('*'))
                .map(|_| next())
                .collect();
            let mut alts = Vec::new();
            if !exact.is_empty() {
                alts.push(format!("name IN ({})", exact.join(",")));
            }
            for _ in f.names.iter().filter(|n| n.ends_with('*')) {
                alts.push(format!("starts_with(name, {})", next()));
            }
            c.push_str(&format!(" AND ({})", alts.join(" OR ")));
        }
        if f.project.is_some() {
            c.push_str(&format!(" AND project = {}", next()));
        }
        for _ in &f.tags {
            c.push_str(&format!(
                " AND tasks.tags::jsonb @> jsonb_build_array({}::text)",
                next()
            ));
        }
        c
    });
    let kind_filter = match (req.server_kinds, external) {
        (true, None) => "AND kind IN ('command', 'http')".to_string(),
        (true, Some(e)) => format!("AND (kind IN ('command', 'http') OR ({e}))"),
        (false, Some(e)) => format!("AND {e}"),
        (false, None) => "AND false".to_string(),
    };
    // Only these tasks (a JSON array of ids), for an engine with a scope.
    let only = match &req.only {
        Some(_) => format!(
            " AND id IN (SELECT jsonb_array_elements_text({}::jsonb))",
            next()
        ),
        None => String::new(),
    };
    format!(
        "SELECT seq, id, name, kind, priority, status, attempts, max_attempts, spec, spec_hash, workflow_id \
         FROM tasks \
         WHERE status IN ('queued', 'retrying') AND run_at <= $1 {kind_filter}{only} \
         ORDER BY priority DESC, seq LIMIT $2 FOR UPDATE SKIP LOCKED"
    )
}

/// The values bound after `$1`/`$2` in [`claim_sql`], in order.
pub(super) fn claim_binds(req: &ClaimRequest) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(f) = &req.external {
        v.extend(f.names.iter().filter(|n| !n.ends_with('*')).cloned());
        v.extend(
            f.names
                .iter()
                .filter(|n| n.ends_with('*'))
                .map(|n| n.trim_end_matches('*').to_string()),
        );
        v.extend(f.project.iter().cloned());
        v.extend(f.tags.iter().cloned());
    }
    if let Some(ids) = &req.only {
        v.push(serde_json::to_string(ids.as_ref()).unwrap_or_else(|_| "[]".into()));
    }
    v
}

/// Claims in one statement: moves pending tasks whose time came on, and
/// takes up to `limit` ready tasks (`FOR UPDATE SKIP LOCKED`), marking them
/// running. Tasks promoted by the statement are not yet visible to its
/// own claim, so when it promoted some and claimed fewer than asked, it
/// runs once more.
async fn claim(
    conn: &mut PgConnection,
    req: &ClaimRequest,
    batch: &mut Batch,
) -> Result<Vec<ClaimedTask>> {
    let mut claimed = claim_once(conn, req, req.limit, batch).await?;
    if claimed.promoted > 0 && claimed.tasks.len() < req.limit {
        let more = claim_once(conn, req, req.limit - claimed.tasks.len(), batch).await?;
        claimed.tasks.extend(more.tasks);
    }
    Ok(claimed.tasks)
}

struct ClaimRound {
    tasks: Vec<ClaimedTask>,
    promoted: usize,
}

async fn claim_once(
    conn: &mut PgConnection,
    req: &ClaimRequest,
    limit: usize,
    batch: &mut Batch,
) -> Result<ClaimRound> {
    let binds = claim_binds(req);
    let worker = 3 + binds.len();
    let sql = format!(
        "WITH promoted AS (UPDATE tasks SET status = CASE WHEN needs_approval <> 0 \
         THEN 'awaiting_approval' ELSE 'queued' END, updated_at = $1 \
         WHERE status = 'pending' AND deps_pending = 0 AND run_at <= $1 \
         RETURNING id, name, status, workflow_id), \
         picked AS ({}), \
         claimed AS (UPDATE tasks SET status = 'running', attempts = tasks.attempts + 1, \
         lease_owner = ${worker}, lease_expires_at = ${}, started_at = $1, updated_at = $1, run_at = $1 \
         FROM picked WHERE tasks.seq = picked.seq \
         RETURNING picked.seq, picked.id, picked.name, picked.kind, picked.priority, picked.status, \
         picked.attempts, picked.max_attempts, picked.spec, picked.spec_hash, picked.workflow_id) \
         SELECT false AS promotion, seq, id, name, kind, priority, status, attempts, max_attempts, \
         spec, spec_hash, workflow_id FROM claimed \
         UNION ALL SELECT true, NULL, id, name, NULL, NULL, status, NULL, NULL, NULL, NULL, workflow_id \
         FROM promoted",
        claim_sql(req),
        worker + 1
    );
    let mut q = sqlx::query(AssertSqlSafe(sql))
        .bind(req.now)
        .bind(limit as i64);
    for v in binds {
        q = q.bind(v);
    }
    // The claim must walk `tasks_ready` in its order and stop after
    // `limit` rows. Right after a burst of submits the table's statistics
    // say almost nothing is ready, and the planner then prefers a bitmap
    // scan of every ready row plus a sort (34 ms for 29k ready tasks,
    // against 0.4 ms in index order). Sorting is ruled out for this
    // statement only; PostgreSQL has no index hint.
    sqlx::raw_sql("SET LOCAL enable_sort = off")
        .execute(&mut *conn)
        .await?;
    // A failed claim is returned as it is (a deadlock, say, must reach
    // `retryable` with its own code): the reset would only fail on the
    // aborted transaction, and the setting ends with it anyway.
    let rows = q
        .bind(&req.worker_id)
        .bind(req.lease_until)
        .fetch_all(&mut *conn)
        .await?;
    sqlx::raw_sql("SET LOCAL enable_sort = DEFAULT")
        .execute(&mut *conn)
        .await?;
    let mut claimed = Vec::with_capacity(rows.len());
    let mut promoted = 0;
    for row in &rows {
        let status: String = row.get(6);
        if row.get::<bool, _>(0) {
            // Promotions come first in the audit chain, as they happened first.
            promoted += 1;
            let id: String = row.get(2);
            let name: String = row.get(3);
            let wf: Option<String> = row.get(11);
            batch.transition(
                req.now,
                &id,
                &name,
                wf.as_deref(),
                "ready",
                Some(TaskStatus::Pending),
                status.parse().unwrap_or(TaskStatus::Queued),
                0,
                "{\"reason\":\"its time came\"}".to_string(),
            );
            continue;
        }
        let kind: String = row.get(4);
        let attempts: i64 = row.get(7);
        let from = if status == "retrying" {
            TaskStatus::Retrying
        } else {
            TaskStatus::Queued
        };
        claimed.push((
            ClaimedTask {
                seq: row.get(1),
                id: row.get(2),
                name: row.get(3),
                kind: match kind.as_str() {
                    "external" => TaskKind::External,
                    "http" => TaskKind::Http,
                    _ => TaskKind::Command,
                },
                priority: row.get(5),
                attempt: attempts as u32 + 1,
                max_attempts: row.get::<i64, _>(8) as u32,
                spec_json: row.get(9),
                spec_hash: row.get(10),
                started_at: req.now,
                workflow_id: row.get(11),
            },
            from,
        ));
    }
    // RETURNING has no order: back to the claim order.
    claimed.sort_by(|(a, _), (b, _)| b.priority.cmp(&a.priority).then(a.seq.cmp(&b.seq)));
    let mut tasks = Vec::with_capacity(claimed.len());
    for (c, f) in claimed {
        batch.transition(
            req.now,
            &c.id,
            &c.name,
            c.workflow_id.as_deref(),
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
        tasks.push(c);
    }
    Ok(ClaimRound { tasks, promoted })
}

/// Answers the claims that come with the batch's finishes (one list per
/// finish, in op order). Requests from the same worker with the same
/// filter are merged into one claim for all of their slots; the claimed
/// tasks are then dealt out in claim order.
async fn claim_for_finishes(
    conn: &mut PgConnection,
    ops: &[Op],
    batch: &mut Batch,
) -> Result<Vec<Vec<ClaimedTask>>> {
    let requests: Vec<Option<&ClaimRequest>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Finish { next, .. } => Some(next.as_deref()),
            _ => None,
        })
        .collect();
    let mut out: Vec<Vec<ClaimedTask>> = requests.iter().map(|_| Vec::new()).collect();
    for (req, members) in crate::store::merge_claims(&requests) {
        let claimed = claim(conn, &req, batch).await?;
        crate::store::deal_claims(claimed, &members, &requests, &mut out);
    }
    Ok(out)
}

/// The fenced UPDATE of every finish in a batch; `$1` is a JSON array of
/// rows `[id, status, run_at, finished_at, now, result, error, worker,
/// attempt, "running"]`.
///
/// The fence compares the status with the one carried in each row, not
/// with the constant `'running'`: a constant matches the condition of the
/// partial indexes of running tasks, and the planner then walked one of
/// them (for every row, or all of it into a bitmap), where entries of
/// every task that ever ran pile up until vacuum, so each finish got
/// slower the more tasks had run. The only index left for the join is
/// the unique `id`: one probe per finished attempt.
pub(super) const FINISH_SQL: &str = "UPDATE tasks SET status = v ->> 1, \
     run_at = COALESCE((v ->> 2)::bigint, tasks.run_at), \
     finished_at = (v ->> 3)::bigint, updated_at = (v ->> 4)::bigint, lease_owner = NULL, \
     lease_expires_at = NULL, result = v ->> 5, error = v ->> 6 \
     FROM jsonb_array_elements($1::jsonb) AS e(v) \
     WHERE tasks.id = v ->> 0 AND tasks.status = v ->> 9 \
     AND tasks.lease_owner = v ->> 7 AND tasks.attempts = (v ->> 8)::bigint \
     RETURNING tasks.id, tasks.name, tasks.workflow_id";

/// The plan (`EXPLAIN`, nothing is run) of the finish statement for these
/// attempts (`(task id, worker, attempt)`), for diagnostics.
pub async fn explain_finish(
    pool: &PgPool,
    attempts: &[(String, String, u32)],
) -> Result<Vec<String>> {
    let rows: Vec<serde_json::Value> = attempts
        .iter()
        .map(|(id, worker, attempt)| {
            serde_json::json!([
                id,
                "succeeded",
                null,
                1,
                1,
                "{}",
                null,
                worker,
                attempt,
                "running"
            ])
        })
        .collect();
    Ok(
        sqlx::query_scalar(AssertSqlSafe(format!("EXPLAIN {FINISH_SQL}")))
            .bind(serde_json::Value::Array(rows).to_string())
            .fetch_all(pool)
            .await?,
    )
}

/// Applies every finish of the batch with one fenced UPDATE: a finish
/// counts only if the task is still `running` under the same worker and
/// attempt. Every attempt is recorded either way.
async fn finish_all(
    conn: &mut PgConnection,
    finishes: &[&FinishAttempt],
    batch: &mut Batch,
) -> Result<Vec<FinishOutcome>> {
    if finishes.is_empty() {
        return Ok(Vec::new());
    }
    let mut rows = Vec::with_capacity(finishes.len());
    let mut planned = Vec::with_capacity(finishes.len());
    // A task finished twice in one batch (a client's `complete` sent again
    // after a timeout, or `complete` racing `fail`): only the first goes
    // into the UPDATE, which would otherwise change the row once and
    // return it once for both. The later one is stale, as it is when it
    // comes in a later batch (and as SQLite, checking one by one, finds).
    let mut first = std::collections::HashSet::with_capacity(finishes.len());
    let mut repeated = Vec::with_capacity(finishes.len());
    for f in finishes {
        let again = !first.insert(f.task_id.as_str());
        repeated.push(again);
        let result_json =
            serde_json::to_string(&f.result).map_err(|e| Error::Store(e.to_string()))?;
        let (status, run_at, finished_at) = match f.next {
            Next::Done(s) => (s, None, Some(f.now)),
            Next::Retry { run_at } => (TaskStatus::Retrying, Some(run_at), None),
        };
        planned.push((status, run_at));
        if again {
            batch.attempts.push(AttemptRow::finished(f, result_json));
            continue;
        }
        rows.push(serde_json::json!([
            f.task_id,
            status.as_str(),
            run_at,
            finished_at,
            f.now,
            result_json,
            f.error,
            f.worker_id,
            f.attempt,
            TaskStatus::Running.as_str()
        ]));
        batch.attempts.push(AttemptRow::finished(f, result_json));
        for log in &f.logs {
            if log.data.is_empty() && log.dropped_bytes == 0 {
                continue;
            }
            sqlx::query(
                "INSERT INTO task_logs (task_id, attempt, stream, data, dropped_bytes) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (task_id, attempt, stream) \
                 DO UPDATE SET data = EXCLUDED.data, dropped_bytes = EXCLUDED.dropped_bytes",
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
    let applied: Vec<(String, String, Option<String>)> = sqlx::query_as(FINISH_SQL)
        .bind(serde_json::Value::Array(rows).to_string())
        .fetch_all(&mut *conn)
        .await?;
    let applied: HashMap<String, (String, Option<String>)> = applied
        .into_iter()
        .map(|(id, name, wf)| (id, (name, wf)))
        .collect();
    let mut out = Vec::with_capacity(finishes.len());
    let mut applied_status: HashMap<&str, TaskStatus> = HashMap::new();
    for ((f, (status, run_at)), again) in finishes.iter().zip(planned).zip(repeated) {
        let first_applied = applied_status.get(f.task_id.as_str()).copied();
        let applied_here = if again { None } else { applied.get(&f.task_id) };
        let Some((name, wf)) = applied_here else {
            if let Some(s) = first_applied {
                out.push(FinishOutcome::Stale(s));
                continue;
            }
            let current: Option<String> =
                sqlx::query_scalar("SELECT status FROM tasks WHERE id = $1")
                    .bind(&f.task_id)
                    .fetch_optional(&mut *conn)
                    .await?;
            let current = current
                .and_then(|s| s.parse().ok())
                .unwrap_or(TaskStatus::Failed);
            out.push(FinishOutcome::Stale(current));
            continue;
        };
        applied_status.insert(f.task_id.as_str(), status);
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
            wf.as_deref(),
            "finished",
            Some(TaskStatus::Running),
            status,
            f.attempt,
            detail.to_string(),
        );
        if status.is_terminal() {
            batch.terminal(&f.task_id, status, f.result.output.clone(), wf.clone());
        }
        out.push(FinishOutcome::Applied(status));
    }
    Ok(out)
}

async fn renew(
    conn: &mut PgConnection,
    worker_id: &str,
    task_ids: &[String],
    now: i64,
    lease_until: i64,
) -> Result<Vec<String>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "UPDATE tasks SET lease_expires_at = $1 WHERE id = ANY($3) AND lease_owner = $2 \
         AND status = 'running' RETURNING id",
    )
    .bind(lease_until)
    .bind(worker_id)
    .bind(task_ids)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("UPDATE workers SET last_seen = $1 WHERE id = $2")
        .bind(now)
        .bind(worker_id)
        .execute(&mut *conn)
        .await?;
    Ok(ids)
}

async fn reclaim(
    conn: &mut PgConnection,
    scope: &Reclaim,
    now: i64,
    batch: &mut Batch,
) -> Result<Vec<TaskEvent>> {
    let base = "SELECT id, name, attempts, max_attempts, spec, lease_owner, started_at, workflow_id FROM tasks WHERE status = 'running'";
    let rows = match scope {
        Reclaim::Expired => {
            sqlx::query(AssertSqlSafe(format!(
                "{base} AND lease_expires_at < $1 FOR UPDATE SKIP LOCKED"
            )))
            .bind(now)
            .fetch_all(&mut *conn)
            .await?
        }
        Reclaim::Workers(ids) if ids.is_empty() => Vec::new(),
        Reclaim::Workers(ids) => {
            sqlx::query(AssertSqlSafe(format!(
                "{base} AND lease_owner = ANY($1) FOR UPDATE SKIP LOCKED"
            )))
            .bind(ids)
            .fetch_all(&mut *conn)
            .await?
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
        let wf: Option<String> = row.get(7);
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
            "UPDATE tasks SET status = $1, run_at = COALESCE($2, run_at), finished_at = $3, updated_at = $4, \
             lease_owner = NULL, lease_expires_at = NULL, error = $5 WHERE id = $6",
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
            wf.as_deref(),
            "lease_expired",
            Some(TaskStatus::Running),
            status,
            attempts,
            format!("{{\"attempt\":{attempts},\"worker\":{}}}", json_str(&owner)),
        );
        if status.is_terminal() {
            batch.terminal(&id, status, None, wf);
        }
    }
    Ok(batch.events[first..].to_vec())
}

async fn cancel(
    conn: &mut PgConnection,
    id: &str,
    now: i64,
    reason: &Option<String>,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row = sqlx::query(
        "SELECT status, name, attempts, workflow_id FROM tasks WHERE id = $1 FOR UPDATE",
    )
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
    let wf: Option<String> = row.get(3);
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
        "UPDATE tasks SET status = 'cancelled', finished_at = $1, updated_at = $1, lease_owner = NULL, \
         lease_expires_at = NULL, error = $2 WHERE id = $3",
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
        wf.as_deref(),
        "cancelled",
        Some(status),
        TaskStatus::Cancelled,
        attempts,
        format!("{{\"reason\":{}}}", json_str(&error)),
    );
    batch.terminal(id, TaskStatus::Cancelled, None, wf);
    Ok(Ok(()))
}

async fn cancel_workflow(
    conn: &mut PgConnection,
    id: &str,
    now: i64,
    reason: &Option<String>,
    batch: &mut Batch,
) -> Result<Result<Vec<String>>> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT status, name FROM workflows WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((status, wf_name)) = row else {
        return Ok(Err(Error::workflow_not_found(id)));
    };
    match status.as_str() {
        "running" => {}
        "cancelled" => return Ok(Ok(Vec::new())),
        other => {
            return Ok(Err(Error::Conflict(format!(
                "workflow {id} already {other}; only a running workflow can be cancelled"
            ))));
        }
    }
    let error = reason
        .clone()
        .unwrap_or_else(|| "cancelled with its workflow".to_string());
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT id, name, status, attempts FROM tasks WHERE workflow_id = $1 \
         AND status IN ('pending', 'queued', 'running', 'awaiting_approval', 'retrying') ORDER BY seq FOR UPDATE",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE tasks SET status = 'cancelled', finished_at = $1, updated_at = $1, lease_owner = NULL, \
         lease_expires_at = NULL, error = $2 WHERE workflow_id = $3 \
         AND status IN ('pending', 'queued', 'running', 'awaiting_approval', 'retrying')",
    )
    .bind(now)
    .bind(&error)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE workflows SET status = 'cancelled', finished_at = $1, updated_at = $1 WHERE id = $2",
    )
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    batch.audit_other(
        now,
        id,
        "workflow_cancelled",
        Some(WorkflowStatus::Running.as_str()),
        WorkflowStatus::Cancelled.as_str(),
        format!("{{\"reason\":{}}}", json_str(&error)),
    );
    batch.workflow_events.push(WorkflowEvent {
        workflow_id: id.to_string(),
        name: wf_name,
        status: WorkflowStatus::Cancelled,
        at: Timestamp(now),
    });
    let mut ids = Vec::with_capacity(rows.len());
    for (tid, name, st, attempts) in rows {
        let from: TaskStatus = st.parse().unwrap_or(TaskStatus::Pending);
        batch.transition(
            now,
            &tid,
            &name,
            Some(id),
            "cancelled",
            Some(from),
            TaskStatus::Cancelled,
            attempts as u32,
            format!("{{\"reason\":{}}}", json_str(&error)),
        );
        batch.terminal(&tid, TaskStatus::Cancelled, None, Some(id.to_string()));
        ids.push(tid);
    }
    Ok(Ok(ids))
}

async fn approve(
    conn: &mut PgConnection,
    id: &str,
    d: &ApprovalDecision,
    now: i64,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row: Option<(String, String, i64, Option<String>)> = sqlx::query_as(
        "SELECT status, name, attempts, workflow_id FROM tasks WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, name, attempts, wf)) = row else {
        return Ok(Err(Error::task_not_found(id)));
    };
    let status: TaskStatus = status.parse().unwrap_or(TaskStatus::Failed);
    if status != TaskStatus::AwaitingApproval {
        let hint = match status {
            TaskStatus::Pending => {
                "it is still waiting for its dependencies or its time; it can be decided once it is awaiting_approval"
            }
            s if s.is_terminal() => "it has already finished",
            _ => "it did not require an approval or was already approved",
        };
        return Ok(Err(Error::Conflict(format!(
            "task {id} is {status}, not awaiting_approval: {hint}"
        ))));
    }
    let approval = Approval {
        approved: d.approved,
        comment: d.comment.clone(),
        by: d.by.clone(),
        at: Timestamp(now),
    };
    let approval_json =
        serde_json::to_string(&approval).map_err(|e| Error::Store(e.to_string()))?;
    let (to, error, finished_at) = if d.approved {
        (TaskStatus::Queued, None, None)
    } else {
        let why = match &d.comment {
            Some(c) => format!("rejected: {c}"),
            None => "rejected".to_string(),
        };
        (TaskStatus::Failed, Some(why), Some(now))
    };
    sqlx::query(
        "UPDATE tasks SET status = $1, approval = $2, error = $3, finished_at = $4, updated_at = $5, \
         run_at = $5 WHERE id = $6",
    )
    .bind(to.as_str())
    .bind(&approval_json)
    .bind(&error)
    .bind(finished_at)
    .bind(now)
    .bind(id)
    .execute(&mut *conn)
    .await?;
    batch.transition(
        now,
        id,
        &name,
        wf.as_deref(),
        if d.approved { "approved" } else { "rejected" },
        Some(TaskStatus::AwaitingApproval),
        to,
        attempts as u32,
        approval_json,
    );
    if to.is_terminal() {
        batch.terminal(id, to, None, wf);
    }
    Ok(Ok(()))
}

/// Runs a finished task again: it goes back to `queued` with a fresh
/// allowance of attempts (its history stays), and every task skipped
/// because of it goes back to `pending` to be decided again. Workflows
/// involved are running again.
/// Queues the finished dependencies of `task` whose edges wait, so that
/// [`resolve_dependents`] decides those edges in this transaction.
async fn queue_finished_deps(conn: &mut PgConnection, task: &str, batch: &mut Batch) -> Result<()> {
    let finished: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT t.id, t.status, t.result FROM task_deps d JOIN tasks t ON t.id = d.dep_id \
         WHERE d.task_id = $1 AND d.state = 'waiting' \
         AND t.status IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')",
    )
    .bind(task)
    .fetch_all(&mut *conn)
    .await?;
    for (id, status, result) in finished {
        batch
            .resolve
            .push(crate::store::finished_dep(id, &status, result.as_deref()));
    }
    Ok(())
}

async fn retry(
    conn: &mut PgConnection,
    id: &str,
    now: i64,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row: Option<(String, String, i64, Option<String>, String)> = sqlx::query_as(
        "SELECT status, name, attempts, workflow_id, spec FROM tasks WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((status, name, attempts, wf, spec)) = row else {
        return Ok(Err(Error::task_not_found(id)));
    };
    let status: TaskStatus = status.parse().unwrap_or(TaskStatus::Failed);
    if !matches!(
        status,
        TaskStatus::Failed | TaskStatus::TimedOut | TaskStatus::Cancelled
    ) {
        let hint = match status {
            TaskStatus::Succeeded => "it succeeded; submit it again to run it once more",
            TaskStatus::Skipped => "it was skipped; retry the dependency that caused it",
            _ => "it has not finished",
        };
        return Ok(Err(Error::Conflict(format!(
            "task {id} is {status}, so it cannot be retried: {hint}"
        ))));
    }
    if let Some(w) = &wf {
        let wstatus: Option<String> =
            sqlx::query_scalar("SELECT status FROM workflows WHERE id = $1 FOR SHARE")
                .bind(w)
                .fetch_optional(&mut *conn)
                .await?;
        if wstatus.as_deref() == Some("cancelled") {
            return Ok(Err(crate::store::retry_in_cancelled_workflow(id, w)));
        }
    }
    let allowance = serde_json::from_str::<TaskSpec>(&spec)
        .ok()
        .and_then(|s| s.retry)
        .map(|r| r.max_attempts())
        .unwrap_or(1) as i64;
    // Its dependencies decide again, as for a task it had skipped: edges
    // not met wait again, and those whose dependency has finished are
    // resolved in this transaction (an unmet one skips it again). A time
    // that has not come yet (`at`) is kept; an approval gate asks again.
    sqlx::query("UPDATE task_deps SET state = 'waiting' WHERE task_id = $1 AND state != 'met'")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    let (waiting, run_at, needs_approval): (i64, i64, i64) = sqlx::query_as(
        "UPDATE tasks SET max_attempts = $1, finished_at = NULL, error = NULL, \
         run_at = GREATEST(run_at, $2), updated_at = $2, \
         approval = CASE WHEN needs_approval <> 0 THEN NULL ELSE approval END, \
         deps_pending = (SELECT COUNT(*) FROM task_deps WHERE task_id = $3 AND state = 'waiting') \
         WHERE id = $3 RETURNING deps_pending::bigint, run_at, needs_approval::bigint",
    )
    .bind(attempts + allowance)
    .bind(now)
    .bind(id)
    .fetch_one(&mut *conn)
    .await?;
    let to = if waiting > 0 {
        TaskStatus::Pending
    } else {
        ready_status(needs_approval != 0, run_at, now)
    };
    sqlx::query("UPDATE tasks SET status = $1 WHERE id = $2")
        .bind(to.as_str())
        .bind(id)
        .execute(&mut *conn)
        .await?;
    queue_finished_deps(conn, id, batch).await?;
    batch.transition(
        now,
        id,
        &name,
        wf.as_deref(),
        "retried",
        Some(status),
        to,
        attempts as u32,
        format!("{{\"max_attempts\":{}}}", attempts + allowance),
    );
    let mut reopened: Vec<(Option<String>, TaskStatus)> = vec![(wf, status)];
    // Tasks skipped because of it (transitively) are decided again.
    let mut frontier = vec![id.to_string()];
    while let Some(dep) = frontier.pop() {
        let skipped: Vec<(String, String, Option<String>, i64)> = sqlx::query_as(
            "SELECT t.id, t.name, t.workflow_id, t.attempts FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.dep_id = $1 AND t.status = 'skipped'",
        )
        .bind(&dep)
        .fetch_all(&mut *conn)
        .await?;
        for (tid, tname, twf, tattempts) in skipped {
            // The search above takes no lock: a retry of another of its
            // dependencies (another writer, another node) may have
            // reopened it since. Locked, and read again once that one
            // commits, it is reopened only if it is still skipped.
            let still: Option<String> = sqlx::query_scalar(
                "SELECT id FROM tasks WHERE id = $1 AND status = 'skipped' FOR UPDATE",
            )
            .bind(&tid)
            .fetch_optional(&mut *conn)
            .await?;
            if still.is_none() {
                continue;
            }
            sqlx::query(
                "UPDATE task_deps SET state = 'waiting' WHERE task_id = $1 AND state != 'met'",
            )
            .bind(&tid)
            .execute(&mut *conn)
            .await?;
            sqlx::query(
                "UPDATE tasks SET status = 'pending', finished_at = NULL, error = NULL, updated_at = $2, \
                 deps_pending = (SELECT COUNT(*) FROM task_deps WHERE task_id = $1 AND state = 'waiting') \
                 WHERE id = $1",
            )
            .bind(&tid)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            batch.transition(
                now,
                &tid,
                &tname,
                twf.as_deref(),
                "reopened",
                Some(TaskStatus::Skipped),
                TaskStatus::Pending,
                tattempts as u32,
                format!("{{\"because\":{}}}", json_str(id)),
            );
            // Its other finished dependencies decide again.
            queue_finished_deps(conn, &tid, batch).await?;
            reopened.push((twf, TaskStatus::Skipped));
            frontier.push(tid);
        }
    }
    // Workflow counters give the reopened tasks back.
    for (w, was) in reopened {
        let Some(w) = w else { continue };
        let failed = i64::from(matches!(was, TaskStatus::Failed | TaskStatus::TimedOut));
        let cancelled = i64::from(was == TaskStatus::Cancelled);
        let prev: Option<(String, String)> = sqlx::query_as(
            "UPDATE workflows SET tasks_done = tasks_done - 1, tasks_failed = tasks_failed - $2, \
             tasks_cancelled = tasks_cancelled - $3, updated_at = $4 WHERE id = $1 \
             RETURNING status, name",
        )
        .bind(&w)
        .bind(failed)
        .bind(cancelled)
        .bind(now)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((wstatus, wname)) = prev
            && wstatus != "running"
        {
            sqlx::query(
                "UPDATE workflows SET status = 'running', finished_at = NULL WHERE id = $1",
            )
            .bind(&w)
            .execute(&mut *conn)
            .await?;
            let from: WorkflowStatus = wstatus.parse().unwrap_or(WorkflowStatus::Failed);
            batch.audit_other(
                now,
                &w,
                "workflow_reopened",
                Some(from.as_str()),
                WorkflowStatus::Running.as_str(),
                format!("{{\"because\":{}}}", json_str(id)),
            );
            batch.workflow_events.push(WorkflowEvent {
                workflow_id: w.clone(),
                name: wname,
                status: WorkflowStatus::Running,
                at: Timestamp(now),
            });
        }
    }
    Ok(Ok(()))
}

async fn heartbeat(
    conn: &mut PgConnection,
    task_id: &str,
    worker_id: &str,
    lease_until: i64,
) -> Result<Result<()>> {
    let done = sqlx::query(
        "UPDATE tasks SET lease_expires_at = $1 WHERE id = $2 AND status = 'running' AND lease_owner = $3",
    )
    .bind(lease_until)
    .bind(task_id)
    .bind(worker_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if done == 1 {
        return Ok(Ok(()));
    }
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT status, lease_owner FROM tasks WHERE id = $1")
            .bind(task_id)
            .fetch_optional(&mut *conn)
            .await?;
    Ok(Err(match row {
        None => Error::task_not_found(task_id),
        Some((status, owner)) => Error::Conflict(format!(
            "worker {worker_id} does not hold task {task_id} (it is {status}{}); its lease expired or the task was cancelled — stop working on it",
            owner.map(|o| format!(", held by {o}")).unwrap_or_default()
        )),
    }))
}

async fn put_logs(
    conn: &mut PgConnection,
    task_id: &str,
    attempt: u32,
    logs: &[StreamLog],
) -> Result<()> {
    for log in logs {
        sqlx::query(
            "INSERT INTO task_logs (task_id, attempt, stream, data, dropped_bytes) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (task_id, attempt, stream) \
             DO UPDATE SET data = EXCLUDED.data, dropped_bytes = EXCLUDED.dropped_bytes",
        )
        .bind(task_id)
        .bind(attempt as i64)
        .bind(log.stream)
        .bind(&log.data)
        .bind(log.dropped_bytes as i64)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

async fn fire_schedule(
    conn: &mut PgConnection,
    f: &FireSchedule,
    batch: &mut Batch,
) -> Result<Result<bool>> {
    let row: Option<(Option<i64>, i64, String)> =
        sqlx::query_as("SELECT next_fire_at, paused, name FROM schedules WHERE id = $1 FOR UPDATE")
            .bind(&f.schedule_id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((next, paused, name)) = row else {
        return Ok(Ok(false));
    };
    if paused != 0 || next != Some(f.expected) {
        return Ok(Ok(false));
    }
    let answers = submit_all(conn, &[&f.run], batch).await?;
    if let Some(Err(e)) = answers.into_iter().next() {
        return Ok(Err(e));
    }
    sqlx::query(
        "UPDATE schedules SET next_fire_at = $1, upcoming_run = $2, last_fired_at = $3, runs = runs + 1, \
         updated_at = $4 WHERE id = $5",
    )
    .bind(f.next_fire_at)
    .bind(&f.upcoming_run)
    .bind(f.expected)
    .bind(f.now)
    .bind(&f.schedule_id)
    .execute(&mut *conn)
    .await?;
    batch.audit_other(
        f.now,
        &f.schedule_id,
        "schedule_fired",
        Some("active"),
        "active",
        serde_json::json!({"name": name, "slot": f.expected, "next_fire_at": f.next_fire_at, "upcoming_run": f.upcoming_run})
            .to_string(),
    );
    Ok(Ok(true))
}

async fn change_schedule(
    conn: &mut PgConnection,
    id: &str,
    change: &ScheduleChange,
    now: i64,
    batch: &mut Batch,
) -> Result<Result<bool>> {
    let row: Option<(i64, Option<String>)> =
        sqlx::query_as("SELECT paused, upcoming_run FROM schedules WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let Some((paused, upcoming)) = row else {
        return Ok(Ok(false));
    };
    let was = if paused != 0 { "paused" } else { "active" };
    match change {
        ScheduleChange::Pause | ScheduleChange::Remove => {
            if let Some(run) = upcoming {
                cancel_upcoming(conn, &run, now, batch).await?;
            }
            let (kind, to) = if matches!(change, ScheduleChange::Remove) {
                sqlx::query("DELETE FROM schedules WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                ("schedule_removed", "removed")
            } else {
                sqlx::query(
                    "UPDATE schedules SET paused = 1, next_fire_at = NULL, upcoming_run = NULL, updated_at = $1 WHERE id = $2",
                )
                .bind(now)
                .bind(id)
                .execute(&mut *conn)
                .await?;
                ("schedule_paused", "paused")
            };
            batch.audit_other(now, id, kind, Some(was), to, "{}".into());
        }
        ScheduleChange::Resume {
            next_fire_at,
            upcoming_run,
            run,
        } => {
            if paused == 0 {
                return Ok(Ok(true));
            }
            let answers = submit_all(conn, &[run.as_ref()], batch).await?;
            if let Some(Err(e)) = answers.into_iter().next() {
                return Ok(Err(e));
            }
            sqlx::query(
                "UPDATE schedules SET paused = 0, next_fire_at = $1, upcoming_run = $2, updated_at = $3 WHERE id = $4",
            )
            .bind(next_fire_at)
            .bind(upcoming_run)
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
            batch.audit_other(
                now,
                id,
                "schedule_resumed",
                Some(was),
                "active",
                serde_json::json!({"next_fire_at": next_fire_at}).to_string(),
            );
        }
    }
    Ok(Ok(true))
}

/// Cancels a schedule's upcoming run if it has not started (all its tasks pending).
async fn cancel_upcoming(
    conn: &mut PgConnection,
    run: &str,
    now: i64,
    batch: &mut Batch,
) -> Result<()> {
    let started: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM tasks WHERE workflow_id = $1 AND status != 'pending') + \
         (SELECT COUNT(*) FROM tasks WHERE id = $1 AND status != 'pending')",
    )
    .bind(run)
    .fetch_one(&mut *conn)
    .await?;
    if started > 0 {
        return Ok(());
    }
    let reason = Some("the schedule was paused or removed before this run started".to_string());
    let is_workflow: Option<String> = sqlx::query_scalar("SELECT id FROM workflows WHERE id = $1")
        .bind(run)
        .fetch_optional(&mut *conn)
        .await?;
    if is_workflow.is_some() {
        let _ = cancel_workflow(conn, run, now, &reason, batch).await?;
    } else {
        let _ = cancel(conn, run, now, &reason, batch).await?;
    }
    // A run that never started does not hold its slot's idempotency keys:
    // resumed in the same slot, the schedule builds that run again.
    sqlx::query(
        "UPDATE tasks SET idempotency_key = NULL \
         WHERE (workflow_id = $1 OR id = $1) AND idempotency_key IS NOT NULL",
    )
    .bind(run)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn write_token(
    conn: &mut PgConnection,
    t: &TokenRecord,
    hash: &str,
    revoke: Option<i64>,
) -> Result<bool> {
    if let Some(at) = revoke {
        let n = sqlx::query(
            "UPDATE api_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
        )
        .bind(at)
        .bind(&t.id)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        return Ok(n == 1);
    }
    sqlx::query(
        "INSERT INTO api_tokens (id, name, role, hash, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&t.id)
    .bind(&t.name)
    .bind(t.role.as_str())
    .bind(hash)
    .bind(t.created_at.0)
    .execute(&mut *conn)
    .await?;
    Ok(true)
}

async fn register_worker(conn: &mut PgConnection, w: &WorkerInfo) -> Result<()> {
    sqlx::query(
        "INSERT INTO workers (id, host, pid, pid_start, started_at, last_seen) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, \
         pid_start = EXCLUDED.pid_start, started_at = EXCLUDED.started_at, last_seen = EXCLUDED.last_seen",
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
        "DELETE FROM workers WHERE last_seen < $1 AND id NOT IN \
         (SELECT lease_owner FROM tasks WHERE status = 'running' AND lease_owner IS NOT NULL)",
    )
    .bind(w.started_at - 86_400_000)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn flush_attempts(conn: &mut PgConnection, rows: &[AttemptRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    super::history::insert_attempts(conn, AttemptRow::json_array(rows)).await
}

/// Appends the batch's audit events to the chain and queues the
/// notifications for other nodes, in two round trips: the lock with the
/// chain head, then one statement for the events and the notifications.
async fn flush_audit(
    conn: &mut PgConnection,
    drafts: &[AuditDraft],
    channel: &str,
    payloads: Vec<String>,
) -> Result<()> {
    if drafts.is_empty() {
        if !payloads.is_empty() {
            sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(channel)
                .bind(payloads)
                .execute(&mut *conn)
                .await?;
        }
        return Ok(());
    }
    // One chain for every node: the transaction-scoped advisory lock
    // serialises appenders until commit, so the head read here is the head
    // the new events chain onto, and `seq` follows commit order. It is the
    // last lock a transaction takes, so it cannot close a deadlock cycle.
    // Both statements go in one simple query; each takes its own snapshot
    // (read committed), so the head is read after the lock is held.
    let rows = sqlx::raw_sql(AssertSqlSafe(format!(
        "SELECT pg_advisory_xact_lock({AUDIT_CHAIN_LOCK}); \
         SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let head = rows
        .iter()
        .find(|r| r.len() == 2)
        .map(|r| -> Result<(i64, String)> { Ok((r.try_get(0)?, r.try_get(1)?)) })
        .transpose()?;
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
        "WITH ins AS (INSERT INTO audit_events (seq, at, task_id, kind, from_status, to_status, detail, \
         prev_hash, hash) \
         SELECT (v ->> 0)::bigint, (v ->> 1)::bigint, v ->> 2, v ->> 3, v ->> 4, v ->> 5, v ->> 6, \
         v ->> 7, v ->> 8 FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, ord) ORDER BY ord) \
         SELECT pg_notify($2, p) FROM unnest($3::text[]) AS p",
    )
    .bind(serde_json::Value::Array(json).to_string())
    .bind(channel)
    .bind(payloads)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// `$1,$2,...,$n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}
