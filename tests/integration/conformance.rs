//! The store contract, checked the same way on every backend: each check
//! runs on SQLite, and on PostgreSQL (a fresh schema per test) when
//! `TASK_QUEUE_TEST_PG_URL` is set. Checks that open two stores on one
//! database stand for two nodes (two processes on one SQLite file).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use task_queue::Config;
use task_queue::config::Durability;
use task_queue::error::Error;
use task_queue::model::{AttemptStatus, Condition, TaskKind, TaskResult, TaskStatus, Timestamp};
use task_queue::search::recommend::RecommendRequest;
use task_queue::search::{Search, SearchRequest};
use task_queue::store::history::{HistoryChange, HistoryFilter};
use task_queue::store::postgres::PgStore;
use task_queue::store::sqlite::SqliteStore;
use task_queue::store::{
    ApprovalDecision, ClaimRequest, FinishAttempt, FinishOutcome, FireSchedule, NewDep,
    NewSchedule, NewSubmission, NewTask, NewWorkflow, Next, Reclaim, Role, Store, StreamLog,
    TaskFilter, TokenRecord,
};

/// The environment variable naming the PostgreSQL server for tests.
pub const PG_URL_VAR: &str = "TASK_QUEUE_TEST_PG_URL";

/// A small pool on the test server. Fails within seconds, naming the
/// URL, when the variable is set but nothing answers there (sqlx's own
/// default would keep every test retrying for half a minute).
pub async fn connect_test_server(url: &str) -> sqlx::PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .unwrap_or_else(|e| panic!("{PG_URL_VAR} is {url}, but that server cannot be reached: {e}"))
}

/// Where a check's stores live.
pub enum Backend {
    Sqlite(tempfile::TempDir),
    Postgres { url: String, schema: String },
}

impl Backend {
    pub fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().unwrap())
    }

    /// A fresh schema in the test database, or `None` (with a visible
    /// note) when no PostgreSQL server is configured.
    pub async fn postgres(test: &str) -> Option<Backend> {
        let Ok(base) = std::env::var(PG_URL_VAR) else {
            eprintln!("SKIPPED {test} on postgres: {PG_URL_VAR} is not set (see .ci/postgres.sh)");
            return None;
        };
        let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
        let pool = connect_test_server(&base).await;
        // pg_trgm once per database, in `public`: an extension created by a
        // migration inside a test schema would go when that schema is dropped.
        // Tests race to create it; whichever loses finds it there.
        let _ = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_trgm SCHEMA public")
            .execute(&pool)
            .await;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
        Some(Backend::Postgres { url, schema })
    }

    /// The URL a `task-queue` process uses for this backend.
    pub fn url(&self) -> String {
        match self {
            Backend::Sqlite(dir) => dir.path().join("q.db").display().to_string(),
            Backend::Postgres { url, .. } => url.clone(),
        }
    }

    /// Opens a store (another node, when called again).
    pub async fn open(&self) -> Arc<dyn Store> {
        match self {
            Backend::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join("q.db"), Durability::Durable, 4)
                    .await
                    .unwrap(),
            ),
            Backend::Postgres { url, .. } => Arc::new(PgStore::open(url, 4).await.unwrap()),
        }
    }

    /// Drops a PostgreSQL test schema (best effort).
    pub async fn cleanup(self) {
        if let Backend::Postgres { schema, .. } = self
            && let Ok(base) = std::env::var(PG_URL_VAR)
            && let Ok(pool) = sqlx::postgres::PgPoolOptions::new()
                .acquire_timeout(std::time::Duration::from_secs(5))
                .connect(&base)
                .await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&pool)
                .await;
            pool.close().await;
        }
    }
}

/// One check, run on SQLite and on PostgreSQL.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let b = super::Backend::sqlite();
                    super::$name(&b).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some(b) = super::Backend::postgres(stringify!($name)).await else {
                        return;
                    };
                    super::$name(&b).await;
                    b.cleanup().await;
                }
            )*
        }
    };
}

conformance!(
    submit_claim_finish_in_priority_order,
    dependencies_resolve_and_skips_cascade,
    workflow_counters_finish_the_workflow,
    idempotency_keys_return_the_first_task,
    a_workflow_submitted_again_is_the_first_one,
    a_workflow_key_names_the_first_workflow,
    a_refused_keyed_submission_does_not_fail_another_with_its_key,
    approvals_cancels_and_retries,
    leases_renew_expire_and_fence_stale_finishes,
    schedules_fire_once_per_slot,
    tokens_are_stored_by_hash,
    reads_filter_and_stream_events,
    two_nodes_never_claim_the_same_task,
    two_nodes_resolve_a_fan_in_once,
    two_nodes_keep_one_audit_chain,
    a_dependent_submitted_while_its_dependency_finishes_is_not_stranded,
    finish_and_claim_hands_the_slot_on,
    two_nodes_finish_and_claim_each_task_once,
    search_ranks_words_synonyms_and_pieces_of_names,
    search_filters_by_project_outcome_tags_and_time,
    search_survives_hostile_input,
    recommend_is_deterministic,
    history_retention_vectors_and_outbox,
    a_record_that_cannot_be_built_does_not_hold_up_the_others,
    a_write_the_database_refuses_fails_alone,
    a_task_finished_twice_at_once_counts_once,
    dependencies_on_one_task_through_keys_wait_for_it_once,
    two_retries_at_once_reopen_a_skipped_dependent_once,
    a_claim_its_worker_does_not_run_is_not_renewed,
    a_refused_submission_answers_no_task_by_its_key,
    reads_of_a_task_a_workflow_and_the_stats_see_one_moment,
    a_retried_task_waits_for_its_dependencies_and_its_time_again,
    a_task_of_a_cancelled_workflow_is_not_retried,
    a_skip_caused_outside_the_workflow_ends_it_as_the_cause_did,
    a_scoped_claim_takes_only_its_tasks,
    what_is_runnable_leaves_out_tasks_waiting_for_their_time,
);

const T0: i64 = 1_700_000_000_000;

fn spec(name: &str) -> String {
    serde_json::json!({"name": name, "command": "true"}).to_string()
}

fn task(name: &str) -> NewTask {
    NewTask {
        id: uuid::Uuid::now_v7().to_string(),
        name: name.to_string(),
        kind: TaskKind::Command,
        project: None,
        tags: Vec::new(),
        priority: 0,
        max_attempts: 1,
        idempotency_key: None,
        spec_json: spec(name),
        spec_hash: "h".repeat(64),
        now: T0,
        workflow_id: None,
        schedule_id: None,
        deps: Vec::new(),
        run_at: T0,
        needs_approval: false,
    }
}

fn after(mut t: NewTask, deps: &[&NewTask], condition: Condition) -> NewTask {
    t.deps = deps
        .iter()
        .map(|d| NewDep {
            dep_id: d.id.clone(),
            condition: condition.clone(),
        })
        .collect();
    t
}

fn tasks(list: Vec<NewTask>) -> NewSubmission {
    NewSubmission {
        tasks: list,
        ..Default::default()
    }
}

fn workflow(name: &str, mut list: Vec<NewTask>) -> (String, NewSubmission) {
    let id = uuid::Uuid::now_v7().to_string();
    for t in &mut list {
        t.workflow_id = Some(id.clone());
    }
    let sub = NewSubmission {
        workflow: Some(NewWorkflow {
            id: id.clone(),
            name: name.to_string(),
            project: None,
            tags: Vec::new(),
            description: None,
            schedule_id: None,
            idempotency_key: None,
            now: T0,
        }),
        schedules: Vec::new(),
        tasks: list,
    };
    (id, sub)
}

/// A workflow submission with an idempotency key of its own.
fn keyed_workflow(name: &str, key: &str, list: Vec<NewTask>) -> (String, NewSubmission) {
    let (id, mut sub) = workflow(name, list);
    sub.workflow.as_mut().unwrap().idempotency_key = Some(key.to_string());
    (id, sub)
}

fn claim_req(worker: &str, now: i64, limit: usize) -> ClaimRequest {
    ClaimRequest {
        worker_id: worker.to_string(),
        now,
        lease_until: now + 30_000,
        limit,
        server_kinds: true,
        external: None,
        only: None,
    }
}

fn finish(id: &str, attempt: u32, worker: &str, now: i64, status: TaskStatus) -> FinishAttempt {
    FinishAttempt {
        task_id: id.to_string(),
        attempt,
        worker_id: worker.to_string(),
        started_at: now - 5,
        now,
        status: match status {
            TaskStatus::Succeeded => AttemptStatus::Succeeded,
            _ => AttemptStatus::Failed,
        },
        error: (status != TaskStatus::Succeeded).then(|| "exit 1".to_string()),
        result: TaskResult {
            exit_code: Some(if status == TaskStatus::Succeeded {
                0
            } else {
                1
            }),
            duration_ms: 5,
            attempt,
            ..Default::default()
        },
        logs: vec![StreamLog {
            stream: "stdout",
            data: format!("out of {id}").into_bytes(),
            dropped_bytes: 0,
        }],
        next: Next::Done(status),
    }
}

async fn status(s: &Arc<dyn Store>, id: &str) -> TaskStatus {
    s.get(id).await.unwrap().expect("task exists").status
}

/// Claims everything ready and finishes it with `status`; returns the ids.
async fn run_ready(s: &Arc<dyn Store>, now: i64, status: TaskStatus) -> Vec<String> {
    let claimed = s.claim(claim_req("w1", now, 100)).await.unwrap();
    let mut ids = Vec::new();
    for c in claimed {
        let out = s
            .finish(finish(&c.id, c.attempt, "w1", now + 1, status))
            .await
            .unwrap();
        assert_eq!(out, FinishOutcome::Applied(status));
        ids.push(c.id);
    }
    ids
}

async fn assert_chain_ok(s: &Arc<dyn Store>) -> u64 {
    let report = s.verify_audit().await.unwrap();
    assert!(report.ok, "audit chain broken: {report:?}");
    report.events
}

async fn submit_claim_finish_in_priority_order(b: &Backend) {
    let s = b.open().await;
    let low = task("low");
    let mut high = task("high");
    high.priority = 10;
    let mid = task("mid");
    let out = s
        .submit(tasks(vec![low.clone(), high.clone(), mid.clone()]))
        .await
        .unwrap();
    assert!(
        out.iter()
            .all(|o| o.created && o.status == TaskStatus::Queued)
    );
    let claimed = s.claim(claim_req("w1", T0 + 10, 2)).await.unwrap();
    let names: Vec<&str> = claimed.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(
        names,
        ["high", "low"],
        "priority first, then submission order"
    );
    assert_eq!(claimed[0].attempt, 1);
    assert_eq!(status(&s, &high.id).await, TaskStatus::Running);
    let got = s.get(&high.id).await.unwrap().unwrap();
    assert_eq!(got.lease_owner.as_deref(), Some("w1"));
    let out = s
        .finish(finish(&high.id, 1, "w1", T0 + 20, TaskStatus::Succeeded))
        .await
        .unwrap();
    assert_eq!(out, FinishOutcome::Applied(TaskStatus::Succeeded));
    let got = s.get(&high.id).await.unwrap().unwrap();
    assert_eq!(got.status, TaskStatus::Succeeded);
    assert_eq!(got.lease_owner, None);
    assert_eq!(got.result.unwrap().exit_code, Some(0));
    let attempts = s.attempts(&high.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status, AttemptStatus::Succeeded);
    let logs = s.logs(&high.id, None).await.unwrap();
    assert_eq!(logs[0].text, format!("out of {}", high.id));
    // Failure with a retry goes to `retrying` and comes back at its time.
    let mut f = finish(&low.id, 1, "w1", T0 + 30, TaskStatus::Failed);
    f.next = Next::Retry { run_at: T0 + 1_000 };
    assert_eq!(
        s.finish(f).await.unwrap(),
        FinishOutcome::Applied(TaskStatus::Retrying)
    );
    let claimed = s.claim(claim_req("w1", T0 + 40, 10)).await.unwrap();
    assert_eq!(
        claimed.len(),
        1,
        "only mid is ready before the backoff ends"
    );
    assert_eq!(claimed[0].name, "mid");
    assert_eq!(s.next_run_at(T0 + 40).await.unwrap(), Some(T0 + 1_000));
    let claimed = s.claim(claim_req("w1", T0 + 1_000, 10)).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!((claimed[0].name.as_str(), claimed[0].attempt), ("low", 2));
    let counts = s.counts().await.unwrap();
    assert_eq!(counts.get(&TaskStatus::Running), Some(&2));
    assert_eq!(counts.get(&TaskStatus::Succeeded), Some(&1));
    assert!(assert_chain_ok(&s).await >= 8);
}

