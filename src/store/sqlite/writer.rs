//! The single writer: a thread of its own with a synchronous SQLite
//! connection. It receives operations, applies everything pending in one
//! `BEGIN IMMEDIATE` transaction, commits once, then answers.
//!
//! Statements are prepared once and cached on the connection; every row is
//! bound and stepped directly, with no hop to another thread per statement.
//!
//! An operation's own failure (unknown id, bad state) is part of its answer
//! and does not disturb the batch; a database failure fails the whole batch
//! and every caller hears about it.

use rusqlite::types::{FromSql, Value as SqlValue};
use rusqlite::{Connection, OptionalExtension, params, params_from_iter};
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

/// The writer's connection (inside its open transaction).
pub(super) type Conn = Connection;

/// A row read as a tuple of columns.
pub(super) trait FromRow: Sized {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self>;
}

macro_rules! tuple_from_row {
    ($($i:tt $t:ident),+) => {
        impl<$($t: FromSql),+> FromRow for ($($t,)+) {
            fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
                Ok(($(r.get($i)?,)+))
            }
        }
    };
}
tuple_from_row!(0 A, 1 B);
tuple_from_row!(0 A, 1 B, 2 C);
tuple_from_row!(0 A, 1 B, 2 C, 3 D);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I);
tuple_from_row!(0 A, 1 B, 2 C, 3 D, 4 E, 5 F, 6 G, 7 H, 8 I, 9 J);

/// Runs a statement (prepared once per connection); the rows it changed.
pub(super) fn exec(conn: &Conn, sql: &str, p: impl rusqlite::Params) -> Result<usize> {
    Ok(conn.prepare_cached(sql)?.execute(p)?)
}

/// Every row of a query, as tuples.
pub(super) fn all<T: FromRow>(conn: &Conn, sql: &str, p: impl rusqlite::Params) -> Result<Vec<T>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map(p, T::from_row)?;
    Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
}

/// The first row of a query, if any.
pub(super) fn opt<T: FromRow>(
    conn: &Conn,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Option<T>> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row(p, T::from_row)
        .optional()?)
}

/// The first column of every row.
pub(super) fn scalars<T: FromSql>(
    conn: &Conn,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<T>> {
    let mut st = conn.prepare_cached(sql)?;
    let rows = st.query_map(p, |r| r.get::<_, T>(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<T>>>()?)
}

/// The first column of the first row, if any.
pub(super) fn scalar_opt<T: FromSql>(
    conn: &Conn,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Option<T>> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row(p, |r| r.get::<_, T>(0))
        .optional()?)
}

/// The first column of the first row, which must exist.
fn scalar_one<T: FromSql>(conn: &Conn, sql: &str, p: impl rusqlite::Params) -> Result<T> {
    Ok(conn
        .prepare_cached(sql)?
        .query_row(p, |r| r.get::<_, T>(0))?)
}

/// A new task's row: id, name, kind, project, tags, status, priority,
/// max_attempts, run_at, now (created and updated), idempotency key, spec,
/// spec hash, workflow, schedule, dependencies pending, needs approval.
pub(crate) const INSERT_TASK: &str = "INSERT INTO tasks (id, name, kind, project, tags, status, priority, \
     attempts, max_attempts, run_at, created_at, updated_at, idempotency_key, spec, spec_hash, workflow_id, \
     schedule_id, deps_pending, needs_approval) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 0, ?8, ?9, ?10, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)";

/// An audit event: seq, at, task, kind, from, to, detail, previous hash, hash.
pub(crate) const INSERT_AUDIT: &str = "INSERT INTO audit_events (seq, at, task_id, kind, from_status, \
     to_status, detail, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)";

/// Most operations committed together.
const MAX_BATCH: usize = 2048;

/// Task rows past which a batch takes no further operation. Batched
/// submits of 1000 tasks from 64 callers would otherwise make one
/// transaction of 64,000 tasks: more dirty pages than the writer's cache
/// holds (SQLite then spills them into the WAL mid-transaction, and writes
/// them again at the commit), and every caller waiting for the largest
/// commit. Single operations are not held up by this: they count one row
/// each.
const MAX_BATCH_ROWS: usize = 4096;

impl Op {
    /// The task rows the operation writes, for [`MAX_BATCH_ROWS`]: a
    /// submit's tasks, one for any other operation.
    fn rows(&self) -> usize {
        match self {
            Op::Submit { sub, .. } => sub.tasks.len().max(1),
            _ => 1,
        }
    }
}

/// Adds to `ops` (which holds `first`'s batch so far) what else is waiting,
/// up to [`MAX_BATCH`] operations or [`MAX_BATCH_ROWS`] rows.
fn gather(first: Op, rx: &mut mpsc::Receiver<Op>, ops: &mut Vec<Op>) {
    let mut rows = first.rows();
    ops.push(first);
    while ops.len() < MAX_BATCH && rows < MAX_BATCH_ROWS {
        match rx.try_recv() {
            Ok(op) => {
                rows += op.rows();
                ops.push(op);
            }
            Err(_) => break,
        }
    }
}

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
    History {
        change: Box<crate::store::history::HistoryChange>,
        reply: Reply<u64>,
    },
    /// Writes the pending interaction records (before a read of the
    /// history); answers how many.
    FlushRecords {
        reply: Reply<u64>,
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
    Count(u64),
    Records(Result<u64>),
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

/// Where committed changes are announced.
pub(super) struct Announce {
    pub tasks: broadcast::Sender<TaskEvent>,
    pub workflows: broadcast::Sender<WorkflowEvent>,
}

/// A batch the writer is done with: its ops with their answers (or the
/// batch's error), and the events it committed.
pub(super) struct Completed {
    ops: Vec<Op>,
    /// One answer per op, or the error of the whole batch. An op's own
    /// error comes from the one-at-a-time retry of a failed batch.
    answers: std::result::Result<Vec<std::result::Result<Answer, String>>, String>,
    events: Vec<TaskEvent>,
    workflow_events: Vec<WorkflowEvent>,
}

impl Completed {
    /// Whether the batch committed (and so has something to make durable).
    pub(super) fn committed(&self) -> bool {
        self.answers.is_ok()
    }

    /// A batch of no ops, committed or not, and whether it failed.
    #[cfg(test)]
    pub(super) fn empty(committed: bool) -> Completed {
        Completed {
            ops: Vec::new(),
            answers: if committed {
                Ok(Vec::new())
            } else {
                Err("rolled back".into())
            },
            events: Vec::new(),
            workflow_events: Vec::new(),
        }
    }

    /// The batch's error, if it has one.
    #[cfg(test)]
    pub(super) fn error(&self) -> Option<&str> {
        self.answers.as_ref().err().map(String::as_str)
    }

    /// Its commit could not be synced: every op is answered with that
    /// error instead (the outcome is unknown), and nothing is announced.
    pub(super) fn sync_failed(&mut self, e: &std::io::Error) {
        self.answers = Err(format!(
            "the write was committed but could not be synced to disk ({e}); its outcome is unknown"
        ));
        self.events.clear();
        self.workflow_events.clear();
    }

    /// Answers every op, then announces the events.
    fn complete(self, announce: &Announce) {
        match self.answers {
            Ok(answers) => {
                for (op, answer) in self.ops.into_iter().zip(answers) {
                    deliver(op, answer.map_err(Error::Store));
                }
            }
            Err(msg) => {
                for op in self.ops {
                    deliver(op, Err(Error::Store(msg.clone())));
                }
            }
        }
        for e in self.events {
            let _ = announce.tasks.send(e);
        }
        for e in self.workflow_events {
            let _ = announce.workflows.send(e);
        }
    }
}

/// Answers the writer's batches, in order, from a task of the runtime
/// that opened the store: waking the callers' tasks from inside the
/// runtime is cheap, from the writer's thread each wake-up was a system
/// call that held up the next batch.
pub(super) async fn deliver_completed(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Completed>,
    announce: std::sync::Arc<Announce>,
) {
    while let Some(c) = rx.recv().await {
        c.complete(&announce);
    }
}

/// Hands a finished batch to [`deliver_completed`], or answers it on this
/// thread if that task is gone.
pub(super) fn hand_over(
    done: &tokio::sync::mpsc::UnboundedSender<Completed>,
    announce: &Announce,
    completed: Completed,
) {
    if let Err(unsent) = done.send(completed) {
        unsent.0.complete(announce);
    }
}

/// How the writer makes its commits durable.
pub(super) enum Durable {
    /// SQLite syncs in each commit (`synchronous=FULL`), or nothing is
    /// synced per commit (`fast` durability).
    InCommit,
    /// The writer's connection commits with `synchronous=NORMAL` and the
    /// sync thread syncs the WAL before answering; `db` is the database.
    Beside(super::sync::Syncer, std::path::PathBuf),
}

/// The writer's loop, on its own thread, until the channel closes or a
/// `Close` op arrives (the connection is then closed before `Close` is
/// answered). Answers go to [`deliver_completed`], through the sync thread
/// when there is one; if that task is gone (its runtime shut down), they
/// are answered where they are.
pub(super) fn run(
    conn: Conn,
    mut wal_ahead: Option<super::wal::WalAhead>,
    mut checkpoints: super::checkpoint::Checkpoints,
    mut durable: Durable,
    mut rx: mpsc::Receiver<Op>,
    done: tokio::sync::mpsc::UnboundedSender<Completed>,
    announce: std::sync::Arc<Announce>,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    // Records this writer left pending since it last wrote them.
    let mut pending = 0usize;
    let hand_over = |completed: Completed| hand_over(&done, &announce, completed);
    while let Some(op) = rx.blocking_recv() {
        gather(op, &mut rx, &mut ops);
        let closing = ops.iter().any(|o| matches!(o, Op::Close { .. }));
        let mut batch = Batch::default();
        let started = std::time::Instant::now();
        let pending_before = pending;
        let result = apply_all(&conn, &ops, &mut batch, &mut pending);
        tracing::trace!(
            ops = ops.len(),
            micros = started.elapsed().as_micros() as u64,
            "write batch"
        );
        let answers = match result {
            Ok(answers) => Ok(answers.into_iter().map(Ok).collect()),
            // One op's failure must not fail the others it was batched
            // with: the batch was rolled back, so apply them again one
            // by one, each in its own transaction.
            Err(e) if ops.len() > 1 && !closing && fails_alone(&e) => {
                tracing::warn!(error = %e, ops = ops.len(), "a write batch failed; applying its operations one at a time");
                batch = Batch::default();
                pending = pending_before;
                Ok(apply_each(&conn, &ops, &mut batch, &mut pending))
            }
            Err(e) => {
                tracing::error!(error = %e, ops = ops.len(), "store write failed; the batch was rolled back");
                Err(e.to_string())
            }
        };
        let completed = Completed {
            ops: std::mem::replace(&mut ops, Vec::with_capacity(64)),
            answers,
            events: batch.events,
            workflow_events: batch.workflow_events,
        };
        let committed = completed.answers.is_ok();
        if closing {
            let mut completed = completed;
            if let Durable::Beside(syncer, db) = &mut durable {
                // Earlier batches are answered once synced; this one is
                // synced here, before the connection closes.
                syncer.stop();
                super::sync::sync_here(db, &mut completed);
            }
            checkpoints.stop();
            drop(conn);
            hand_over(completed);
            return;
        }
        match &mut durable {
            Durable::InCommit => hand_over(completed),
            Durable::Beside(syncer, db) => {
                if let Err(mut completed) = syncer.push(completed) {
                    // The sync thread is gone: from now on SQLite syncs in
                    // each commit, and this batch is synced here.
                    tracing::error!(
                        "the WAL sync thread stopped; commits sync in the writer from now on"
                    );
                    if let Err(e) = conn.execute_batch("PRAGMA synchronous = FULL") {
                        tracing::error!(error = %e, "cannot switch the writer to synchronous=FULL");
                    }
                    super::sync::sync_here(db, &mut completed);
                    hand_over(completed);
                    durable = Durable::InCommit;
                }
            }
        }
        if committed {
            checkpoints.after_commit(&conn);
            if let Some(w) = wal_ahead.as_mut() {
                w.after_commit(&conn);
            }
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
        (Op::History { reply, .. }, Ok(Answer::Count(n))) => send(reply, Ok(n)),
        (Op::FlushRecords { reply }, Ok(Answer::Records(r))) => send(reply, r),
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
            Op::History { reply, .. } | Op::FlushRecords { reply } => send(reply, Err(e)),
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

fn apply_all(
    conn: &Conn,
    ops: &[Op],
    batch: &mut Batch,
    pending: &mut usize,
) -> Result<Vec<Answer>> {
    conn.execute_batch("BEGIN IMMEDIATE")?;
    let applied = apply_in(conn, ops, batch, pending).and_then(|answers| {
        conn.execute_batch("COMMIT")?;
        Ok(answers)
    });
    if applied.is_err()
        && !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "rollback of a failed write batch failed");
    }
    applied
}

/// Whether a batch's error can be one operation's fault, so that applying
/// the operations one by one isolates it. Not when the database itself
/// cannot be written (locked, full, read-only, I/O, corrupt): every
/// operation would then wait out the same failure in turn.
fn fails_alone(e: &Error) -> bool {
    const WHOLE_DATABASE: [&str; 10] = [
        "database is locked",
        "database table is locked",
        "disk I/O error",
        "database or disk is full",
        "readonly database",
        "database disk image is malformed",
        "unable to open database",
        "not a database",
        "interrupted",
        "out of memory",
    ];
    let msg = e.to_string();
    !WHOLE_DATABASE.iter().any(|m| msg.contains(m))
}

/// Applies each op in a transaction of its own, after the batch they came
/// in failed: the op that failed it gets its error, the others their
/// answers. The events of the ops that committed are added to `batch`.
fn apply_each(
    conn: &Conn,
    ops: &[Op],
    batch: &mut Batch,
    pending: &mut usize,
) -> Vec<std::result::Result<Answer, String>> {
    ops.iter()
        .map(|op| {
            let mut one = Batch::default();
            let before = *pending;
            match apply_all(conn, std::slice::from_ref(op), &mut one, pending) {
                Ok(mut answers) => {
                    batch.events.append(&mut one.events);
                    batch.workflow_events.append(&mut one.workflow_events);
                    Ok(answers.pop().expect("one answer per op"))
                }
                Err(e) => {
                    *pending = before;
                    tracing::error!(error = %e, "store write failed; the operation was rolled back");
                    Err(e.to_string())
                }
            }
        })
        .collect()
}

/// The body of [`apply_all`]'s transaction.
fn apply_in(
    conn: &Conn,
    ops: &[Op],
    batch: &mut Batch,
    pending: &mut usize,
) -> Result<Vec<Answer>> {
    // All submits of the batch go in together: one multi-row INSERT for
    // many concurrent submitters.
    let subs: Vec<&NewSubmission> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Submit { sub, .. } => Some(sub.as_ref()),
            _ => None,
        })
        .collect();
    let mut submitted = submit_all(conn, &subs, batch)?.into_iter();
    // Events past this one are moves made after the submits answered.
    let after_submits = batch.events.len();
    // Likewise all finishes: one UPDATE for the whole batch.
    let finishes: Vec<&FinishAttempt> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Finish { f, .. } => Some(f.as_ref()),
            _ => None,
        })
        .collect();
    let mut finished = finish_all(conn, &finishes, batch)?.into_iter();
    let mut answers = Vec::with_capacity(ops.len());
    for op in ops {
        let answer = match op {
            Op::Submit { .. } => Answer::Submit(submitted.next().expect("one answer per submit")),
            Op::Claim { req, .. } => Answer::Claim(claim(conn, req, batch)?),
            Op::Finish { .. } => {
                Answer::Finish(finished.next().expect("one outcome per finish"), Vec::new())
            }
            Op::Renew {
                worker_id,
                task_ids,
                now,
                lease_until,
                ..
            } => Answer::Renew(renew(conn, worker_id, task_ids, *now, *lease_until)?),
            Op::Reclaim { scope, now, .. } => Answer::Reclaim(reclaim(conn, scope, *now, batch)?),
            Op::Cancel {
                id, now, reason, ..
            } => Answer::Unit(cancel(conn, id, *now, reason, batch)?),
            Op::CancelWorkflow {
                id, now, reason, ..
            } => Answer::Ids(cancel_workflow(conn, id, *now, reason, batch)?),
            Op::Approve {
                id, decision, now, ..
            } => Answer::Unit(approve(conn, id, decision, *now, batch)?),
            Op::Retry { id, now, .. } => Answer::Unit(retry(conn, id, *now, batch)?),
            Op::Heartbeat {
                task_id,
                worker_id,
                lease_until,
                ..
            } => Answer::Unit(heartbeat(conn, task_id, worker_id, *lease_until)?),
            Op::PutLogs {
                task_id,
                attempt,
                logs,
                ..
            } => {
                put_logs(conn, task_id, *attempt, logs)?;
                Answer::Unit(Ok(()))
            }
            Op::FireSchedule { f, .. } => Answer::Bool(fire_schedule(conn, f, batch)?),
            Op::ChangeSchedule {
                id, change, now, ..
            } => Answer::Bool(change_schedule(conn, id, change, *now, batch)?),
            Op::Token {
                token,
                hash,
                revoke,
                ..
            } => Answer::Bool(Ok(write_token(conn, token, hash, *revoke)?)),
            Op::RegisterWorker { w, .. } => Answer::Unit(register_worker(conn, w).map(|_| Ok(()))?),
            Op::History { change, .. } => Answer::Count(super::history::apply(conn, change)?),
            // Answered below, once the records are written.
            Op::FlushRecords { .. } => Answer::Records(Ok(0)),
            Op::Close { .. } => Answer::Unit(Ok(())),
        };
        answers.push(answer);
    }
    resolve_dependents(conn, batch)?;
    update_workflows(conn, batch)?;
    // The claims that come with finishes, merged into one claim for the
    // slots the batch's finished attempts free; after the dependents are
    // resolved, so a slot can take a task its own finish made ready.
    let mut replacements = claim_for_finishes(conn, ops, batch)?.into_iter();
    for a in &mut answers {
        if let Answer::Finish(_, next) = a {
            *next = replacements.next().expect("one claim answer per finish");
        }
    }
    // A new task may have been moved again within this transaction (its
    // dependency resolved, a claim took it): answer its latest status.
    if !subs.is_empty() && batch.events.len() > after_submits {
        let latest: HashMap<&str, TaskStatus> = batch.events[after_submits..]
            .iter()
            .map(|e| (e.task_id.as_str(), e.status))
            .collect();
        for a in &mut answers {
            if let Answer::Submit(Ok(list)) = a {
                for s in list.iter_mut() {
                    if let Some(st) = latest.get(s.id.as_str()) {
                        s.status = *st;
                    }
                }
            }
        }
    }
    // Every finished attempt is marked for an interaction record in the
    // same transaction, so history never misses one. The records
    // themselves are written in bulk: when enough are pending, when a
    // reader of the history asks (so it never sees one missing), and when
    // the store closes.
    flush_attempts_and_audit(conn, &batch.attempts, &batch.audit)?;
    *pending += batch.attempts.len();
    let asked = ops
        .iter()
        .any(|op| matches!(op, Op::FlushRecords { .. } | Op::Close { .. }));
    if asked || *pending >= super::history::RECORDS_PER_WRITE {
        // A failure here fails the readers that asked, not the batch: the
        // marks stay, and the next 512 or the next reader tries again.
        let written = super::history::write_pending_records(conn).map_err(|e| {
            tracing::error!(error = %e, "writing interaction records failed; they stay pending");
            e.to_string()
        });
        *pending = 0;
        for (op, a) in ops.iter().zip(answers.iter_mut()) {
            if matches!(op, Op::FlushRecords { .. }) {
                *a = Answer::Records(written.clone().map_err(Error::Store));
            }
        }
    }
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
/// nothing.
fn submit_all(
    conn: &Conn,
    subs: &[&NewSubmission],
    batch: &mut Batch,
) -> Result<Vec<Result<Vec<Submitted>>>> {
    if subs.iter().all(|s| crate::store::workflow_key(s).is_none()) {
        return submit_fresh(conn, subs, batch);
    }
    let mut existing: HashMap<String, String> = HashMap::new();
    for key in subs.iter().filter_map(|s| crate::store::workflow_key(s)) {
        if let Some(id) = scalar_opt::<String>(
            conn,
            "SELECT id FROM workflows WHERE idempotency_key = ?1",
            params![key],
        )? {
            existing.insert(key.to_string(), id);
        }
    }
    let mut tasks: HashMap<String, Vec<Submitted>> = HashMap::new();
    for id in existing.values() {
        // id, name, status, schedule_id
        type Row = (String, String, String, Option<String>);
        let rows: Vec<Row> = all(
            conn,
            "SELECT id, name, status, schedule_id FROM tasks WHERE workflow_id = ?1 ORDER BY seq",
            params![id],
        )?;
        let list = rows
            .into_iter()
            .map(|(tid, name, status, schedule_id)| Submitted {
                id: tid,
                name,
                created: false,
                status: status.parse().unwrap_or(TaskStatus::Queued),
                schedule_id,
                workflow_id: Some(id.clone()),
            })
            .collect();
        tasks.insert(id.clone(), list);
    }
    let mut rounds = crate::store::KeyedRounds::new(subs, &existing);
    while let Some(fresh) = rounds.fresh() {
        let answers = submit_fresh(conn, &fresh, batch)?;
        rounds.answer(answers, &tasks);
    }
    Ok(rounds.finish())
}