async fn dependencies_resolve_and_skips_cascade(b: &Backend) {
    let s = b.open().await;
    let a = task("a");
    let ok = after(task("on-success"), &[&a], Condition::Success);
    let chained = after(task("after-skipped"), &[&ok], Condition::Success);
    let on_fail = after(task("on-failure"), &[&a], Condition::Failure);
    let always = after(task("always"), &[&a], Condition::Completion);
    let all = vec![
        a.clone(),
        ok.clone(),
        chained.clone(),
        on_fail.clone(),
        always.clone(),
    ];
    let out = s.submit(tasks(all)).await.unwrap();
    assert_eq!(out[0].status, TaskStatus::Queued);
    assert!(out[1..].iter().all(|o| o.status == TaskStatus::Pending));
    let ran = run_ready(&s, T0 + 10, TaskStatus::Failed).await;
    assert_eq!(ran, vec![a.id.clone()]);
    assert_eq!(status(&s, &ok.id).await, TaskStatus::Skipped);
    assert_eq!(
        status(&s, &chained.id).await,
        TaskStatus::Skipped,
        "skips cascade"
    );
    assert_eq!(status(&s, &on_fail.id).await, TaskStatus::Queued);
    assert_eq!(status(&s, &always.id).await, TaskStatus::Queued);
    let skipped = s.get(&chained.id).await.unwrap().unwrap();
    assert!(
        skipped.error.unwrap().contains("on-success"),
        "the reason names the dependency"
    );
    let edges = s.dependencies(&ok.id).await.unwrap();
    assert_eq!(edges.len(), 2, "one edge in, one out");
    // A dependency on an already finished task is decided at submit.
    let late = after(task("late"), &[&a], Condition::Failure);
    let out = s.submit(tasks(vec![late.clone()])).await.unwrap();
    assert_eq!(out[0].status, TaskStatus::Queued);
    // Retrying the failed task reopens what it skipped.
    let retried = s.retry(&a.id, T0 + 100).await.unwrap();
    assert_eq!(retried.status, TaskStatus::Queued);
    assert_eq!(status(&s, &ok.id).await, TaskStatus::Pending);
    assert_eq!(status(&s, &chained.id).await, TaskStatus::Pending);
    let claimed = s.claim(claim_req("w1", T0 + 200, 1)).await.unwrap();
    assert_eq!(claimed[0].id, a.id);
    s.finish(finish(
        &a.id,
        claimed[0].attempt,
        "w1",
        T0 + 210,
        TaskStatus::Succeeded,
    ))
    .await
    .unwrap();
    assert_eq!(status(&s, &ok.id).await, TaskStatus::Queued);
    assert_chain_ok(&s).await;
}

async fn workflow_counters_finish_the_workflow(b: &Backend) {
    let s = b.open().await;
    let root = task("root");
    let fan: Vec<NewTask> = (0..5)
        .map(|i| after(task(&format!("fan-{i}")), &[&root], Condition::Success))
        .collect();
    let refs: Vec<&NewTask> = fan.iter().collect();
    let join = after(task("join"), &refs, Condition::Success);
    let mut list = vec![root.clone()];
    list.extend(fan.clone());
    list.push(join.clone());
    let (wid, sub) = workflow("fan-in", list);
    s.submit(sub).await.unwrap();
    let mut events = s.subscribe_workflows();
    for round in 0..3 {
        run_ready(&s, T0 + 100 * (round + 1), TaskStatus::Succeeded).await;
    }
    let w = s.workflow(&wid).await.unwrap().unwrap();
    assert_eq!((w.tasks_total, w.tasks_done), (7, 7));
    assert_eq!(w.status, task_queue::WorkflowStatus::Succeeded);
    let e = events.recv().await.unwrap();
    assert_eq!(e.workflow_id, wid);
    let detail = s.workflow_detail(&wid).await.unwrap().unwrap();
    assert_eq!(detail.tasks.len(), 7);
    assert_eq!(detail.edges.len(), 10);
    // A failed task fails its workflow; cancelling a running one cancels the rest.
    let x = task("x");
    let y = after(task("y"), &[&x], Condition::Success);
    let (w2, sub) = workflow("failing", vec![x, y]);
    s.submit(sub).await.unwrap();
    run_ready(&s, T0 + 1_000, TaskStatus::Failed).await;
    let w = s.workflow(&w2).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Failed);
    let (w3, sub) = workflow("cancelled", vec![task("p"), task("q")]);
    s.submit(sub).await.unwrap();
    let ids = s
        .cancel_workflow(&w3, T0 + 2_000, Some("stop".into()))
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    let w = s.workflow(&w3).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Cancelled);
    assert_chain_ok(&s).await;
}

async fn idempotency_keys_return_the_first_task(b: &Backend) {
    let s = b.open().await;
    let mut first = task("once");
    first.idempotency_key = Some("key-1".into());
    let out = s.submit(tasks(vec![first.clone()])).await.unwrap();
    assert!(out[0].created);
    let mut again = task("once");
    again.idempotency_key = Some("key-1".into());
    let out = s.submit(tasks(vec![again])).await.unwrap();
    assert!(!out[0].created);
    assert_eq!(out[0].id, first.id);
    // Two nodes submitting the same new key at once create it once.
    let other = b.open().await;
    let mut handles = Vec::new();
    for (i, store) in [s.clone(), other.clone(), s.clone(), other.clone()]
        .into_iter()
        .enumerate()
    {
        handles.push(tokio::spawn(async move {
            let mut t = task(&format!("race-{i}"));
            t.idempotency_key = Some("key-race".into());
            store.submit(tasks(vec![t])).await.unwrap().remove(0)
        }));
    }
    let mut ids = HashSet::new();
    let mut created = 0;
    for h in handles {
        let o = h.await.unwrap();
        ids.insert(o.id);
        created += usize::from(o.created);
    }
    assert_eq!((ids.len(), created), (1, 1), "one task for one key");
    let n = s
        .list(&TaskFilter {
            name: None,
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .len();
    assert_eq!(n, 2);
}

/// Two dependencies that name one task once keys are applied (two tasks
/// of a workflow with one idempotency key; a keyed task and the id of the
/// stored task with that key) are one edge: the dependent runs once that
/// task finishes, and its workflow ends.
async fn dependencies_on_one_task_through_keys_wait_for_it_once(b: &Backend) {
    let s = b.open().await;
    let mut a = task("shared-a");
    a.idempotency_key = Some("shared-key".into());
    let mut twin = task("shared-b");
    twin.idempotency_key = Some("shared-key".into());
    let c = after(task("after-both"), &[&a, &twin], Condition::Success);
    let (wid, sub) = workflow("shared-keys", vec![a.clone(), twin, c.clone()]);
    let out = s.submit(sub).await.unwrap();
    assert!(!out[1].created);
    assert_eq!(out[1].id, a.id);
    let detail = s.workflow_detail(&wid).await.unwrap().unwrap();
    assert_eq!(detail.edges.len(), 1, "{:?}", detail.edges);
    assert_eq!(
        run_ready(&s, T0 + 10, TaskStatus::Succeeded).await,
        vec![a.id.clone()]
    );
    assert_eq!(
        run_ready(&s, T0 + 20, TaskStatus::Succeeded).await,
        vec![c.id.clone()]
    );
    let w = s.workflow(&wid).await.unwrap().unwrap();
    assert_eq!((w.tasks_total, w.tasks_done), (2, 2), "{w:?}");
    assert_eq!(w.status, task_queue::WorkflowStatus::Succeeded, "{w:?}");
    // A keyed task and the stored task's id, in a later submission.
    let mut again = task("shared-again");
    again.idempotency_key = Some("shared-key".into());
    let mut d = after(task("after-key-and-id"), &[&again], Condition::Success);
    d.deps.push(NewDep {
        dep_id: a.id.clone(),
        condition: Condition::Success,
    });
    let out = s.submit(tasks(vec![again, d.clone()])).await.unwrap();
    assert_eq!(out[0].id, a.id);
    assert_eq!(out[1].status, TaskStatus::Queued, "{out:?}");
    assert_eq!(
        run_ready(&s, T0 + 30, TaskStatus::Succeeded).await,
        vec![d.id.clone()]
    );
    assert_chain_ok(&s).await;
}

/// A task skipped after two failed dependencies is reopened by a retry of
/// either; when both retries run at once (two nodes), it is not reopened
/// twice over, and its workflow counts it once.
async fn two_retries_at_once_reopen_a_skipped_dependent_once(b: &Backend) {
    let s = b.open().await;
    let other = b.open().await;
    let mut flows = Vec::new();
    for i in 0..20 {
        let x = task(&format!("x-{i}"));
        let y = task(&format!("y-{i}"));
        let mut t = after(task(&format!("t-{i}")), &[&x], Condition::Success);
        t.deps.push(NewDep {
            dep_id: y.id.clone(),
            condition: Condition::Completion,
        });
        let (wid, sub) = workflow(
            &format!("retried-{i}"),
            vec![x.clone(), y.clone(), t.clone()],
        );
        s.submit(sub).await.unwrap();
        flows.push((wid, x.id, y.id, t.id));
    }
    assert_eq!(run_ready(&s, T0 + 10, TaskStatus::Failed).await.len(), 40);
    for (_, _, _, t) in &flows {
        assert_eq!(status(&s, t).await, TaskStatus::Skipped);
    }
    let mut retries = tokio::task::JoinSet::new();
    for (_, x, y, _) in &flows {
        for (store, id) in [(s.clone(), x.clone()), (other.clone(), y.clone())] {
            retries.spawn(async move { store.retry(&id, T0 + 20).await.unwrap() });
        }
    }
    while let Some(r) = retries.join_next().await {
        r.unwrap();
    }
    for (wid, _, _, t) in &flows {
        assert_eq!(status(&s, t).await, TaskStatus::Pending, "{t}");
        // Y's retry alone reopens T and then skips it again (X still
        // failed); X's reopens it for good. Never twice without a skip
        // between.
        let kinds: Vec<String> = s
            .audit_events(Some(t), 100)
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .filter(|k| k != "submitted")
            .collect();
        assert!(
            !kinds
                .windows(2)
                .any(|w| w[0] == "reopened" && w[1] == "reopened"),
            "{t} is reopened twice in a row: {kinds:?}"
        );
        assert_eq!(
            kinds.last().map(String::as_str),
            Some("reopened"),
            "{kinds:?}"
        );
        let w = s.workflow(wid).await.unwrap().unwrap();
        assert_eq!((w.tasks_total, w.tasks_done), (3, 0), "{w:?}");
        assert_eq!(w.status, task_queue::WorkflowStatus::Running, "{w:?}");
    }
    assert_chain_ok(&s).await;
}

/// A workflow submitted again (a client retrying after a lost answer)
/// whose tasks all match by key is the first workflow, not a new empty one
/// that would report `succeeded` while the first still runs.
async fn a_workflow_submitted_again_is_the_first_one(b: &Backend) {
    let s = b.open().await;
    let keyed = |name: &str| {
        let mut t = task(name);
        t.idempotency_key = Some(format!("deploy-{name}"));
        t
    };
    let build = keyed("build");
    let ship = after(keyed("ship"), &[&build], Condition::Success);
    let (w1, sub) = workflow("deploy", vec![build.clone(), ship.clone()]);
    let first = s.submit(sub).await.unwrap();
    assert!(first.iter().all(|t| t.created));
    assert!(
        first
            .iter()
            .all(|t| t.workflow_id.as_deref() == Some(w1.as_str()))
    );

    // The same workflow again: fresh ids, the same keys.
    let build2 = keyed("build");
    let ship2 = after(keyed("ship"), &[&build2], Condition::Success);
    let (w2, sub) = workflow("deploy", vec![build2, ship2]);
    let again = s.submit(sub).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|t| (t.id.as_str(), t.created))
            .collect::<Vec<_>>(),
        vec![(build.id.as_str(), false), (ship.id.as_str(), false)]
    );
    assert!(
        again
            .iter()
            .all(|t| t.workflow_id.as_deref() == Some(w1.as_str()))
    );
    assert_eq!(
        task_queue::store::resubmitted_workflow(&again),
        Some(w1.as_str())
    );
    assert!(
        s.workflow(&w2).await.unwrap().is_none(),
        "no second workflow is stored"
    );
    let w = s.workflow(&w1).await.unwrap().unwrap();
    assert_eq!(
        (w.status, w.tasks_total),
        (task_queue::WorkflowStatus::Running, 2)
    );

    // With one task of its own it is a new workflow that uses the earlier
    // tasks as dependencies.
    let build3 = keyed("build");
    let notify = after(task("notify"), &[&build3], Condition::Success);
    let (w3, sub) = workflow("deploy-and-notify", vec![build3, notify.clone()]);
    let mixed = s.submit(sub).await.unwrap();
    assert_eq!(
        (mixed[0].id.as_str(), mixed[0].created),
        (build.id.as_str(), false)
    );
    assert_eq!(mixed[0].workflow_id.as_deref(), Some(w1.as_str()));
    assert!(mixed[1].created);
    assert_eq!(mixed[1].workflow_id.as_deref(), Some(w3.as_str()));
    let w = s.workflow(&w3).await.unwrap().unwrap();
    assert_eq!(w.tasks_total, 1);
    // Running the first workflow's tasks finishes it and releases `notify`.
    for round in 0..3 {
        run_ready(&s, T0 + 100 * (round + 1), TaskStatus::Succeeded).await;
    }
    for wid in [&w1, &w3] {
        let w = s.workflow(wid).await.unwrap().unwrap();
        assert_eq!(
            w.status,
            task_queue::WorkflowStatus::Succeeded,
            "{}",
            w.name
        );
    }
    assert_eq!(status(&s, &notify.id).await, TaskStatus::Succeeded);

    // A schedule's run whose keys all match the first workflow (two
    // schedules of one keyed template) is still stored: the schedule
    // records it as its upcoming run.
    let sid = uuid::Uuid::now_v7().to_string();
    let mut tick = task("tick");
    tick.schedule_id = Some(sid.clone());
    tick.run_at = T0 + 60_000;
    s.submit(NewSubmission {
        workflow: None,
        schedules: vec![NewSchedule {
            id: sid.clone(),
            name: "deploy".into(),
            project: None,
            cron: "* * * * *".into(),
            timezone: None,
            template: "{}".into(),
            next_fire_at: T0 + 60_000,
            upcoming_run: tick.id.clone(),
            now: T0,
        }],
        tasks: vec![tick],
    })
    .await
    .unwrap();
    let build4 = keyed("build");
    let ship4 = after(keyed("ship"), &[&build4], Condition::Success);
    let (w4, mut run) = workflow("deploy", vec![build4, ship4]);
    run.workflow.as_mut().unwrap().schedule_id = Some(sid.clone());
    let fired = s
        .fire_schedule(FireSchedule {
            schedule_id: sid.clone(),
            expected: T0 + 60_000,
            next_fire_at: T0 + 120_000,
            upcoming_run: w4.clone(),
            run,
            now: T0 + 60_001,
        })
        .await
        .unwrap();
    assert!(fired);
    let rec = s.schedule(&sid).await.unwrap().unwrap();
    assert_eq!(rec.upcoming_run.as_deref(), Some(w4.as_str()));
    assert!(
        s.workflow(&w4).await.unwrap().is_some(),
        "the run is stored"
    );
    assert_chain_ok(&s).await;
}

async fn a_workflow_key_names_the_first_workflow(b: &Backend) {
    let s = b.open().await;
    let build = task("build");
    let ship = after(task("ship"), &[&build], Condition::Success);
    let (w1, sub) = keyed_workflow("release", "release-42", vec![build.clone(), ship.clone()]);
    let first = s.submit(sub).await.unwrap();
    assert!(first.iter().all(|t| t.created));

    // Again with the key: the first workflow's tasks answer, whatever this
    // submission lists, and nothing is stored.
    let other = task("other");
    let (w2, sub) = keyed_workflow("release", "release-42", vec![other.clone()]);
    let again = s.submit(sub).await.unwrap();
    assert_eq!(
        again
            .iter()
            .map(|t| (t.id.as_str(), t.name.as_str(), t.created))
            .collect::<Vec<_>>(),
        vec![
            (build.id.as_str(), "build", false),
            (ship.id.as_str(), "ship", false)
        ]
    );
    assert!(
        again
            .iter()
            .all(|t| t.workflow_id.as_deref() == Some(w1.as_str()))
    );
    assert_eq!(
        task_queue::store::resubmitted_workflow(&again),
        Some(w1.as_str())
    );
    assert!(s.workflow(&w2).await.unwrap().is_none());
    assert!(s.get(&other.id).await.unwrap().is_none());
    let w = s.workflow_by_key("release-42").await.unwrap().unwrap();
    assert_eq!(w.id, w1);
    assert_eq!(w.idempotency_key.as_deref(), Some("release-42"));
    assert_eq!(
        s.workflow(&w1)
            .await
            .unwrap()
            .unwrap()
            .idempotency_key
            .as_deref(),
        Some("release-42")
    );
    assert!(s.workflow_by_key("release-43").await.unwrap().is_none());

    // Three submissions of a new key at once, through two stores (two
    // processes on one SQLite file, two PostgreSQL nodes): one stores it,
    // the others are answered by it.
    let s2 = b.open().await;
    let mut handles = Vec::new();
    for (n, st) in [s.clone(), s2.clone(), s.clone()].into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let (_, sub) = keyed_workflow("race", "race-1", vec![task(&format!("r{n}"))]);
            st.submit(sub).await.unwrap()
        }));
    }
    let mut answers = Vec::new();
    for h in handles {
        answers.push(h.await.unwrap());
    }
    let created: Vec<&Vec<task_queue::store::Submitted>> = answers
        .iter()
        .filter(|a| a.iter().any(|t| t.created))
        .collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    let winner = created[0][0].clone();
    for a in &answers {
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].id, winner.id);
        assert_eq!(a[0].workflow_id, winner.workflow_id);
    }
    let race = s2.workflow_by_key("race-1").await.unwrap().unwrap();
    assert_eq!(Some(race.id.as_str()), winner.workflow_id.as_deref());
    assert_eq!(race.tasks_total, 1);

    // Two submissions of one new key in one call to the writer cannot be
    // arranged from here; the store answers the later from the earlier
    // (see `store::answer_keyed`'s unit tests).

    // A keyed workflow whose every task was answered by tasks of two other
    // workflows has no task of its own; its key still names it, with no
    // tasks. (Matched all in one workflow, that workflow is the answer and
    // the key is not stored.)
    let keyed_task = |name: &str| {
        let mut t = task(name);
        t.idempotency_key = Some(format!("k-{name}"));
        t
    };
    let (wa, sub) = workflow("a", vec![keyed_task("a")]);
    s.submit(sub).await.unwrap();
    let (wb, sub) = workflow("b", vec![keyed_task("b")]);
    s.submit(sub).await.unwrap();
    let (w6, sub) = keyed_workflow("both", "empty-1", vec![keyed_task("a"), keyed_task("b")]);
    let answer = s.submit(sub).await.unwrap();
    assert_eq!(
        answer
            .iter()
            .map(|t| t.workflow_id.clone().unwrap())
            .collect::<Vec<_>>(),
        vec![wa, wb]
    );
    let w = s.workflow(&w6).await.unwrap().unwrap();
    assert_eq!(
        (w.tasks_total, w.status),
        (0, task_queue::WorkflowStatus::Succeeded)
    );
    let (w7, sub) = keyed_workflow("both", "empty-1", vec![keyed_task("a"), keyed_task("b")]);
    let answer = s.submit(sub).await.unwrap();
    assert!(answer.is_empty(), "{answer:?}");
    assert!(s.workflow(&w7).await.unwrap().is_none());
    assert_eq!(s.workflow_by_key("empty-1").await.unwrap().unwrap().id, w6);
    assert_chain_ok(&s).await;
}

async fn approvals_cancels_and_retries(b: &Backend) {
    let s = b.open().await;
    let mut gated = task("deploy");
    gated.needs_approval = true;
    let plain = task("plain");
    let out = s
        .submit(tasks(vec![gated.clone(), plain.clone()]))
        .await
        .unwrap();
    assert_eq!(out[0].status, TaskStatus::AwaitingApproval);
    let err = s
        .approve(
            &plain.id,
            ApprovalDecision {
                approved: true,
                comment: None,
                by: None,
            },
            T0 + 1,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not awaiting_approval"), "{err}");
    let t = s
        .approve(
            &gated.id,
            ApprovalDecision {
                approved: true,
                comment: Some("ship it".into()),
                by: Some("ana".into()),
            },
            T0 + 2,
        )
        .await
        .unwrap();
    assert_eq!(t.status, TaskStatus::Queued);
    assert_eq!(t.approval.unwrap().by.as_deref(), Some("ana"));
    let t = s.cancel(&plain.id, T0 + 3, None).await.unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled);
    let err = s.cancel("no-such-task", T0 + 3, None).await.unwrap_err();
    assert!(err.to_string().contains("no-such-task"), "{err}");
    let t = s.retry(&plain.id, T0 + 4).await.unwrap();
    assert_eq!(t.status, TaskStatus::Queued);
    let err = s.retry(&gated.id, T0 + 4).await.unwrap_err();
    assert!(err.to_string().contains("cannot be retried"), "{err}");
    assert_chain_ok(&s).await;
}