fn submit_fresh(
    conn: &Conn,
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
        for (i, k) in &keyed {
            // id, name, status, schedule_id, workflow_id
            type Keyed = (String, String, String, Option<String>, Option<String>);
            let row: Option<Keyed> = opt(
                conn,
                "SELECT id, name, status, schedule_id, workflow_id FROM tasks WHERE idempotency_key = ?1",
                params![k],
            )?;
            if let Some((id, name, status, schedule_id, workflow_id)) = row {
                out[*i] = Some(Submitted {
                    id,
                    name,
                    created: false,
                    status: status.parse().unwrap_or(TaskStatus::Queued),
                    schedule_id,
                    workflow_id,
                });
            }
        }
    }
    let mut stored: HashSet<String> = HashSet::new();
    for id in crate::store::outside_deps(subs) {
        let found: Option<String> =
            scalar_opt(conn, "SELECT id FROM tasks WHERE id = ?1", params![id])?;
        stored.extend(found);
    }
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
    let mut known: HashMap<String, (TaskStatus, Option<String>)> = HashMap::new();
    for id in &outside {
        let row: Option<(String, Option<String>)> = opt(
            conn,
            "SELECT status, result FROM tasks WHERE id = ?1",
            params![id],
        )?;
        if let Some((status, result)) = row {
            known.insert(
                id.to_string(),
                (status.parse().unwrap_or(TaskStatus::Failed), result),
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
            task_rows.push((t, s.status, deps.len()));
            for (dep_id, condition) in deps {
                dep_rows.push((
                    dep_id,
                    t.id.as_str(),
                    serde_json::to_string(condition).unwrap_or_else(|_| "\"success\"".into()),
                ));
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
            insert_schedule(conn, sc, batch)?;
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
            exec(
                conn,
                "INSERT INTO workflows (id, name, project, tags, description, status, schedule_id, \
                 tasks_total, created_at, updated_at, finished_at, idempotency_key) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?9, ?6, ?7, ?8, ?8, CASE WHEN ?7 = 0 THEN ?8 END, ?10)",
                params![
                    &w.id,
                    &w.name,
                    &w.project,
                    serde_json::to_string(&w.tags).unwrap_or_else(|_| "[]".into()),
                    &w.description,
                    &w.schedule_id,
                    total,
                    w.now,
                    status.as_str(),
                    &w.idempotency_key
                ],
            )?;
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
        let mut insert = conn.prepare_cached(INSERT_TASK)?;
        for (t, status, deps_pending) in task_rows {
            insert.execute(params![
                t.id,
                t.name,
                t.kind.as_str(),
                t.project,
                serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()),
                status.as_str(),
                t.priority,
                t.max_attempts,
                t.run_at,
                t.now,
                t.idempotency_key,
                t.spec_json,
                t.spec_hash,
                t.workflow_id,
                t.schedule_id,
                deps_pending as i64,
                t.needs_approval
            ])?;
        }
    }
    if !dep_rows.is_empty() {
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO task_deps (dep_id, task_id, condition) VALUES (?1, ?2, ?3)",
        )?;
        for (dep_id, task_id, condition) in dep_rows {
            insert.execute(params![dep_id, task_id, condition])?;
        }
    }
    Ok(answers)
}