async fn leases_renew_expire_and_fence_stale_finishes(b: &Backend) {
    let s = b.open().await;
    let mut t = task("leased");
    t.max_attempts = 3;
    s.submit(tasks(vec![t.clone()])).await.unwrap();
    let mut req = claim_req("w1", T0, 1);
    req.lease_until = T0 + 1_000;
    let c = s.claim(req).await.unwrap().remove(0);
    let held = s
        .renew_leases("w1", std::slice::from_ref(&t.id), T0 + 500, T0 + 2_000)
        .await
        .unwrap();
    assert_eq!(held, vec![t.id.clone()]);
    s.heartbeat(&t.id, "w1", T0 + 600, T0 + 2_000)
        .await
        .unwrap();
    let err = s
        .heartbeat(&t.id, "w2", T0 + 600, T0 + 2_000)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("does not hold"), "{err}");
    assert!(
        s.reclaim(Reclaim::Expired, T0 + 1_500)
            .await
            .unwrap()
            .is_empty()
    );
    let lost = s.reclaim(Reclaim::Expired, T0 + 2_001).await.unwrap();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].status, TaskStatus::Retrying);
    assert!(
        s.renew_leases("w1", std::slice::from_ref(&t.id), T0 + 2_002, T0 + 3_000)
            .await
            .unwrap()
            .is_empty()
    );
    let stale = s
        .finish(finish(
            &t.id,
            c.attempt,
            "w1",
            T0 + 2_003,
            TaskStatus::Succeeded,
        ))
        .await
        .unwrap();
    assert_eq!(stale, FinishOutcome::Stale(TaskStatus::Retrying));
    let c2 = s
        .claim(claim_req("w2", T0 + 120_000, 1))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(c2.attempt, 2);
    let lost = s
        .reclaim(Reclaim::Workers(vec!["w2".into()]), T0 + 120_001)
        .await
        .unwrap();
    assert_eq!(lost.len(), 1);
    let attempts = s.attempts(&t.id).await.unwrap();
    assert!(attempts.iter().any(|a| a.status == AttemptStatus::Lost));
    assert_chain_ok(&s).await;
}

/// `complete` sent again after a timeout, or racing `fail`: when both
/// finishes of one attempt arrive together (and are written in one batch),
/// the first counts and the other is stale. Counting both would count the
/// task twice in its workflow, which then ends before its last task.
async fn a_task_finished_twice_at_once_counts_once(b: &Backend) {
    let s = b.open().await;
    let list: Vec<NewTask> = (0..30).map(|i| task(&format!("twice-{i}"))).collect();
    let mut all = list.clone();
    all.push(task("last"));
    let (wid, sub) = workflow("finished-twice", all);
    s.submit(sub).await.unwrap();
    let mut claimed = s.claim(claim_req("w1", T0, 100)).await.unwrap();
    assert_eq!(claimed.len(), 31);
    let last = claimed.iter().position(|c| c.name == "last").unwrap();
    let last = claimed.remove(last);
    let mut finishes = tokio::task::JoinSet::new();
    for c in &claimed {
        for status in [TaskStatus::Succeeded, TaskStatus::Failed] {
            let (s, id, attempt) = (s.clone(), c.id.clone(), c.attempt);
            finishes.spawn(async move {
                let out = s.finish(finish(&id, attempt, "w1", T0 + 10, status)).await;
                (id, status, out.unwrap())
            });
        }
    }
    let mut outcomes: std::collections::HashMap<String, Vec<(TaskStatus, FinishOutcome)>> =
        std::collections::HashMap::new();
    while let Some(r) = finishes.join_next().await {
        let (id, status, out) = r.unwrap();
        outcomes.entry(id).or_default().push((status, out));
    }
    for (id, outs) in &outcomes {
        let applied: Vec<TaskStatus> = outs
            .iter()
            .filter_map(|(sent, out)| match out {
                FinishOutcome::Applied(st) => {
                    assert_eq!(st, sent, "{id}: {outs:?}");
                    Some(*st)
                }
                _ => None,
            })
            .collect();
        assert_eq!(applied.len(), 1, "{id}: one finish counts: {outs:?}");
        assert!(
            outs.contains(&(
                if applied[0] == TaskStatus::Succeeded {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Succeeded
                },
                FinishOutcome::Stale(applied[0])
            )),
            "{id}: the other is stale: {outs:?}"
        );
        assert_eq!(status(&s, id).await, applied[0], "{id}");
        let finished = s
            .audit_events(Some(id), 100)
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == "finished")
            .count();
        assert_eq!(finished, 1, "{id}: one finished event");
    }
    let w = s.workflow(&wid).await.unwrap().unwrap();
    assert_eq!((w.tasks_total, w.tasks_done), (31, 30), "{w:?}");
    assert_eq!(w.status, task_queue::WorkflowStatus::Running, "{w:?}");
    s.finish(finish(
        &last.id,
        last.attempt,
        "w1",
        T0 + 20,
        TaskStatus::Succeeded,
    ))
    .await
    .unwrap();
    let w = s.workflow(&wid).await.unwrap().unwrap();
    assert_eq!(w.tasks_done, 31, "{w:?}");
    assert_chain_ok(&s).await;
}

/// A worker renews only the attempts it runs: a task leased to it that it
/// does not know (a claim that committed while its answer was lost) keeps
/// its claim's lease, which runs out, and is taken back as lost.
async fn a_claim_its_worker_does_not_run_is_not_renewed(b: &Backend) {
    let s = b.open().await;
    let mut known = task("known");
    known.max_attempts = 2;
    let mut orphan = task("orphan");
    orphan.max_attempts = 2;
    s.submit(tasks(vec![known.clone(), orphan.clone()]))
        .await
        .unwrap();
    let mut req = claim_req("w1", T0, 2);
    req.lease_until = T0 + 1_000;
    assert_eq!(s.claim(req).await.unwrap().len(), 2);
    let held = s
        .renew_leases("w1", std::slice::from_ref(&known.id), T0 + 500, T0 + 5_000)
        .await
        .unwrap();
    assert_eq!(held, vec![known.id.clone()]);
    let lost = s.reclaim(Reclaim::Expired, T0 + 1_500).await.unwrap();
    assert_eq!(lost.len(), 1, "{lost:?}");
    assert_eq!(lost[0].task_id, orphan.id);
    assert_eq!(status(&s, &orphan.id).await, TaskStatus::Retrying);
    assert_eq!(status(&s, &known.id).await, TaskStatus::Running);
    assert_chain_ok(&s).await;
}

async fn schedules_fire_once_per_slot(b: &Backend) {
    let s = b.open().await;
    let other = b.open().await;
    let sid = uuid::Uuid::now_v7().to_string();
    let mut first = task("tick");
    first.schedule_id = Some(sid.clone());
    first.run_at = T0 + 60_000;
    let sub = NewSubmission {
        workflow: None,
        schedules: vec![NewSchedule {
            id: sid.clone(),
            name: "tick".into(),
            project: None,
            cron: "* * * * *".into(),
            timezone: None,
            template: "{}".into(),
            next_fire_at: T0 + 60_000,
            upcoming_run: first.id.clone(),
            now: T0,
        }],
        tasks: vec![first.clone()],
    };
    let out = s.submit(sub).await.unwrap();
    assert_eq!(out[0].status, TaskStatus::Pending);
    assert_eq!(s.due_schedules(T0 + 59_999).await.unwrap().len(), 0);
    assert_eq!(s.due_schedules(T0 + 60_000).await.unwrap().len(), 1);
    // Every node tries to fire the same slot at once: one wins.
    let mut handles = Vec::new();
    for store in [s.clone(), other.clone(), s.clone(), other.clone()] {
        let sid = sid.clone();
        handles.push(tokio::spawn(async move {
            let mut next = task("tick");
            next.schedule_id = Some(sid.clone());
            next.run_at = T0 + 120_000;
            let upcoming = next.id.clone();
            store
                .fire_schedule(FireSchedule {
                    schedule_id: sid,
                    expected: T0 + 60_000,
                    next_fire_at: T0 + 120_000,
                    upcoming_run: upcoming,
                    run: tasks(vec![next]),
                    now: T0 + 60_001,
                })
                .await
                .unwrap()
        }));
    }
    let mut fired = 0;
    for h in handles {
        fired += usize::from(h.await.unwrap());
    }
    assert_eq!(fired, 1, "one firing per slot");
    let rec = s.schedule(&sid).await.unwrap().unwrap();
    assert_eq!(rec.runs, 1);
    let runs = s
        .list(&TaskFilter {
            name: Some("tick".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(runs.len(), 2, "the first run and the one after it");
    // The first run became ready at its time.
    let c = s.claim(claim_req("w1", T0 + 60_002, 10)).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].id, first.id);
    let paused = s
        .change_schedule(&sid, task_queue::store::ScheduleChange::Pause, T0 + 60_003)
        .await
        .unwrap()
        .unwrap();
    assert!(paused.paused);
    assert_eq!(s.list_schedules().await.unwrap().len(), 1);
    assert_chain_ok(&s).await;
}

async fn tokens_are_stored_by_hash(b: &Backend) {
    let s = b.open().await;
    assert!(!s.tokens_exist().await.unwrap());
    let t = TokenRecord {
        id: "tok-1".into(),
        name: "ci".into(),
        role: Role::Operator,
        created_at: task_queue::model::Timestamp(T0),
        revoked_at: None,
    };
    s.create_token(t.clone(), "a".repeat(64)).await.unwrap();
    assert!(s.tokens_exist().await.unwrap());
    assert_eq!(s.token_by_hash(&"a".repeat(64)).await.unwrap(), Some(t));
    assert!(s.revoke_token("tok-1", T0 + 1).await.unwrap());
    assert!(!s.revoke_token("tok-1", T0 + 2).await.unwrap());
    assert_eq!(s.token_by_hash(&"a".repeat(64)).await.unwrap(), None);
    assert_eq!(s.list_tokens().await.unwrap().len(), 1);
    assert!(!s.tokens_exist().await.unwrap());
}

async fn reads_filter_and_stream_events(b: &Backend) {
    let s = b.open().await;
    let mut tagged = task("tagged");
    tagged.tags = vec!["red".into(), "blue".into()];
    tagged.project = Some("alpha".into());
    let mut ext = task("agent.review");
    ext.kind = TaskKind::External;
    let plain = task("plain");
    s.submit(tasks(vec![tagged.clone(), ext.clone(), plain.clone()]))
        .await
        .unwrap();
    let by_tag = s
        .list(&TaskFilter {
            tag: Some("blue".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(by_tag.len(), 1);
    assert_eq!(by_tag[0].1.id, tagged.id);
    let page = s
        .list(&TaskFilter {
            statuses: vec![TaskStatus::Queued],
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), 2);
    let rest = s
        .list(&TaskFilter {
            limit: 10,
            before_seq: Some(page[1].0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.len(), 1);
    // External tasks go to workers whose filter matches, by name prefix.
    let mut req = claim_req("agent", T0 + 1, 10);
    req.server_kinds = false;
    req.external = Some(task_queue::store::ExternalFilter {
        names: vec!["agent.*".into()],
        ..Default::default()
    });
    assert_eq!(s.runnable_count(&req).await.unwrap(), 1);
    let c = s.claim(req).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].id, ext.id);
    let stats = s.stats(T0 + 2).await.unwrap();
    assert_eq!(stats.ready, 2);
    assert_eq!(stats.leases_by_worker.get("agent"), Some(&1));
    assert_eq!(stats.by_project["alpha"].get(&TaskStatus::Queued), Some(&1));
    let events = s.events_after(0, None, None, 100).await.unwrap();
    assert_eq!(events.len(), 4, "three submitted, one claimed");
    assert_eq!(events.last().unwrap().kind, "claimed");
    assert_eq!(
        s.last_event_seq().await.unwrap(),
        events.last().unwrap().seq
    );
    let only_alpha = s.events_after(0, None, Some("alpha"), 100).await.unwrap();
    assert_eq!(only_alpha.len(), 1);
    let audit = s.audit_events(Some(&ext.id), 10).await.unwrap();
    assert_eq!(audit.len(), 2);
}

async fn two_nodes_never_claim_the_same_task(b: &Backend) {
    let a = b.open().await;
    let c = b.open().await;
    let list: Vec<NewTask> = (0..300).map(|i| task(&format!("t{i}"))).collect();
    a.submit(tasks(list)).await.unwrap();
    let mut handles = Vec::new();
    for (n, s) in [a.clone(), c.clone(), a.clone(), c.clone()]
        .into_iter()
        .enumerate()
    {
        handles.push(tokio::spawn(async move {
            let worker = format!("w{n}");
            let mut mine = Vec::new();
            loop {
                let got = s.claim(claim_req(&worker, T0 + 10, 7)).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                for t in got {
                    s.finish(finish(
                        &t.id,
                        t.attempt,
                        &worker,
                        T0 + 20,
                        TaskStatus::Succeeded,
                    ))
                    .await
                    .unwrap();
                    mine.push(t.id);
                }
            }
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for h in handles {
        for id in h.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 300);
    assert!(seen.values().all(|&n| n == 1), "a task was claimed twice");
    assert_chain_ok(&a).await;
}

async fn finish_and_claim_hands_the_slot_on(b: &Backend) {
    let s = b.open().await;
    let first = task("first");
    let low = task("low");
    let mut high = task("high");
    high.priority = 5;
    s.submit(tasks(vec![first.clone()])).await.unwrap();
    let claimed = s.claim(claim_req("w1", T0 + 10, 1)).await.unwrap();
    assert_eq!(claimed[0].id, first.id);
    s.submit(tasks(vec![low.clone(), high.clone()]))
        .await
        .unwrap();
    // The finish counts and, in the same write, the next task (by priority)
    // is claimed for the slot.
    let (out, next) = s
        .finish_and_claim(
            finish(&first.id, 1, "w1", T0 + 20, TaskStatus::Succeeded),
            claim_req("w1", T0 + 20, 1),
        )
        .await
        .unwrap();
    assert_eq!(out, FinishOutcome::Applied(TaskStatus::Succeeded));
    assert_eq!(next.len(), 1);
    assert_eq!(
        (next[0].id.as_str(), next[0].attempt),
        (high.id.as_str(), 1)
    );
    assert_eq!(status(&s, &first.id).await, TaskStatus::Succeeded);
    assert_eq!(status(&s, &high.id).await, TaskStatus::Running);
    assert_eq!(s.attempts(&first.id).await.unwrap().len(), 1);
    // A stale finish is only recorded; the slot is still free, so the claim is made.
    let (out, next) = s
        .finish_and_claim(
            finish(&first.id, 1, "w1", T0 + 30, TaskStatus::Failed),
            claim_req("w1", T0 + 30, 1),
        )
        .await
        .unwrap();
    assert_eq!(out, FinishOutcome::Stale(TaskStatus::Succeeded));
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].id, low.id);
    // Nothing left: the finish alone.
    let (out, next) = s
        .finish_and_claim(
            finish(&high.id, 1, "w1", T0 + 40, TaskStatus::Succeeded),
            claim_req("w1", T0 + 40, 1),
        )
        .await
        .unwrap();
    assert_eq!(out, FinishOutcome::Applied(TaskStatus::Succeeded));
    assert!(next.is_empty());
    // The task the stale finish claimed is running under w1.
    let events = s.audit_events(Some(&low.id), 10).await.unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["submitted", "claimed"]);
    assert_chain_ok(&s).await;
}

async fn two_nodes_finish_and_claim_each_task_once(b: &Backend) {
    let a = b.open().await;
    let c = b.open().await;
    let list: Vec<NewTask> = (0..200).map(|i| task(&format!("t{i}"))).collect();
    let ids: HashSet<String> = list.iter().map(|t| t.id.clone()).collect();
    a.submit(tasks(list)).await.unwrap();
    // Eight slots over two nodes, each handing itself the next task in the
    // write that finishes the last; finishes of one node share batches.
    let mut handles = Vec::new();
    for n in 0..8 {
        let s = if n % 2 == 0 { a.clone() } else { c.clone() };
        handles.push(tokio::spawn(async move {
            let worker = format!("w{}", n % 2);
            let mut mine = Vec::new();
            let mut current = s.claim(claim_req(&worker, T0 + 10, 1)).await.unwrap();
            while let Some(t) = current.pop() {
                let (out, next) = s
                    .finish_and_claim(
                        finish(&t.id, t.attempt, &worker, T0 + 20, TaskStatus::Succeeded),
                        claim_req(&worker, T0 + 20, 1),
                    )
                    .await
                    .unwrap();
                assert_eq!(out, FinishOutcome::Applied(TaskStatus::Succeeded));
                assert!(next.len() <= 1, "one slot, at most one task");
                mine.push(t.id);
                current = next;
            }
            mine
        }));
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for h in handles {
        for id in h.await.unwrap() {
            *seen.entry(id).or_default() += 1;
        }
    }
    assert!(seen.values().all(|&n| n == 1), "a task was claimed twice");
    let done: HashSet<String> = seen.into_keys().collect();
    assert_eq!(done, ids, "every task ran");
    let counts = a.counts().await.unwrap();
    assert_eq!(counts.get(&TaskStatus::Succeeded), Some(&200));
    for id in ids.iter().take(5) {
        assert_eq!(a.attempts(id).await.unwrap().len(), 1);
    }
    assert_chain_ok(&a).await;
}

async fn two_nodes_resolve_a_fan_in_once(b: &Backend) {
    let a = b.open().await;
    let c = b.open().await;
    let deps: Vec<NewTask> = (0..40).map(|i| task(&format!("dep{i}"))).collect();
    let refs: Vec<&NewTask> = deps.iter().collect();
    let join = after(task("join"), &refs, Condition::Success);
    let mut list = deps.clone();
    list.push(join.clone());
    let (wid, sub) = workflow("fan-in", list);
    a.submit(sub).await.unwrap();
    // Each node claims one at a time and finishes it, so finishes of the
    // join's dependencies commit on both nodes concurrently.
    let mut handles = Vec::new();
    for (n, s) in [a.clone(), c.clone()].into_iter().enumerate() {
        handles.push(tokio::spawn(async move {
            let worker = format!("w{n}");
            loop {
                let got = s.claim(claim_req(&worker, T0 + 10, 1)).await.unwrap();
                let Some(t) = got.into_iter().next() else {
                    return;
                };
                if t.name == "join" {
                    s.finish(finish(
                        &t.id,
                        t.attempt,
                        &worker,
                        T0 + 30,
                        TaskStatus::Succeeded,
                    ))
                    .await
                    .unwrap();
                    continue;
                }
                s.finish(finish(
                    &t.id,
                    t.attempt,
                    &worker,
                    T0 + 20,
                    TaskStatus::Succeeded,
                ))
                .await
                .unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    // The join may have become ready after both loops saw an empty queue.
    run_ready(&a, T0 + 40, TaskStatus::Succeeded).await;
    let j = a.get(&join.id).await.unwrap().unwrap();
    assert_eq!(j.status, TaskStatus::Succeeded);
    assert_eq!(j.deps_pending, 0);
    let readies = a
        .audit_events(Some(&join.id), 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "ready")
        .count();
    assert_eq!(readies, 1, "the join became ready exactly once");
    let w = a.workflow(&wid).await.unwrap().unwrap();
    assert_eq!((w.tasks_done, w.tasks_total), (41, 41));
    assert_eq!(w.status, task_queue::WorkflowStatus::Succeeded);
    assert_chain_ok(&a).await;
}

async fn two_nodes_keep_one_audit_chain(b: &Backend) {
    let a = b.open().await;
    let c = b.open().await;
    let mut handles = Vec::new();
    for (n, s) in [a.clone(), c.clone(), a.clone(), c.clone()]
        .into_iter()
        .enumerate()
    {
        handles.push(tokio::spawn(async move {
            for i in 0..25 {
                let batch: Vec<NewTask> = (0..4).map(|k| task(&format!("n{n}-{i}-{k}"))).collect();
                s.submit(tasks(batch)).await.unwrap();
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    let events = assert_chain_ok(&a).await;
    assert_eq!(events, 400);
    assert_eq!(c.last_event_seq().await.unwrap(), 400);
}

/// One node submits a task depending on a running task while another node
/// finishes that task. Whichever commits first, the dependent must end up
/// ready: never waiting for a finish that already happened.
async fn a_dependent_submitted_while_its_dependency_finishes_is_not_stranded(b: &Backend) {
    let a = b.open().await;
    let c = b.open().await;
    let mut stranded = Vec::new();
    for i in 0..60 {
        let dep = task(&format!("dep{i}"));
        a.submit(tasks(vec![dep.clone()])).await.unwrap();
        let claimed = c.claim(claim_req("w1", T0 + 10, 1)).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, dep.id);
        let child = after(task(&format!("child{i}")), &[&dep], Condition::Success);
        let done = finish(&dep.id, 1, "w1", T0 + 20, TaskStatus::Succeeded);
        let (submitted, finished) =
            tokio::join!(a.submit(tasks(vec![child.clone()])), c.finish(done));
        submitted.unwrap();
        assert_eq!(
            finished.unwrap(),
            FinishOutcome::Applied(TaskStatus::Succeeded)
        );
        let got = a.get(&child.id).await.unwrap().unwrap();
        if got.status != TaskStatus::Queued || got.deps_pending != 0 {
            stranded.push(format!(
                "{}: {} with {} pending",
                got.name, got.status, got.deps_pending
            ));
        }
        // Drain it so the next round's claim finds only the next dependency.
        run_ready(&a, T0 + 30, TaskStatus::Succeeded).await;
    }
    assert!(stranded.is_empty(), "dependents left waiting: {stranded:?}");
    assert_chain_ok(&a).await;
}

// History: records written with the attempts, search and recommendations
// ranked by the same code on every backend.

/// A task with a description, a command, a project and tags.
fn described(
    name: &str,
    project: &str,
    tags: &[&str],
    description: &str,
    command: &str,
) -> NewTask {
    let mut t = task(name);
    t.project = Some(project.to_string());
    t.tags = tags.iter().map(|s| s.to_string()).collect();
    t.spec_json = serde_json::json!({
        "name": name,
        "description": description,
        "command": command,
        "project": project,
        "tags": tags,
    })
    .to_string();
    t
}

/// Submits `t`, runs it once at `now` and finishes it with `status`.
async fn run_once(s: &Arc<dyn Store>, t: NewTask, now: i64, status: TaskStatus) -> String {
    let mut t = t;
    t.now = now;
    t.run_at = now;
    let id = t.id.clone();
    s.submit(tasks(vec![t])).await.unwrap();
    let claimed = s.claim(claim_req("w1", now, 100)).await.unwrap();
    assert_eq!(claimed.len(), 1, "one task ready");
    let out = s
        .finish(finish(&id, claimed[0].attempt, "w1", now + 1, status))
        .await
        .unwrap();
    assert_eq!(out, FinishOutcome::Applied(status));
    id
}

/// Three records: a deploy, a failed frontend build and a database backup.
async fn small_history(s: &Arc<dyn Store>) -> [String; 3] {
    let deploy = run_once(
        s,
        described(
            "deploy-api",
            "shop",
            &["prod"],
            "Roll the backend service out to production",
            "kubectl apply -f api.yaml",
        ),
        T0,
        TaskStatus::Succeeded,
    )
    .await;
    let build = run_once(
        s,
        described(
            "build-frontend",
            "web",
            &["ci"],
            "Compile the web bundle",
            "npm run build",
        ),
        T0 + 10_000,
        TaskStatus::Failed,
    )
    .await;
    let backup = run_once(
        s,
        described(
            "nightly-backup",
            "shop",
            &["prod", "db"],
            "Dump the orders database to object storage",
            "pg_dump orders > orders.sql",
        ),
        T0 + 20_000,
        TaskStatus::Succeeded,
    )
    .await;
    [deploy, build, backup]
}

fn search_req(query: &str) -> SearchRequest {
    SearchRequest {
        query: query.to_string(),
        ..Default::default()
    }
}

async fn search(s: &Arc<dyn Store>, req: &SearchRequest) -> Vec<(String, Vec<String>)> {
    let h = s.history().expect("the store keeps history");
    Search::new(&Config::default())
        .search(h, req, T0 + 60_000)
        .await
        .unwrap()
        .hits
        .into_iter()
        .map(|hit| (hit.name, hit.sources))
        .collect()
}

fn names(hits: &[(String, Vec<String>)]) -> Vec<&str> {
    hits.iter().map(|(n, _)| n.as_str()).collect()
}

async fn search_ranks_words_synonyms_and_pieces_of_names(b: &Backend) {
    let s = b.open().await;
    let [deploy, _, _] = small_history(&s).await;
    let h = s.history().expect("the store keeps history");
    assert_eq!(h.interaction_count().await.unwrap(), 3);
    let rec = h.interactions_named("deploy-api", None, 10).await.unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].task_id, deploy);
    assert_eq!(rec[0].command.as_deref(), Some("kubectl apply -f api.yaml"));
    assert_eq!(rec[0].tags, vec!["prod"]);
    assert_eq!(rec[0].outcome, "succeeded");

    // Exact words, with the hit's snippet marking the match.
    let results = Search::new(&Config::default())
        .search(h, &search_req("orders database"), T0 + 60_000)
        .await
        .unwrap();
    assert_eq!(results.hits[0].name, "nightly-backup");
    assert!(
        results.hits[0].snippet.contains('['),
        "snippet marks the match: {:?}",
        results.hits[0].snippet
    );
    // A paraphrase through the synonym table.
    let hits = search(&s, &search_req("ship the backend")).await;
    assert_eq!(names(&hits)[0], "deploy-api", "{hits:?}");
    assert!(hits[0].1.contains(&"synonyms".to_string()), "{hits:?}");
    // A piece of a name through the trigram index.
    let hits = search(&s, &search_req("ploy")).await;
    assert_eq!(names(&hits), vec!["deploy-api"], "{hits:?}");
    assert!(hits[0].1.contains(&"trigram".to_string()), "{hits:?}");
    let hits = search(&s, &search_req("FRONTE")).await;
    assert_eq!(names(&hits), vec!["build-frontend"], "{hits:?}");
    // Nothing like it.
    assert!(search(&s, &search_req("zebra")).await.is_empty());
}

async fn search_filters_by_project_outcome_tags_and_time(b: &Backend) {
    let s = b.open().await;
    small_history(&s).await;
    let all = search_req("deploy build backup");
    let mut got = names(&search(&s, &all).await)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    got.sort();
    assert_eq!(got, vec!["build-frontend", "deploy-api", "nightly-backup"]);

    let shop = SearchRequest {
        project: Some("shop".into()),
        ..all.clone()
    };
    let mut got = names(&search(&s, &shop).await)
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    got.sort();
    assert_eq!(got, vec!["deploy-api", "nightly-backup"]);

    let failed = SearchRequest {
        statuses: vec![TaskStatus::Failed],
        ..all.clone()
    };
    assert_eq!(names(&search(&s, &failed).await), vec!["build-frontend"]);

    let tagged = SearchRequest {
        tags: vec!["prod".into(), "db".into()],
        ..all.clone()
    };
    assert_eq!(names(&search(&s, &tagged).await), vec!["nightly-backup"]);

    let window = SearchRequest {
        since: Some(Timestamp(T0 + 5_000)),
        until: Some(Timestamp(T0 + 15_000)),
        ..all.clone()
    };
    assert_eq!(names(&search(&s, &window).await), vec!["build-frontend"]);

    // Filters apply to pieces of names too.
    let piece = SearchRequest {
        project: Some("web".into()),
        ..search_req("ploy")
    };
    assert!(search(&s, &piece).await.is_empty());
}

async fn search_survives_hostile_input(b: &Backend) {
    let s = b.open().await;
    small_history(&s).await;
    let h = s.history().expect("the store keeps history");
    let engine = Search::new(&Config::default());
    let hostile = [
        "\"; DROP TABLE interactions; --",
        "'); DELETE FROM tasks; --",
        "NEAR(deploy api)",
        "deploy* OR \"",
        "name:deploy",
        "a & b | !c <-> d",
        "%_%",
        "\\\\x00 \\' \\\"",
        "((((",
        ")) OR 1=1 --",
        "$1 $$ ::text",
        "deploy\u{0}api",
        "ploy%",
        "de_loy",
    ];
    for q in hostile {
        match engine.search(h, &search_req(q), T0 + 60_000).await {
            Ok(_) => {}
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "query", "{q:?}"),
            Err(e) => panic!("{q:?} broke the query: {e}"),
        }
    }
    // Wildcards are literal: as patterns these would find `deploy-api`.
    assert!(search(&s, &search_req("y-a%i")).await.is_empty());
    assert!(search(&s, &search_req("y-a_i")).await.is_empty());
    assert_eq!(
        names(&search(&s, &search_req("y-api")).await),
        vec!["deploy-api"]
    );
    // Quoted SQL is only words: `deploy` still finds the deploy.
    let hits = search(&s, &search_req("\"; deploy --")).await;
    assert_eq!(names(&hits)[0], "deploy-api");
    // Nothing was dropped or deleted.
    assert_eq!(h.interaction_count().await.unwrap(), 3);
    assert_eq!(s.counts().await.unwrap().values().sum::<u64>(), 3);
}

async fn recommend_is_deterministic(b: &Backend) {
    let s = b.open().await;
    let mut now = T0;
    for status in [
        TaskStatus::Succeeded,
        TaskStatus::Failed,
        TaskStatus::Succeeded,
        TaskStatus::Succeeded,
    ] {
        let t = described(
            "deploy-api",
            "shop",
            &["prod"],
            "Roll the backend out",
            "kubectl apply -f api.yaml",
        );
        run_once(&s, t, now, status).await;
        now += 60_000;
    }
    let h = s.history().expect("the store keeps history");
    let engine = Search::new(&Config::default());
    let req = RecommendRequest {
        name: Some("deploy-api".into()),
        project: Some("shop".into()),
        ..Default::default()
    };
    let first = engine.recommend(h, &req, now).await.unwrap();
    let again = engine.recommend(h, &req, now).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first.based_on.as_deref(), Some("deploy-api"));
    assert_eq!(first.runs, 4);
    assert_eq!(first.success_rate, Some(0.75));
    assert_eq!(first.common_failures[0].value, "exit #");
    // Described by words only, it finds the same task.
    let by_words = RecommendRequest {
        description: Some("ship the backend".into()),
        ..Default::default()
    };
    let r = engine.recommend(h, &by_words, now).await.unwrap();
    assert_eq!(r.based_on.as_deref(), Some("deploy-api"));
    assert_eq!(r, engine.recommend(h, &by_words, now).await.unwrap());
}

async fn history_retention_vectors_and_outbox(b: &Backend) {
    let s = b.open().await;
    let [deploy, build, backup] = small_history(&s).await;
    let h = s.history().expect("the store keeps history");
    let all = h.filter_ids(&HistoryFilter::default()).await.unwrap();
    assert_eq!(all.len(), 3);

    // Every record waits in the outbox until delivered.
    let state = h.outbox_state().await.unwrap();
    assert_eq!(state.pending, 3);
    assert_eq!(state.oldest_finished_at, Some(T0 + 1));
    let due = h.outbox_due(T0, 10).await.unwrap();
    assert_eq!(due.len(), 3);
    let failed = HistoryChange::DeliveryFailed {
        ids: vec![due[0].id],
        next_at: T0 + 1_000_000,
        error: "connection refused".into(),
    };
    assert_eq!(h.change_history(failed).await.unwrap(), 1);
    assert_eq!(h.outbox_due(T0, 10).await.unwrap().len(), 2);
    let state = h.outbox_state().await.unwrap();
    assert_eq!(state.max_attempts, 1);
    assert_eq!(state.last_error.as_deref(), Some("connection refused"));
    let delivered = HistoryChange::Delivered {
        ids: vec![due[1].id],
    };
    assert_eq!(h.change_history(delivered).await.unwrap(), 1);
    assert_eq!(h.outbox_state().await.unwrap().pending, 2);

    // Vectors round-trip; a vector for an unknown record is not kept.
    let put = HistoryChange::PutVectors {
        model: "m".into(),
        dim: 2,
        rows: vec![(all[0], vec![0.6, 0.8]), (i64::MAX, vec![1.0, 0.0])],
    };
    h.change_history(put).await.unwrap();
    assert_eq!(
        h.vectors("m", 0).await.unwrap(),
        vec![(all[0], vec![0.6, 0.8])]
    );
    assert_eq!(h.missing_vectors("m", 10).await.unwrap().len(), 2);

    // Retention removes the records (with their vectors and outbox
    // entries) and logs of tasks finished before the cut, a batch at a time.
    let prune = HistoryChange::Prune {
        before: T0 + 15_000,
        limit: 1,
    };
    assert_eq!(h.change_history(prune.clone()).await.unwrap(), 1);
    assert_eq!(h.change_history(prune.clone()).await.unwrap(), 1);
    assert_eq!(h.change_history(prune).await.unwrap(), 0);
    let left = h.filter_ids(&HistoryFilter::default()).await.unwrap();
    let left = h.interactions(&left).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].task_id, backup);
    assert!(s.logs(&deploy, None).await.unwrap().is_empty());
    assert!(s.logs(&build, None).await.unwrap().is_empty());
    assert!(!s.logs(&backup, None).await.unwrap().is_empty());
    let state = h.outbox_state().await.unwrap();
    assert!(state.pending <= 1, "{state:?}");
    assert!(
        h.vectors("m", 0)
            .await
            .unwrap()
            .iter()
            .all(|(id, _)| *id == left[0].id)
    );
    let follow = h.follow_ups(std::slice::from_ref(&backup)).await.unwrap();
    assert!(follow.is_empty());
}

/// The SQLite writer answers through a task of the runtime that opened the
/// store. Once that runtime is gone, the writer answers from its own
/// thread, so a store handed to another runtime keeps working.
#[test]
fn sqlite_store_answers_after_the_runtime_that_opened_it_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.db");
    let runtime = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let store = first
        .block_on(SqliteStore::open(&path, Durability::Durable, 1))
        .unwrap();
    let t = task("outlives-its-runtime");
    let id = t.id.clone();
    first
        .block_on(store.submit(tasks(vec![t])))
        .expect("answered on the opening runtime");
    drop(first);
    let second = runtime();
    let claimed = second
        .block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                store.claim(claim_req("w", T0, 10)),
            )
            .await
        })
        .expect("answered after the opening runtime went")
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, id);
}

/// A record that cannot be built (here a task row whose spec is not JSON,
/// as a hand edit could leave it) is left out of the history with an
/// error in the log; the records written with it, the readers and the
/// queue carry on.
async fn a_record_that_cannot_be_built_does_not_hold_up_the_others(b: &Backend) {
    let s = b.open().await;
    let good = task("good-record");
    let mut bad = task("bad-record");
    bad.spec_json = "{not json".into();
    let (good_id, bad_id) = (good.id.clone(), bad.id.clone());
    s.submit(tasks(vec![good, bad])).await.unwrap();
    let finished = run_ready(&s, T0, TaskStatus::Succeeded).await;
    assert_eq!(finished.len(), 2);
    let h = s.history().unwrap();
    let rec = h.interactions_named("good-record", None, 10).await.unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].task_id, good_id);
    assert!(
        h.interactions_named("bad-record", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Nothing is left pending, and later records are written as usual.
    let later = run_once(&s, task("later-record"), T0 + 10, TaskStatus::Succeeded).await;
    let rec = h
        .interactions_named("later-record", None, 10)
        .await
        .unwrap();
    assert_eq!(rec[0].task_id, later);
    // The bad task itself finished like any other.
    let (status_sql, pending_sql) = (
        format!("SELECT status FROM tasks WHERE id = '{bad_id}'"),
        "SELECT count(*)::text FROM records_pending",
    );
    let (bad_status, pending) = match b {
        Backend::Sqlite(dir) => {
            let db = rusqlite::Connection::open(dir.path().join("q.db")).unwrap();
            let one = |sql: &str| -> String { db.query_row(sql, [], |r| r.get(0)).unwrap() };
            (
                one(&status_sql),
                one("SELECT CAST(count(*) AS TEXT) FROM records_pending"),
            )
        }
        Backend::Postgres { url, .. } => {
            let pool = connect_test_server(url).await;
            let one = |sql: String| {
                let pool = pool.clone();
                async move {
                    sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(sql))
                        .fetch_one(&pool)
                        .await
                        .unwrap()
                }
            };
            (one(status_sql).await, one(pending_sql.to_string()).await)
        }
    };
    assert_eq!(bad_status, "succeeded");
    assert_eq!(pending, "0");
}

/// PostgreSQL: the bulk write of interaction records keeps a plan that
/// runs its locking subquery once, even with the statistics autovacuum
/// leaves on `records_pending` when it analyzed the table empty. With
/// `id IN (SELECT … FOR UPDATE)` the planner chose a nested-loop semi join
/// there that ran the subquery again for every mark.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_records_write_plan_does_not_depend_on_stale_statistics() {
    let Some(b) = Backend::postgres("records_write_plan").await else {
        return;
    };
    let Backend::Postgres { url, .. } = &b else {
        unreachable!()
    };
    let store = PgStore::open(url, 2).await.unwrap();
    let pool = connect_test_server(url).await;
    sqlx::query("ANALYZE records_pending")
        .execute(&pool)
        .await
        .unwrap();
    let plan = task_queue::store::postgres::explain_records_write(&pool)
        .await
        .unwrap()
        .join("\n");
    assert!(plan.contains("InitPlan"), "{plan}");
    assert!(!plan.contains("Semi Join"), "{plan}");
    // And it writes: a finished attempt's record is found after it.
    let s: Arc<dyn Store> = Arc::new(store);
    let id = run_once(&s, task("plan-record"), T0, TaskStatus::Succeeded).await;
    let rec = s
        .history()
        .unwrap()
        .interactions_named("plan-record", None, 10)
        .await
        .unwrap();
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0].task_id, id);
    pool.close().await;
    b.cleanup().await;
}