fn insert_schedule(conn: &Conn, sc: &NewSchedule, batch: &mut Batch) -> Result<()> {
    exec(
        conn,
        "INSERT INTO schedules (id, name, project, cron, timezone, template, next_fire_at, upcoming_run, \
         created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        params![
            &sc.id,
            &sc.name,
            &sc.project,
            &sc.cron,
            &sc.timezone,
            &sc.template,
            sc.next_fire_at,
            &sc.upcoming_run,
            sc.now
        ],
    )?;
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
fn resolve_dependents(conn: &Conn, batch: &mut Batch) -> Result<()> {
    while !batch.resolve.is_empty() {
        let round = std::mem::take(&mut batch.resolve);
        let mut finished: HashMap<String, (TaskStatus, Option<serde_json::Value>)> =
            HashMap::with_capacity(round.len());
        for (id, st, out) in round {
            finished.insert(id, (st, out));
        }
        let ids: Vec<&String> = finished.keys().collect();
        type DependentRow = (
            String,
            String,
            String,
            String,
            i64,
            i64,
            i64,
            String,
            Option<String>,
            i64,
        );
        let rows: Vec<DependentRow> = all(
            conn,
            "SELECT d.dep_id, d.task_id, d.condition, t.status, t.deps_pending, t.needs_approval, \
             t.run_at, t.name, t.workflow_id, t.attempts \
             FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.dep_id IN (SELECT value FROM json_each(?1)) AND d.state = 'waiting'",
            params![serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into())],
        )?;
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
            let (dep_id, task_id, cond_json) = (row.0.clone(), row.1.clone(), &row.2);
            let condition: Condition =
                serde_json::from_str(cond_json).unwrap_or(Condition::Success);
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
                Dependent {
                    status: row.3.parse().unwrap_or(TaskStatus::Failed),
                    pending: row.4,
                    needs_approval: row.5 != 0,
                    run_at: row.6,
                    name: row.7.clone(),
                    workflow_id: row.8.clone(),
                    attempts: row.9 as u32,
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
                    scalar_opt(conn, "SELECT name FROM tasks WHERE id = ?1", params![dep])?;
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
        exec(
            conn,
            "UPDATE task_deps SET state = v.value ->> 2 FROM json_each(jsonb(?1)) AS v \
             WHERE task_deps.dep_id = v.value ->> 0 AND task_deps.task_id = v.value ->> 1",
            params![serde_json::Value::Array(edges).to_string()],
        )?;
        if !updates.is_empty() {
            exec(
                conn,
                "UPDATE tasks SET status = v.value ->> 1, deps_pending = v.value ->> 2, \
                 finished_at = v.value ->> 3, error = COALESCE(v.value ->> 4, tasks.error), \
                 updated_at = ?2 FROM json_each(jsonb(?1)) AS v WHERE tasks.id = v.value ->> 0",
                params![serde_json::Value::Array(updates).to_string(), now],
            )?;
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
fn update_workflows(conn: &Conn, batch: &mut Batch) -> Result<()> {
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
    let done: Vec<(String, String, String, i64, i64, i64, i64)> = all(
        conn,
        "UPDATE workflows SET tasks_done = tasks_done + (v.value ->> 1), \
         tasks_failed = tasks_failed + (v.value ->> 2), tasks_cancelled = tasks_cancelled + (v.value ->> 3), \
         updated_at = ?2 FROM json_each(jsonb(?1)) AS v WHERE workflows.id = v.value ->> 0 \
         RETURNING workflows.id, workflows.name, workflows.status, workflows.tasks_total, \
         workflows.tasks_done, workflows.tasks_failed, workflows.tasks_cancelled",
        params![serde_json::Value::Array(rows).to_string(), now],
    )?;
    for (id, name, status, total, done, failed, cancelled) in done {
        if status != "running" || done < total {
            continue;
        }
        // Its tasks skipped because a dependency outside it failed or was
        // cancelled (their unmet edges say which).
        let (outside_failed, outside_cancelled): (i64, i64) = conn
            .prepare_cached(
                "SELECT COUNT(DISTINCT CASE WHEN p.status IN ('failed', 'timed_out') THEN t.id END), \
                 COUNT(DISTINCT CASE WHEN p.status = 'cancelled' THEN t.id END) \
                 FROM tasks t JOIN task_deps d ON d.task_id = t.id AND d.state = 'unmet' \
                 JOIN tasks p ON p.id = d.dep_id \
                 WHERE t.workflow_id = ?1 AND t.status = 'skipped' AND p.workflow_id IS NOT ?1",
            )?
            .query_row(params![&id], |r| Ok((r.get(0)?, r.get(1)?)))?;
        let (to, detail) = crate::store::finished_workflow(
            total,
            (failed, cancelled),
            (outside_failed, outside_cancelled),
        );
        exec(
            conn,
            "UPDATE workflows SET status = ?1, finished_at = ?2 WHERE id = ?3",
            params![to.as_str(), now, &id],
        )?;
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

/// The claim query. `?1` = now, `?2` = limit; the filter's values follow
/// from `?3` in the order [`claim_binds`] gives them. (sqlx numbers
/// anonymous `?` on its own, so never mix them with `?N`.)
pub(super) fn claim_sql(req: &ClaimRequest) -> String {
    let mut n = 3;
    let mut next = || {
        let p = format!("?{n}");
        n += 1;
        p
    };
    let external = req.external.as_ref().map(|f| {
        let mut c = "kind = 'external'".to_string();
        if !f.names.is_empty() {
            // `prefix*` names are prefix patterns (task names cannot hold GLOB syntax).
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
                alts.push(format!("name GLOB {}", next()));
            }
            c.push_str(&format!(" AND ({})", alts.join(" OR ")));
        }
        if f.project.is_some() {
            c.push_str(&format!(" AND project = {}", next()));
        }
        for _ in &f.tags {
            c.push_str(&format!(
                " AND EXISTS (SELECT 1 FROM json_each(tasks.tags) WHERE json_each.value = {})",
                next()
            ));
        }
        c
    });
    let kind_filter = match (req.server_kinds, external) {
        (true, None) => "AND kind IN ('command', 'http')".to_string(),
        (true, Some(e)) => format!("AND (kind IN ('command', 'http') OR ({e}))"),
        (false, Some(e)) => format!("AND {e}"),
        (false, None) => "AND 0".to_string(),
    };
    // Only these tasks (a JSON array of ids), for an engine with a scope:
    // they are looked up by id, so a backlog of other ready tasks ahead of
    // them in the claim order is never walked.
    let (index, only) = match &req.only {
        Some(_) => (
            // The unique index on `id` (named by SQLite).
            " INDEXED BY sqlite_autoindex_tasks_1",
            format!(" AND id IN (SELECT value FROM json_each({}))", next()),
        ),
        None => (" INDEXED BY tasks_ready", String::new()),
    };
    format!(
        "SELECT seq, id, name, kind, priority, status, attempts, max_attempts, spec, spec_hash, workflow_id \
         FROM tasks{index} \
         WHERE status IN ('queued', 'retrying') AND run_at <= ?1 {kind_filter}{only} \
         ORDER BY priority DESC, seq LIMIT ?2"
    )
}

/// The values bound after `?1`/`?2` in [`claim_sql`], in order.
pub(super) fn claim_binds(req: &ClaimRequest) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(f) = &req.external {
        v.extend(f.names.iter().filter(|n| !n.ends_with('*')).cloned());
        v.extend(f.names.iter().filter(|n| n.ends_with('*')).cloned());
        v.extend(f.project.iter().cloned());
        v.extend(f.tags.iter().cloned());
    }
    if let Some(ids) = &req.only {
        v.push(serde_json::to_string(ids.as_ref()).unwrap_or_else(|_| "[]".into()));
    }
    v
}

/// Moves pending tasks whose time came (and whose dependencies are met)
/// on; `?1` = now. Each row it returns goes to [`promoted`].
const PROMOTE_TIMERS: &str = "UPDATE tasks SET status = CASE WHEN needs_approval THEN 'awaiting_approval' \
     ELSE 'queued' END, updated_at = ?1 WHERE status = 'pending' AND deps_pending = 0 AND run_at <= ?1 \
     RETURNING id, name, status, workflow_id";

/// Whether [`PROMOTE_TIMERS`] has a row to move; `?1` = now.
const TIMERS_DUE: &str = "SELECT EXISTS (SELECT 1 FROM tasks INDEXED BY tasks_timer \
     WHERE status = 'pending' AND deps_pending = 0 AND run_at <= ?1)";

/// Records a row of [`PROMOTE_TIMERS`]: (id, name, status, workflow_id).
fn promoted(row: (String, String, String, Option<String>), now: i64, batch: &mut Batch) {
    let (id, name, status, wf) = row;
    batch.transition(
        now,
        &id,
        &name,
        wf.as_deref(),
        "ready",
        Some(TaskStatus::Pending),
        status.parse().unwrap_or(TaskStatus::Queued),
        0,
        "{\"reason\":\"its time came\"}".to_string(),
    );
}

fn claim(conn: &Conn, req: &ClaimRequest, batch: &mut Batch) -> Result<Vec<ClaimedTask>> {
    // Pending tasks whose time came move on first, so they can be claimed.
    // The UPDATE (with RETURNING, so with a result table and a statement
    // journal) runs only when the timer index says one is due.
    if scalar_one::<bool>(conn, TIMERS_DUE, params![req.now])? {
        for row in all(conn, PROMOTE_TIMERS, params![req.now])? {
            promoted(row, req.now, batch);
        }
    }
    // Then the claim query (deterministic: `ORDER BY priority DESC, seq`,
    // in one transaction of the single writer), and each row it chose is
    // marked running.
    let mut values: Vec<SqlValue> = vec![req.now.into(), (req.limit as i64).into()];
    values.extend(claim_binds(req).into_iter().map(SqlValue::from));
    let mut select = conn.prepare_cached(&claim_sql(req))?;
    let rows = select
        .query_map(params_from_iter(values), |r| {
            Ok(ClaimRow {
                seq: r.get(0)?,
                id: r.get(1)?,
                name: r.get(2)?,
                kind: r.get(3)?,
                priority: r.get(4)?,
                status: r.get(5)?,
                attempts: r.get(6)?,
                max_attempts: r.get(7)?,
                spec: r.get(8)?,
                spec_hash: r.get(9)?,
                workflow_id: r.get(10)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<ClaimRow>>>()?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut mark = conn.prepare_cached(
        "UPDATE tasks SET status = 'running', attempts = attempts + 1, lease_owner = ?2, \
         lease_expires_at = ?3, started_at = ?4, updated_at = ?4, run_at = ?4 WHERE seq = ?1",
    )?;
    let mut claimed = Vec::with_capacity(rows.len());
    for r in rows {
        mark.execute(params![r.seq, req.worker_id, req.lease_until, req.now])?;
        let from = if r.status == "retrying" {
            TaskStatus::Retrying
        } else {
            TaskStatus::Queued
        };
        let c = ClaimedTask {
            seq: r.seq,
            id: r.id,
            name: r.name,
            kind: match r.kind.as_str() {
                "external" => TaskKind::External,
                "http" => TaskKind::Http,
                _ => TaskKind::Command,
            },
            priority: r.priority,
            attempt: r.attempts as u32 + 1,
            max_attempts: r.max_attempts as u32,
            spec_json: r.spec,
            spec_hash: r.spec_hash,
            started_at: req.now,
            workflow_id: r.workflow_id,
        };
        batch.transition(
            req.now,
            &c.id,
            &c.name,
            c.workflow_id.as_deref(),
            "claimed",
            Some(from),
            TaskStatus::Running,
            c.attempt,
            format!(
                "{{\"attempt\":{},\"worker\":{}}}",
                c.attempt,
                json_str(&req.worker_id)
            ),
        );
        claimed.push(c);
    }
    Ok(claimed)
}

/// A row of the claim query.
struct ClaimRow {
    seq: i64,
    id: String,
    name: String,
    kind: String,
    priority: i64,
    status: String,
    attempts: i64,
    max_attempts: i64,
    spec: String,
    spec_hash: String,
    workflow_id: Option<String>,
}

/// Answers the claims that come with the batch's finishes (one list per
/// finish, in op order). Requests from the same worker with the same
/// filter are merged into one claim for all of their slots; the claimed
/// tasks are then dealt out in claim order.
fn claim_for_finishes(conn: &Conn, ops: &[Op], batch: &mut Batch) -> Result<Vec<Vec<ClaimedTask>>> {
    let requests: Vec<Option<&ClaimRequest>> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Finish { next, .. } => Some(next.as_deref()),
            _ => None,
        })
        .collect();
    let mut out: Vec<Vec<ClaimedTask>> = requests.iter().map(|_| Vec::new()).collect();
    for (req, members) in crate::store::merge_claims(&requests) {
        let claimed = claim(conn, &req, batch)?;
        crate::store::deal_claims(claimed, &members, &requests, &mut out);
    }
    Ok(out)
}

/// Applies every finish of the batch, each with a fenced UPDATE: a finish
/// counts only if the task is still `running` under the same worker and
/// attempt. Every attempt is recorded either way.
fn finish_all(
    conn: &Conn,
    finishes: &[&FinishAttempt],
    batch: &mut Batch,
) -> Result<Vec<FinishOutcome>> {
    if finishes.is_empty() {
        return Ok(Vec::new());
    }
    // The fence is a SELECT and the change an UPDATE by rowid: an UPDATE
    // with RETURNING is run by SQLite as a trigger, which gives every
    // execution an ephemeral result table and a statement journal (a copy
    // of each page it touches); by rowid it is a one-row, one-pass write.
    let mut fence = conn.prepare_cached(
        "SELECT seq, name, workflow_id, \
         EXISTS (SELECT 1 FROM task_deps WHERE dep_id = ?1 AND state = 'waiting') \
         FROM tasks WHERE id = ?1 AND +status = 'running' AND lease_owner = ?2 AND attempts = ?3",
    )?;
    let mut update = conn.prepare_cached(
        "UPDATE tasks SET status = ?2, run_at = COALESCE(?3, run_at), finished_at = ?4, updated_at = ?5, \
         lease_owner = NULL, lease_expires_at = NULL, result = ?6, error = ?7 WHERE seq = ?1",
    )?;
    let mut out = Vec::with_capacity(finishes.len());
    for f in finishes {
        let result_json =
            serde_json::to_string(&f.result).map_err(|e| Error::Store(e.to_string()))?;
        let (status, run_at, finished_at) = match f.next {
            Next::Done(s) => (s, None, Some(f.now)),
            Next::Retry { run_at } => (TaskStatus::Retrying, Some(run_at), None),
        };
        for log in &f.logs {
            if log.data.is_empty() && log.dropped_bytes == 0 {
                continue;
            }
            exec(
                conn,
                "INSERT OR REPLACE INTO task_logs (task_id, attempt, stream, data, dropped_bytes) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    f.task_id,
                    f.attempt,
                    log.stream,
                    log.data,
                    log.dropped_bytes as i64
                ],
            )?;
        }
        let fenced: Option<(i64, String, Option<String>, bool)> = fence
            .query_row(params![f.task_id, f.worker_id, f.attempt], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .optional()?;
        if let Some((seq, ..)) = &fenced {
            update.execute(params![
                seq,
                status.as_str(),
                run_at,
                finished_at,
                f.now,
                result_json,
                f.error
            ])?;
        }
        batch.attempts.push(AttemptRow::finished(f, result_json));
        let Some((_, name, wf, has_dependents)) = fenced else {
            let current: Option<String> = scalar_opt(
                conn,
                "SELECT status FROM tasks WHERE id = ?1",
                params![f.task_id],
            )?;
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
            &name,
            wf.as_deref(),
            "finished",
            Some(TaskStatus::Running),
            status,
            f.attempt,
            detail.to_string(),
        );
        if status.is_terminal() {
            // Only a task with dependents waiting has them resolved (the
            // single writer sees every edge: nothing adds one meanwhile).
            if has_dependents {
                batch.terminal(&f.task_id, status, f.result.output.clone(), wf);
            } else {
                batch.terminal.push(Terminal {
                    id: f.task_id.clone(),
                    status,
                    workflow_id: wf,
                });
            }
        }
        out.push(FinishOutcome::Applied(status));
    }
    Ok(out)
}

fn renew(
    conn: &Conn,
    worker_id: &str,
    task_ids: &[String],
    now: i64,
    lease_until: i64,
) -> Result<Vec<String>> {
    let ids: Vec<String> = scalars(
        conn,
        "UPDATE tasks SET lease_expires_at = ?1 WHERE id IN (SELECT value FROM json_each(?3)) \
         AND lease_owner = ?2 AND status = 'running' RETURNING id",
        params![
            lease_until,
            worker_id,
            serde_json::to_string(task_ids).unwrap_or_else(|_| "[]".into())
        ],
    )?;
    exec(
        conn,
        "UPDATE workers SET last_seen = ? WHERE id = ?",
        params![now, worker_id],
    )?;
    Ok(ids)
}

fn reclaim(conn: &Conn, scope: &Reclaim, now: i64, batch: &mut Batch) -> Result<Vec<TaskEvent>> {
    let base = "SELECT id, name, attempts, max_attempts, spec, lease_owner, started_at, workflow_id FROM tasks WHERE status = 'running'";
    type LeaseRow = (
        String,
        String,
        i64,
        i64,
        String,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let rows: Vec<LeaseRow> = match scope {
        Reclaim::Expired => all(
            conn,
            &format!("{base} AND lease_expires_at < ?1"),
            params![now],
        )?,
        Reclaim::Workers(ids) if ids.is_empty() => Vec::new(),
        Reclaim::Workers(ids) => all(
            conn,
            &format!("{base} AND lease_owner IN ({})", placeholders(ids.len())),
            params_from_iter(ids.iter()),
        )?,
    };
    let first = batch.events.len();
    for (id, name, attempts, max_attempts, spec, owner, started_at, wf) in rows {
        let attempts = attempts as u32;
        let max_attempts = max_attempts as u32;
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
        exec(
            conn,
            "UPDATE tasks SET status = ?1, run_at = COALESCE(?2, run_at), finished_at = ?3, updated_at = ?4, \
             lease_owner = NULL, lease_expires_at = NULL, error = ?5 WHERE id = ?6",
            params![status.as_str(), run_at, finished_at, now, &error, &id],
        )?;
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

fn cancel(
    conn: &Conn,
    id: &str,
    now: i64,
    reason: &Option<String>,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row: Option<(String, String, i64, Option<String>)> = opt(
        conn,
        "SELECT status, name, attempts, workflow_id FROM tasks WHERE id = ?1",
        params![id],
    )?;
    let Some((status, name, attempts, wf)) = row else {
        return Ok(Err(Error::task_not_found(id)));
    };
    let status: TaskStatus = status.parse().unwrap_or(TaskStatus::Failed);
    let attempts = attempts as u32;
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
    exec(
        conn,
        "UPDATE tasks SET status = 'cancelled', finished_at = ?1, updated_at = ?1, lease_owner = NULL, \
         lease_expires_at = NULL, error = ?2 WHERE id = ?3",
        params![now, &error, id],
    )?;
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

fn cancel_workflow(
    conn: &Conn,
    id: &str,
    now: i64,
    reason: &Option<String>,
    batch: &mut Batch,
) -> Result<Result<Vec<String>>> {
    let row: Option<(String, String)> = opt(
        conn,
        "SELECT status, name FROM workflows WHERE id = ?1",
        params![id],
    )?;
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
    let rows: Vec<(String, String, String, i64)> = all(
        conn,
        "SELECT id, name, status, attempts FROM tasks WHERE workflow_id = ?1 \
         AND status IN ('pending', 'queued', 'running', 'awaiting_approval', 'retrying') ORDER BY seq",
        params![id],
    )?;
    exec(
        conn,
        "UPDATE tasks SET status = 'cancelled', finished_at = ?1, updated_at = ?1, lease_owner = NULL, \
         lease_expires_at = NULL, error = ?2 WHERE workflow_id = ?3 \
         AND status IN ('pending', 'queued', 'running', 'awaiting_approval', 'retrying')",
        params![now, &error, id],
    )?;
    exec(
        conn,
        "UPDATE workflows SET status = 'cancelled', finished_at = ?1, updated_at = ?1 WHERE id = ?2",
        params![now, id],
    )?;
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

fn approve(
    conn: &Conn,
    id: &str,
    d: &ApprovalDecision,
    now: i64,
    batch: &mut Batch,
) -> Result<Result<()>> {
    let row: Option<(String, String, i64, Option<String>)> = opt(
        conn,
        "SELECT status, name, attempts, workflow_id FROM tasks WHERE id = ?1",
        params![id],
    )?;
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
    exec(
        conn,
        "UPDATE tasks SET status = ?1, approval = ?2, error = ?3, finished_at = ?4, updated_at = ?5, \
         run_at = ?5 WHERE id = ?6",
        params![to.as_str(), &approval_json, &error, finished_at, now, id],
    )?;
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
/// allowance of attempts (its history stays), or to `pending` while its
/// dependencies or its time hold it back, and every task skipped because
/// of it goes back to `pending` to be decided again. Workflows involved
/// are running again.
fn retry(conn: &Conn, id: &str, now: i64, batch: &mut Batch) -> Result<Result<()>> {
    let row: Option<(String, String, i64, Option<String>, String)> = opt(
        conn,
        "SELECT status, name, attempts, workflow_id, spec FROM tasks WHERE id = ?1",
        params![id],
    )?;
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
    if let Some(w) = &wf
        && scalar_opt::<String>(
            conn,
            "SELECT status FROM workflows WHERE id = ?1",
            params![w],
        )?
        .as_deref()
            == Some("cancelled")
    {
        return Ok(Err(crate::store::retry_in_cancelled_workflow(id, w)));
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
    exec(
        conn,
        "UPDATE task_deps SET state = 'waiting' WHERE task_id = ?1 AND state != 'met'",
        params![id],
    )?;
    let row: Option<(i64, i64, bool)> = opt(
        conn,
        "UPDATE tasks SET max_attempts = ?1, finished_at = NULL, error = NULL, \
         run_at = MAX(run_at, ?2), updated_at = ?2, \
         approval = CASE WHEN needs_approval THEN NULL ELSE approval END, \
         deps_pending = (SELECT COUNT(*) FROM task_deps WHERE task_id = ?3 AND state = 'waiting') \
         WHERE id = ?3 RETURNING deps_pending, run_at, needs_approval",
        params![attempts + allowance, now, id],
    )?;
    let (waiting, run_at, needs_approval) =
        row.ok_or_else(|| Error::Store(format!("task {id} vanished during its retry")))?;
    let to = if waiting > 0 {
        TaskStatus::Pending
    } else {
        ready_status(needs_approval, run_at, now)
    };
    exec(
        conn,
        "UPDATE tasks SET status = ?1 WHERE id = ?2",
        params![to.as_str(), id],
    )?;
    queue_finished_deps(conn, id, batch)?;
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
        let skipped: Vec<(String, String, Option<String>, i64)> = all(
            conn,
            "SELECT t.id, t.name, t.workflow_id, t.attempts FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.dep_id = ?1 AND t.status = 'skipped'",
            params![&dep],
        )?;
        for (tid, tname, twf, tattempts) in skipped {
            exec(
                conn,
                "UPDATE task_deps SET state = 'waiting' WHERE task_id = ?1 AND state != 'met'",
                params![&tid],
            )?;
            exec(
                conn,
                "UPDATE tasks SET status = 'pending', finished_at = NULL, error = NULL, updated_at = ?2, \
                 deps_pending = (SELECT COUNT(*) FROM task_deps WHERE task_id = ?1 AND state = 'waiting') \
                 WHERE id = ?1",
                params![&tid, now],
            )?;
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
            queue_finished_deps(conn, &tid, batch)?;
            reopened.push((twf, TaskStatus::Skipped));
            frontier.push(tid);
        }
    }
    // Workflow counters give the reopened tasks back.
    for (w, was) in reopened {
        let Some(w) = w else { continue };
        let failed = i64::from(matches!(was, TaskStatus::Failed | TaskStatus::TimedOut));
        let cancelled = i64::from(was == TaskStatus::Cancelled);
        let prev: Option<(String, String)> = opt(
            conn,
            "UPDATE workflows SET tasks_done = tasks_done - 1, tasks_failed = tasks_failed - ?2, \
             tasks_cancelled = tasks_cancelled - ?3, updated_at = ?4 WHERE id = ?1 \
             RETURNING status, name",
            params![&w, failed, cancelled, now],
        )?;
        if let Some((wstatus, wname)) = prev
            && wstatus != "running"
        {
            exec(
                conn,
                "UPDATE workflows SET status = 'running', finished_at = NULL WHERE id = ?1",
                params![&w],
            )?;
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

/// Queues the finished dependencies of `task` whose edges wait, so that
/// [`resolve_dependents`] decides those edges in this transaction.
fn queue_finished_deps(conn: &Conn, task: &str, batch: &mut Batch) -> Result<()> {
    let finished: Vec<(String, String, Option<String>)> = all(
        conn,
        "SELECT t.id, t.status, t.result FROM task_deps d JOIN tasks t ON t.id = d.dep_id \
         WHERE d.task_id = ?1 AND d.state = 'waiting' \
         AND t.status IN ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')",
        params![task],
    )?;
    for (id, status, result) in finished {
        batch
            .resolve
            .push(crate::store::finished_dep(id, &status, result.as_deref()));
    }
    Ok(())
}

fn heartbeat(conn: &Conn, task_id: &str, worker_id: &str, lease_until: i64) -> Result<Result<()>> {
    let done = exec(
        conn,
        "UPDATE tasks SET lease_expires_at = ?1 WHERE id = ?2 AND status = 'running' AND lease_owner = ?3",
        params![lease_until, task_id, worker_id],
    )?;
    if done == 1 {
        return Ok(Ok(()));
    }
    let row: Option<(String, Option<String>)> = opt(
        conn,
        "SELECT status, lease_owner FROM tasks WHERE id = ?1",
        params![task_id],
    )?;
    Ok(Err(match row {
        None => Error::task_not_found(task_id),
        Some((status, owner)) => Error::Conflict(format!(
            "worker {worker_id} does not hold task {task_id} (it is {status}{}); its lease expired or the task was cancelled — stop working on it",
            owner.map(|o| format!(", held by {o}")).unwrap_or_default()
        )),
    }))
}

fn put_logs(conn: &Conn, task_id: &str, attempt: u32, logs: &[StreamLog]) -> Result<()> {
    for log in logs {
        exec(
            conn,
            "INSERT OR REPLACE INTO task_logs (task_id, attempt, stream, data, dropped_bytes) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                task_id,
                attempt as i64,
                log.stream,
                &log.data,
                log.dropped_bytes as i64
            ],
        )?;
    }
    Ok(())
}

fn fire_schedule(conn: &Conn, f: &FireSchedule, batch: &mut Batch) -> Result<Result<bool>> {
    let row: Option<(Option<i64>, i64, String)> = opt(
        conn,
        "SELECT next_fire_at, paused, name FROM schedules WHERE id = ?1",
        params![&f.schedule_id],
    )?;
    let Some((next, paused, name)) = row else {
        return Ok(Ok(false));
    };
    if paused != 0 || next != Some(f.expected) {
        return Ok(Ok(false));
    }
    let answers = submit_all(conn, &[&f.run], batch)?;
    if let Some(Err(e)) = answers.into_iter().next() {
        return Ok(Err(e));
    }
    exec(
        conn,
        "UPDATE schedules SET next_fire_at = ?1, upcoming_run = ?2, last_fired_at = ?3, runs = runs + 1, \
         updated_at = ?4 WHERE id = ?5",
        params![
            f.next_fire_at,
            &f.upcoming_run,
            f.expected,
            f.now,
            &f.schedule_id
        ],
    )?;
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

fn change_schedule(
    conn: &Conn,
    id: &str,
    change: &ScheduleChange,
    now: i64,
    batch: &mut Batch,
) -> Result<Result<bool>> {
    let row: Option<(i64, Option<String>)> = opt(
        conn,
        "SELECT paused, upcoming_run FROM schedules WHERE id = ?1",
        params![id],
    )?;
    let Some((paused, upcoming)) = row else {
        return Ok(Ok(false));
    };
    let was = if paused != 0 { "paused" } else { "active" };
    match change {
        ScheduleChange::Pause | ScheduleChange::Remove => {
            if let Some(run) = upcoming {
                cancel_upcoming(conn, &run, now, batch)?;
            }
            let (kind, to) = if matches!(change, ScheduleChange::Remove) {
                exec(conn, "DELETE FROM schedules WHERE id = ?1", params![id])?;
                ("schedule_removed", "removed")
            } else {
                exec(
                    conn,
                    "UPDATE schedules SET paused = 1, next_fire_at = NULL, upcoming_run = NULL, updated_at = ?1 WHERE id = ?2",
                    params![now, id],
                )?;
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
            let answers = submit_all(conn, &[run.as_ref()], batch)?;
            if let Some(Err(e)) = answers.into_iter().next() {
                return Ok(Err(e));
            }
            exec(
                conn,
                "UPDATE schedules SET paused = 0, next_fire_at = ?1, upcoming_run = ?2, updated_at = ?3 WHERE id = ?4",
                params![next_fire_at, upcoming_run, now, id],
            )?;
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
fn cancel_upcoming(conn: &Conn, run: &str, now: i64, batch: &mut Batch) -> Result<()> {
    let started: i64 = scalar_one(
        conn,
        "SELECT (SELECT COUNT(*) FROM tasks WHERE workflow_id = ?1 AND status != 'pending') + \
         (SELECT COUNT(*) FROM tasks WHERE id = ?1 AND status != 'pending')",
        params![run],
    )?;
    if started > 0 {
        return Ok(());
    }
    let reason = Some("the schedule was paused or removed before this run started".to_string());
    let is_workflow: Option<String> =
        scalar_opt(conn, "SELECT id FROM workflows WHERE id = ?1", params![run])?;
    if is_workflow.is_some() {
        let _ = cancel_workflow(conn, run, now, &reason, batch)?;
    } else {
        let _ = cancel(conn, run, now, &reason, batch)?;
    }
    // A run that never started does not hold its slot's idempotency keys:
    // resumed in the same slot, the schedule builds that run again.
    exec(
        conn,
        "UPDATE tasks SET idempotency_key = NULL \
         WHERE (workflow_id = ?1 OR id = ?1) AND idempotency_key IS NOT NULL",
        params![run],
    )?;
    Ok(())
}

fn write_token(conn: &Conn, t: &TokenRecord, hash: &str, revoke: Option<i64>) -> Result<bool> {
    if let Some(at) = revoke {
        let n = exec(
            conn,
            "UPDATE api_tokens SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
            params![at, &t.id],
        )?;
        return Ok(n == 1);
    }
    exec(
        conn,
        "INSERT INTO api_tokens (id, name, role, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![&t.id, &t.name, t.role.as_str(), hash, t.created_at.0],
    )?;
    Ok(true)
}

fn register_worker(conn: &Conn, w: &WorkerInfo) -> Result<()> {
    exec(
        conn,
        "INSERT OR REPLACE INTO workers (id, host, pid, pid_start, started_at, last_seen) VALUES (?,?,?,?,?,?)",
        params![
            &w.id,
            &w.host,
            w.pid,
            w.pid_start,
            w.started_at,
            w.started_at
        ],
    )?;
    // Forget workers that hold nothing and have not been seen for a day.
    exec(
        conn,
        "DELETE FROM workers WHERE last_seen < ?1 AND id NOT IN \
         (SELECT lease_owner FROM tasks WHERE status = 'running' AND lease_owner IS NOT NULL)",
        params![w.started_at - 86_400_000],
    )?;
    Ok(())
}

/// Inserts the attempt rows with their interaction records, then appends
/// the audit events to the chain. Inside `BEGIN IMMEDIATE` no other
/// process can append, so the head read here is the head the new events
/// chain onto.
fn flush_attempts_and_audit(conn: &Conn, rows: &[AttemptRow], drafts: &[AuditDraft]) -> Result<()> {
    if !rows.is_empty() {
        let mut insert = conn.prepare_cached(
            "INSERT OR IGNORE INTO attempts (task_id, attempt, worker_id, status, started_at, finished_at, \
             exit_code, signal, duration_ms, error, result) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?;
        for r in rows {
            insert.execute(params![
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
            ])?;
        }
        // The task's status as of this transaction goes with the mark.
        // One row of VALUES, not INSERT ... SELECT: SQLite gives a
        // statement that may write many rows a statement journal.
        let mut mark = conn.prepare_cached(
            "INSERT INTO records_pending (task_id, attempt, task_status) \
             VALUES (?1, ?2, coalesce((SELECT status FROM tasks WHERE id = ?1), ?3))",
        )?;
        for r in rows {
            mark.execute(params![r.task_id, r.attempt, r.status.as_str()])?;
        }
    }
    if drafts.is_empty() {
        return Ok(());
    }
    let head: Option<(i64, String)> = opt(
        conn,
        "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
        [],
    )?;
    let (mut seq, mut prev) = head.unwrap_or((0, GENESIS_HASH.to_string()));
    let mut insert = conn.prepare_cached(INSERT_AUDIT)?;
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
        insert.execute(params![
            seq, d.at, d.task_id, d.kind, d.from, d.to, d.detail, prev, hash
        ])?;
        prev = hash;
    }
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

fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(tasks: usize) -> (Op, oneshot::Receiver<Result<Vec<Submitted>>>) {
        let task = |i: usize| NewTask {
            id: format!("t{i}"),
            name: "t".into(),
            kind: TaskKind::Command,
            project: None,
            tags: Vec::new(),
            priority: 0,
            max_attempts: 1,
            idempotency_key: None,
            spec_json: "{}".into(),
            spec_hash: String::new(),
            now: 0,
            workflow_id: None,
            schedule_id: None,
            deps: Vec::new(),
            run_at: 0,
            needs_approval: false,
        };
        let (reply, rx) = oneshot::channel();
        let sub = NewSubmission {
            workflow: None,
            schedules: Vec::new(),
            tasks: (0..tasks).map(task).collect(),
        };
        (
            Op::Submit {
                sub: Box::new(sub),
                reply,
            },
            rx,
        )
    }

    fn heartbeat() -> Op {
        Op::Heartbeat {
            task_id: "t".into(),
            worker_id: "w".into(),
            lease_until: 0,
            reply: oneshot::channel().0,
        }
    }

    /// Large submits are split over batches by their rows; small
    /// operations still go together, up to the count limit.
    #[test]
    fn a_batch_stops_at_its_row_limit() {
        let (tx, mut rx) = mpsc::channel(4 * MAX_BATCH);
        let mut answers = Vec::new();
        for _ in 0..10 {
            let (op, answer) = submit(1000);
            answers.push(answer);
            tx.try_send(op).ok().unwrap();
        }
        let mut sizes = Vec::new();
        while let Ok(first) = rx.try_recv() {
            let mut ops = Vec::new();
            gather(first, &mut rx, &mut ops);
            sizes.push(ops.iter().map(Op::rows).sum::<usize>());
        }
        // The fifth submit is taken at 4,000 rows, short of the limit.
        assert_eq!(sizes, [5000, 5000]);

        for _ in 0..MAX_BATCH + 10 {
            tx.try_send(heartbeat()).ok().unwrap();
        }
        let mut counts = Vec::new();
        while let Ok(first) = rx.try_recv() {
            let mut ops = Vec::new();
            gather(first, &mut rx, &mut ops);
            counts.push(ops.len());
        }
        assert_eq!(counts, [MAX_BATCH, 10]);

        // A submit larger than the limit is one batch of its own.
        let (big, _answer) = submit(MAX_BATCH_ROWS + 1);
        tx.try_send(big).ok().unwrap();
        tx.try_send(heartbeat()).ok().unwrap();
        let first = rx.try_recv().unwrap();
        let mut ops = Vec::new();
        gather(first, &mut rx, &mut ops);
        assert_eq!(ops.len(), 1);
    }
}