/// PostgreSQL: finishing a batch looks each task up by its id, whatever
/// the statistics say about running tasks. Fenced with the constant
/// `status = 'running'`, the statement matched the partial indexes of
/// running tasks, and with statistics taken while many tasks ran the
/// planner walked one of them, where the entries of every task that ever
/// ran stay until vacuum: each finish got slower the more tasks had run.
/// A claim the server refuses is reported with the server's own error (a
/// deadlock's must reach the retry with its code), not with the error of a
/// statement run after it on the aborted transaction (25P02). Here the
/// refusal is a lock timeout while another session holds `tasks`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_refused_claim_keeps_its_own_error() {
    let Some(b) = Backend::postgres("refused_claim").await else {
        return;
    };
    let Backend::Postgres { url, .. } = &b else {
        unreachable!()
    };
    let s: Arc<dyn Store> = Arc::new(
        PgStore::open(&format!("{url}%20-c%20lock_timeout%3D200"), 2)
            .await
            .unwrap(),
    );
    s.submit(tasks(vec![task("locked-out")])).await.unwrap();
    let pool = connect_test_server(url).await;
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let err = s
        .claim(claim_req("w1", T0, 1))
        .await
        .unwrap_err()
        .to_string();
    holder.rollback().await.unwrap();
    assert!(err.contains("55P03"), "{err}");
    assert!(!err.contains("25P02"), "{err}");
    // The store goes on working once the lock is gone.
    assert_eq!(s.claim(claim_req("w1", T0, 1)).await.unwrap().len(), 1);
    pool.close().await;
    b.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_finish_plan_looks_tasks_up_by_id() {
    let Some(b) = Backend::postgres("finish_plan").await else {
        return;
    };
    let Backend::Postgres { url, .. } = &b else {
        unreachable!()
    };
    let store = PgStore::open(url, 2).await.unwrap();
    let pool = connect_test_server(url).await;
    let s: Arc<dyn Store> = Arc::new(store);
    s.submit(tasks(
        (0..600).map(|i| task(&format!("plan-{i}"))).collect(),
    ))
    .await
    .unwrap();
    // 500 tasks ran and finished (their entries stay in the indexes of
    // running tasks), 100 are running now.
    let claimed = s.claim(claim_req("w1", T0, 600)).await.unwrap();
    assert_eq!(claimed.len(), 600);
    let (done, running) = claimed.split_at(500);
    let quiet = |c: &task_queue::store::ClaimedTask, worker: &str, now: i64| {
        let mut f = finish(&c.id, c.attempt, worker, now, TaskStatus::Succeeded);
        f.logs.clear();
        f
    };
    for c in done {
        s.finish(quiet(c, "w1", T0 + 1)).await.unwrap();
    }
    sqlx::query("ANALYZE tasks").execute(&pool).await.unwrap();
    let attempts: Vec<(String, String, u32)> = running
        .iter()
        .map(|c| (c.id.clone(), "w1".to_string(), c.attempt))
        .collect();
    let plan = task_queue::store::postgres::explain_finish(&pool, &attempts)
        .await
        .unwrap()
        .join("\n");
    // On a table this small a scan of all of it may win; never an index
    // of running tasks.
    assert!(
        plan.contains("tasks_id_key") || plan.contains("Seq Scan on tasks"),
        "{plan}"
    );
    assert!(!plan.contains("tasks_running"), "{plan}");
    assert!(!plan.contains("tasks_lease_owner"), "{plan}");
    // And the fence still holds: a finish by another worker is stale.
    assert_eq!(
        s.finish(quiet(&running[0], "w2", T0 + 2)).await.unwrap(),
        FinishOutcome::Stale(TaskStatus::Running)
    );
    assert_eq!(
        s.finish(quiet(&running[0], "w1", T0 + 2)).await.unwrap(),
        FinishOutcome::Applied(TaskStatus::Succeeded)
    );
    pool.close().await;
    b.cleanup().await;
}

/// A write the database refuses (here a claim whose names are more
/// parameters than SQLite takes, and text PostgreSQL cannot store) fails
/// alone: the submits that were committed in the same batch as it are
/// applied again without it and answered, never failed with its error.
async fn a_write_the_database_refuses_fails_alone(b: &Backend) {
    let s = b.open().await;
    let mut names = vec!["bad\0name".to_string()];
    names.extend((0..40_000).map(|i| format!("n{i}")));
    let mut submitted = 0;
    for round in 0..20 {
        let bad = {
            let s = s.clone();
            let names = names.clone();
            tokio::spawn(async move {
                s.claim(ClaimRequest {
                    external: Some(task_queue::store::ExternalFilter {
                        names,
                        ..Default::default()
                    }),
                    ..claim_req("w", T0 + 10, 1)
                })
                .await
            })
        };
        let submits: Vec<_> = (0..30)
            .map(|i| {
                let s = s.clone();
                tokio::spawn(
                    async move { s.submit(tasks(vec![task(&format!("r{round}-{i}"))])).await },
                )
            })
            .collect();
        assert!(
            bad.await.unwrap().is_err(),
            "round {round}: the bad claim was accepted"
        );
        for h in submits {
            h.await.unwrap().unwrap_or_else(|e| {
                panic!("round {round}: a submit failed with the claim's error: {e}")
            });
            submitted += 1;
        }
    }
    let page = s
        .list(&TaskFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.len(), submitted);
}

/// A task key shared by two submissions written together, the first of
/// which is refused (a missing dependency): the second's task is stored
/// under its own id, not answered by the refused task's id, which is never
/// stored.
async fn a_refused_submission_answers_no_task_by_its_key(b: &Backend) {
    let s = b.open().await;
    for round in 0..20 {
        let key = format!("task-key-{round}");
        let ghost = task("ghost");
        let mut x = after(task("x"), &[&ghost], Condition::Success);
        x.idempotency_key = Some(key.clone());
        let mut y = task("y");
        y.idempotency_key = Some(key.clone());
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (s1, s2, b1, b2) = (s.clone(), s.clone(), barrier.clone(), barrier.clone());
        let h1 = tokio::spawn(async move {
            b1.wait().await;
            s1.submit(tasks(vec![x])).await
        });
        let y2 = y.clone();
        let h2 = tokio::spawn(async move {
            b2.wait().await;
            s2.submit(tasks(vec![y2])).await
        });
        match h1.await.unwrap() {
            Err(e) => assert!(e.to_string().contains("depends_on[0]"), "{e}"),
            Ok(a) => assert_eq!(a[0].id, y.id, "round {round}: answered by the stored task"),
        }
        let stored = h2.await.unwrap().unwrap();
        assert_eq!(stored[0].id, y.id, "round {round}: {stored:?}");
        assert!(stored[0].created, "round {round}: {stored:?}");
        assert!(s.get(&y.id).await.unwrap().is_some(), "round {round}");
    }
    assert_chain_ok(&s).await;
}

/// A keyed submission the writer refuses (a dependency that does not
/// exist) and a valid one with the same key, sent at once, often land in
/// one write batch: the valid one is stored either way.
async fn a_refused_keyed_submission_does_not_fail_another_with_its_key(b: &Backend) {
    let s = b.open().await;
    for round in 0..20 {
        let key = format!("k-{round}");
        let ghost = task("ghost");
        let (_, bad) = keyed_workflow(
            "w",
            &key,
            vec![after(task("x"), &[&ghost], Condition::Success)],
        );
        let (good_id, good) = keyed_workflow("w", &key, vec![task("y")]);
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let (s1, s2, b1, b2) = (s.clone(), s.clone(), barrier.clone(), barrier.clone());
        let h1 = tokio::spawn(async move {
            b1.wait().await;
            s1.submit(bad).await
        });
        let h2 = tokio::spawn(async move {
            b2.wait().await;
            s2.submit(good).await
        });
        // The bad one is refused, or, when the good one was stored before
        // it, answered by the key like any repeat.
        match h1.await.unwrap() {
            Err(e) => assert!(e.to_string().contains("depends_on[0]"), "{e}"),
            Ok(a) => assert_eq!(a[0].workflow_id.as_deref(), Some(good_id.as_str())),
        }
        let stored = h2.await.unwrap().unwrap();
        assert!(stored[0].created, "round {round}: {stored:?}");
        assert_eq!(
            s.workflow_by_key(&key).await.unwrap().unwrap().id,
            good_id,
            "round {round}"
        );
    }
    assert_chain_ok(&s).await;
}

/// A task with its attempts, a workflow with its tasks, and the queue's
/// numbers are each read as of one commit, while another caller finishes
/// tasks one commit at a time. Read in separate steps, a task could show
/// `running` beside the attempt that finished it, a workflow a done count
/// its tasks do not add up to, or the counts by status disagree with the
/// counts by project.
async fn reads_of_a_task_a_workflow_and_the_stats_see_one_moment(b: &Backend) {
    let s = b.open().await;
    let list: Vec<NewTask> = (0..150)
        .map(|i| {
            let mut t = task(&format!("moment-{i}"));
            t.project = Some("moment".into());
            t
        })
        .collect();
    let (wid, sub) = workflow("one-moment", list);
    s.submit(sub).await.unwrap();
    let claimed = s.claim(claim_req("w1", T0, 200)).await.unwrap();
    assert_eq!(claimed.len(), 150);
    let ids: Vec<String> = claimed.iter().map(|c| c.id.clone()).collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The task being finished: the one whose reads can straddle a commit.
    let current = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let finisher = {
        let (s, done, current) = (s.clone(), done.clone(), current.clone());
        tokio::spawn(async move {
            for (i, c) in claimed.iter().enumerate() {
                current.store(i, std::sync::atomic::Ordering::Release);
                let status = if i % 3 == 0 {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Succeeded
                };
                s.finish(finish(&c.id, c.attempt, "w1", T0 + 10, status))
                    .await
                    .unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Release);
        })
    };
    let mut reads = 0usize;
    while !done.load(std::sync::atomic::Ordering::Acquire) || reads < 50 {
        let id = &ids[current.load(std::sync::atomic::Ordering::Acquire)];
        let (t, attempts) = s.task_with_attempts(id).await.unwrap().unwrap();
        let recorded = if t.status.is_terminal() {
            t.attempts
        } else {
            t.attempts - 1
        };
        assert_eq!(
            attempts.len() as u32,
            recorded,
            "{id} is {} after {} attempts, with {} recorded",
            t.status,
            t.attempts,
            attempts.len()
        );
        let d = s.workflow_detail(&wid).await.unwrap().unwrap();
        let terminal = d.tasks.iter().filter(|t| t.status.is_terminal()).count() as u64;
        assert_eq!(d.workflow.tasks_done, terminal, "workflow done count");
        let running = d.counts.get(&TaskStatus::Running).copied().unwrap_or(0);
        assert_eq!(running + terminal, 150, "{:?}", d.counts);
        let st = s.stats(T0 + 20).await.unwrap();
        assert_eq!(
            st.by_project.get("moment"),
            Some(&st.tasks),
            "counts by project against counts by status"
        );
        let leases = st.leases_by_worker.get("w1").copied().unwrap_or(0);
        assert_eq!(
            leases,
            st.tasks.get(&TaskStatus::Running).copied().unwrap_or(0),
            "leases against running tasks"
        );
        reads += 1;
    }
    finisher.await.unwrap();
    let d = s.workflow_detail(&wid).await.unwrap().unwrap();
    assert_eq!(d.workflow.tasks_done, 150);
    assert!(d.workflow.status.is_terminal(), "{:?}", d.workflow.status);
    assert!(reads >= 50);
}

/// A task cancelled while it waited, then retried, waits again for what it
/// waited for: a dependency still running (it stays `pending` and is not
/// claimed until that one succeeds), a dependency that failed (it is
/// skipped again, since its condition cannot hold) and its `at` time.
async fn a_retried_task_waits_for_its_dependencies_and_its_time_again(b: &Backend) {
    let s = b.open().await;
    let a = task("dep-a");
    let later = after(task("later"), &[&a], Condition::Success);
    let f = task("dep-f");
    let doomed = after(task("doomed"), &[&f], Condition::Success);
    let mut timed = task("timed");
    timed.run_at = T0 + 3_600_000;
    let (_wid, sub) = workflow(
        "retry-waits",
        vec![
            a.clone(),
            later.clone(),
            f.clone(),
            doomed.clone(),
            timed.clone(),
        ],
    );
    s.submit(sub).await.unwrap();
    let claimed = s.claim(claim_req("w1", T0, 10)).await.unwrap();
    let mut names: Vec<&str> = claimed.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["dep-a", "dep-f"]);
    for t in [&later, &doomed, &timed] {
        let c = s.cancel(&t.id, T0 + 1, None).await.unwrap();
        assert_eq!(c.status, TaskStatus::Cancelled, "{}", t.name);
    }
    // Its dependency is still running: it waits for it.
    let r = s.retry(&later.id, T0 + 2).await.unwrap();
    assert_eq!(r.status, TaskStatus::Pending);
    // Its time has not come: it waits for it.
    let r = s.retry(&timed.id, T0 + 2).await.unwrap();
    assert_eq!(r.status, TaskStatus::Pending);
    assert_eq!(r.run_at, Timestamp(T0 + 3_600_000));
    assert!(
        s.claim(claim_req("w1", T0 + 3, 10))
            .await
            .unwrap()
            .is_empty()
    );
    // Its dependency failed: the condition cannot hold, so it is skipped.
    let fc = claimed.iter().find(|c| c.name == "dep-f").unwrap();
    s.finish(finish(&f.id, fc.attempt, "w1", T0 + 4, TaskStatus::Failed))
        .await
        .unwrap();
    let r = s.retry(&doomed.id, T0 + 5).await.unwrap();
    assert_eq!(r.status, TaskStatus::Skipped, "{r:?}");
    // Once its dependency succeeds, the waiting one is ready.
    let ac = claimed.iter().find(|c| c.name == "dep-a").unwrap();
    s.finish(finish(
        &a.id,
        ac.attempt,
        "w1",
        T0 + 6,
        TaskStatus::Succeeded,
    ))
    .await
    .unwrap();
    let next = s.claim(claim_req("w1", T0 + 7, 10)).await.unwrap();
    assert_eq!(
        next.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["later"]
    );
    // And the timed one at its time.
    let at_time = s.claim(claim_req("w1", T0 + 3_600_001, 10)).await.unwrap();
    assert_eq!(
        at_time.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        ["timed"]
    );
}

/// Cancelling a workflow cancels its waiting tasks too; retrying one task
/// of it would reopen the workflow without them, so it is refused.
async fn a_task_of_a_cancelled_workflow_is_not_retried(b: &Backend) {
    let s = b.open().await;
    let a = task("first");
    let then = after(task("then"), &[&a], Condition::Success);
    let (wid, sub) = workflow("cancelled-run", vec![a.clone(), then.clone()]);
    s.submit(sub).await.unwrap();
    assert_eq!(s.claim(claim_req("w1", T0, 10)).await.unwrap().len(), 1);
    s.cancel_workflow(&wid, T0 + 1, None).await.unwrap();
    let err = s.retry(&a.id, T0 + 2).await.unwrap_err();
    assert!(matches!(err, Error::Conflict(_)), "{err}");
    assert!(err.to_string().contains("was cancelled"), "{err}");
    let w = s.workflow(&wid).await.unwrap().unwrap();
    assert_eq!(w.status.as_str(), "cancelled");
    assert_eq!(
        s.get(&a.id).await.unwrap().unwrap().status,
        TaskStatus::Cancelled
    );
}

/// A workflow whose task is skipped because a dependency outside it failed
/// did not do its work: it fails (and is cancelled for a cancelled one).
/// A skip by design stays a success: a failure handler of an outside task
/// that succeeded. A retry of the outside task reopens the workflow, which
/// then succeeds.
async fn a_skip_caused_outside_the_workflow_ends_it_as_the_cause_did(b: &Backend) {
    let s = b.open().await;
    let upstream = task("upstream");
    let lone = task("lone");
    s.submit(tasks(vec![upstream.clone(), lone.clone()]))
        .await
        .unwrap();
    let needs = after(task("needs-upstream"), &[&upstream], Condition::Success);
    let inner = after(task("inner"), &[&needs], Condition::Success);
    let own = task("own");
    let (failing, sub) = workflow("needs-upstream", vec![needs.clone(), inner.clone(), own]);
    s.submit(sub).await.unwrap();
    let handler = after(task("on-lone-failure"), &[&lone], Condition::Failure);
    let (by_design, sub) = workflow("handler", vec![handler.clone(), task("other")]);
    s.submit(sub).await.unwrap();
    // upstream fails, lone succeeds (the claim takes the oldest first).
    let claimed = s.claim(claim_req("w1", T0 + 10, 1)).await.unwrap();
    assert_eq!(claimed[0].id, upstream.id);
    s.finish(finish(&upstream.id, 1, "w1", T0 + 11, TaskStatus::Failed))
        .await
        .unwrap();
    for _ in 0..3 {
        run_ready(&s, T0 + 20, TaskStatus::Succeeded).await;
    }
    assert_eq!(status(&s, &needs.id).await, TaskStatus::Skipped);
    assert_eq!(status(&s, &inner.id).await, TaskStatus::Skipped);
    assert_eq!(status(&s, &handler.id).await, TaskStatus::Skipped);
    let w = s.workflow(&failing).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Failed, "{w:?}");
    let w = s.workflow(&by_design).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Succeeded, "{w:?}");

    // Retried, the upstream task succeeds and so does the workflow.
    s.retry(&upstream.id, T0 + 30).await.unwrap();
    let w = s.workflow(&failing).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Running, "{w:?}");
    for i in 0..3 {
        run_ready(&s, T0 + 40 + i, TaskStatus::Succeeded).await;
    }
    let w = s.workflow(&failing).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Succeeded, "{w:?}");

    // A cancelled outside dependency cancels the workflow it held up.
    let held = task("held");
    s.submit(tasks(vec![held.clone()])).await.unwrap();
    let waits = after(task("waits"), &[&held], Condition::Success);
    let (cancelled, sub) = workflow("waits-for-held", vec![waits.clone()]);
    s.submit(sub).await.unwrap();
    s.cancel(&held.id, T0 + 100, Some("not needed".into()))
        .await
        .unwrap();
    assert_eq!(status(&s, &waits.id).await, TaskStatus::Skipped);
    let w = s.workflow(&cancelled).await.unwrap().unwrap();
    assert_eq!(w.status, task_queue::WorkflowStatus::Cancelled, "{w:?}");
    assert_chain_ok(&s).await;
}

/// A claim with a scope (`task-queue run FILE`) takes only the tasks it
/// names, in the usual order, also the claim that comes with a finish.
async fn a_scoped_claim_takes_only_its_tasks(b: &Backend) {
    let s = b.open().await;
    let list: Vec<NewTask> = (0..4).map(|i| task(&format!("t{i}"))).collect();
    s.submit(tasks(list.clone())).await.unwrap();
    let only = std::sync::Arc::new(vec![list[3].id.clone(), list[1].id.clone()]);
    let scoped = |limit| ClaimRequest {
        only: Some(only.clone()),
        ..claim_req("w1", T0 + 10, limit)
    };
    let first = s.claim(scoped(1)).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].id, list[1].id, "oldest of the scope first");
    let (_, next) = s
        .finish_and_claim(
            finish(&list[1].id, 1, "w1", T0 + 11, TaskStatus::Succeeded),
            scoped(5),
        )
        .await
        .unwrap();
    let got: Vec<&str> = next.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(got, vec![list[3].id.as_str()]);
    assert!(s.claim(scoped(5)).await.unwrap().is_empty());
    assert_eq!(status(&s, &list[0].id).await, TaskStatus::Queued);
    assert_eq!(status(&s, &list[2].id).await, TaskStatus::Queued);
    let rest = s.claim(claim_req("w2", T0 + 20, 5)).await.unwrap();
    assert_eq!(rest.len(), 2);
}

/// `worker --until-idle` asks what is runnable: a task whose time has not
/// come is not, until it comes.
async fn what_is_runnable_leaves_out_tasks_waiting_for_their_time(b: &Backend) {
    let s = b.open().await;
    let mut later = task("later");
    later.run_at = T0 + 60_000;
    s.submit(tasks(vec![task("now"), later.clone()]))
        .await
        .unwrap();
    assert_eq!(status(&s, &later.id).await, TaskStatus::Pending);
    let req = |now| claim_req("w1", now, 10);
    assert_eq!(s.runnable_count(&req(T0 + 1)).await.unwrap(), 1);
    assert_eq!(s.runnable_count(&req(T0 + 60_000)).await.unwrap(), 2);
}
