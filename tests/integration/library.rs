//! The library API: builder, submit, wait, list, cancel, handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use task_queue::model::{Limits, RetryPolicy, TaskStatus};
use task_queue::{Config, HandlerError, ListOptions, Task, TaskQueue};

async fn queue(dir: &tempfile::TempDir) -> TaskQueue {
    let mut config = Config::default();
    config.storage.path = dir.path().join("lib.db");
    config.execution.poll_interval = "50ms".parse().unwrap();
    TaskQueue::open_with(config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_submit_wait_list() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let engine = q.start();
    let t = q
        .submit(
            Task::new("build-api")
                .with_command("echo built > \"$TASK_QUEUE_RESULT.tmp\"; echo '{\"ok\":true}' > \"$TASK_QUEUE_RESULT\"")
                .with_project("api")
                .with_tag("ci")
                .with_priority(5)
                .with_timeout(Duration::from_secs(30))
                .with_retry(RetryPolicy {
                    max_attempts: Some(2),
                    ..RetryPolicy::default()
                })
                .with_limits(Limits::default()),
        )
        .await
        .unwrap();
    assert!(t.created);
    let done = q.wait(&t.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(done.result.unwrap().output, Some(json!({"ok": true})));
    assert_eq!(done.spec.timeout.unwrap().0, Duration::from_secs(30));

    let page = q
        .list(ListOptions {
            project: Some("api".into()),
            tag: Some("ci".into()),
            ..ListOptions::default()
        })
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1);
    let none = q
        .list(ListOptions {
            statuses: vec![TaskStatus::Failed],
            ..ListOptions::default()
        })
        .await
        .unwrap();
    assert!(none.tasks.is_empty());
    engine.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_walks_every_task_once() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let specs: Vec<Task> = (0..25)
        .map(|i| Task::new(format!("t{i}")).with_command("true"))
        .collect();
    q.submit_batch(specs).await.unwrap();
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = q
            .list(ListOptions {
                limit: Some(10),
                cursor: cursor.clone(),
                ..ListOptions::default()
            })
            .await
            .unwrap();
        seen.extend(page.tasks.into_iter().map(|t| t.name));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen.len(), 25);
    assert_eq!(seen[0], "t24", "newest first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_running_command_promptly() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let engine = q.start();
    let t = q
        .submit(Task::new("long").with_command("sleep 30"))
        .await
        .unwrap();
    for _ in 0..200 {
        if q.get(&t.id).await.unwrap().status == TaskStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    let c = q.cancel(&t.id).await.unwrap();
    assert_eq!(c.status, TaskStatus::Cancelled);
    // The attempt is recorded once its process group is gone.
    for _ in 0..200 {
        if !q.attempts(&t.id).await.unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let attempts = q.attempts(&t.id).await.unwrap();
    assert_eq!(attempts.len(), 1);
    assert_eq!(attempts[0].status.as_str(), "cancelled");
    assert!(started.elapsed() < Duration::from_secs(3));
    let err = q
        .cancel("01a21990-b7b0-716b-8a47-009bbaa5872d")
        .await
        .unwrap_err();
    assert_eq!(err.code(), "not_found");
    engine.shutdown(Duration::from_secs(1)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_handlers_run_external_tasks_with_retries() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    q.register_handler("resize-image", move |ctx| {
        let c = c.clone();
        async move {
            let n = c.fetch_add(1, Ordering::SeqCst);
            if n == 0 {
                return Err(HandlerError::Retryable("cache cold".into()));
            }
            let w = ctx.parameters()["width"].as_i64().unwrap_or(0);
            Ok(json!({"width": w / 2, "attempt": ctx.attempt}))
        }
    });
    let t = q
        .submit(
            Task::new("resize-image")
                .with_kind(task_queue::model::TaskKind::External)
                .with_parameters(json!({"width": 800}))
                .with_retry(RetryPolicy {
                    max_attempts: Some(3),
                    initial_delay: Some("10ms".parse().unwrap()),
                    ..RetryPolicy::default()
                }),
        )
        .await
        .unwrap();
    // An external task nobody handles stays queued for a worker to claim.
    let other = q
        .submit(Task::new("human-review").with_kind(task_queue::model::TaskKind::External))
        .await
        .unwrap();
    q.run_until_idle().await.unwrap();
    let done = q.get(&t.id).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(done.attempts, 2);
    assert_eq!(
        done.result.unwrap().output,
        Some(json!({"width": 400, "attempt": 2}))
    );
    assert_eq!(q.get(&other.id).await.unwrap().status, TaskStatus::Queued);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_submit_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let err = q
        .submit_batch(vec![
            Task::new("ok").with_command("true"),
            Task::new("bad name").with_command("true"),
        ])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tasks[1].name"), "{err}");
    assert!(
        q.list(ListOptions::default())
            .await
            .unwrap()
            .tasks
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_is_in_wal_mode_and_claims_use_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = task_queue::store::sqlite::SqliteStore::open(
        &dir.path().join("wal.db"),
        task_queue::config::Durability::Durable,
        1,
    )
    .await
    .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(store.read_pool())
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    let plan = task_queue::store::sqlite::explain_claim(store.read_pool())
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("USING INDEX tasks_ready"), "{plan}");
    assert!(
        !plan.contains("TEMP B-TREE"),
        "the claim must not sort: {plan}"
    );
    // A scoped claim (`task-queue run`) looks its tasks up by id instead
    // of walking the ready tasks ahead of them.
    let scoped = task_queue::store::ClaimRequest {
        only: Some(std::sync::Arc::new(vec!["a".into(), "b".into()])),
        ..task_queue::store::sqlite::engine_claim_request()
    };
    let plan = task_queue::store::sqlite::explain_claim_of(store.read_pool(), &scoped)
        .await
        .unwrap()
        .join("\n");
    assert!(plan.contains("sqlite_autoindex_tasks_1 (id=?)"), "{plan}");
    assert!(!plan.contains("tasks_ready"), "{plan}");
    // Lookups by project use the partial index (only tasks with a project
    // are in it), newest first without a sort.
    let rows: Vec<(i64, i64, i64, String)> = sqlx::query_as(
        "EXPLAIN QUERY PLAN SELECT seq FROM tasks WHERE 1 = 1 AND project = ? \
         ORDER BY seq DESC LIMIT 50",
    )
    .bind("api")
    .fetch_all(store.read_pool())
    .await
    .unwrap();
    let plan: Vec<String> = rows.into_iter().map(|r| r.3).collect();
    let plan = plan.join("\n");
    assert!(plan.contains("INDEX tasks_project (project=?)"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "{plan}");
}

/// 100 tasks with 2 KB descriptions, named from `busy-{from}` on.
fn busy_tasks(from: usize) -> Vec<Task> {
    (0..100)
        .map(|i| {
            Task::new(format!("busy-{}", from + i))
                .with_argv(["true"])
                .with_description("x".repeat(2_000))
        })
        .collect()
}

/// A busy durable store has its WAL filled ahead of the writer (so commits
/// overwrite the file instead of growing it), and everything it committed
/// before and after the fill is there when the database is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_store_pre_sizes_its_wal_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("busy.db");
    let wal = dir.path().join("busy.db-wal");
    let mut config = Config::default();
    config.storage.path = db.clone();
    let q = TaskQueue::open_with(config.clone()).await.unwrap();
    let mut submitted = 0usize;
    // One checkpoint interval (10,000 pages) and slack, in bytes.
    let target = 32 + 16_000 * (4096 + 24);
    while std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) < target {
        q.submit_batch(busy_tasks(submitted)).await.unwrap();
        submitted += 100;
        assert!(
            submitted <= 20_000,
            "the WAL was not pre-sized: {} bytes after {submitted} tasks",
            std::fs::metadata(&wal).unwrap().len()
        );
    }
    // Commits go on past the zeros.
    for i in 0..50 {
        q.submit(Task::new(format!("after-{i}")).with_argv(["true"]))
            .await
            .unwrap();
    }
    // And through more than one checkpoint interval: the checkpoints
    // beside the writer copy the WAL back and it starts over inside the
    // filled size instead of growing.
    let filled = std::fs::metadata(&wal).unwrap().len();
    for _ in 0..200 {
        q.submit_batch(busy_tasks(submitted)).await.unwrap();
        submitted += 100;
    }
    assert_eq!(
        std::fs::metadata(&wal).unwrap().len(),
        filled,
        "the WAL grew past its filled size"
    );
    drop(q);
    let q = TaskQueue::open_with(config).await.unwrap();
    let counts = q.counts().await.unwrap();
    assert_eq!(
        counts.get(&TaskStatus::Queued).copied().unwrap_or(0) as usize,
        submitted + 50,
        "{counts:?}"
    );
    let audit = q.verify_audit().await.unwrap();
    assert!(audit.ok, "{audit:?}");
    assert_eq!(audit.events as usize, submitted + 50);
}

/// The lists of a claim and a listing become query parameters: too many
/// names or tags are refused naming the field, and repeated statuses are
/// asked for once, instead of a storage error from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_filter_lists_are_refused_or_folded() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let lease = Duration::from_secs(30);
    let many = |n: usize| (0..n).map(|i| format!("n{i}")).collect::<Vec<_>>();
    for (filter, field) in [
        (
            task_queue::ClaimFilter {
                names: many(1001),
                ..Default::default()
            },
            "names",
        ),
        (
            task_queue::ClaimFilter {
                tags: many(33),
                ..Default::default()
            },
            "tags",
        ),
    ] {
        match q.claim("w", filter, lease, 1).await {
            Err(task_queue::Error::InvalidInput { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                assert!(message.contains("at most"), "{message}");
            }
            other => panic!("{field}: {other:?}"),
        }
    }
    let ok = task_queue::ClaimFilter {
        names: many(1000),
        ..Default::default()
    };
    assert!(q.claim("w", ok, lease, 1).await.unwrap().is_empty());
    q.submit(Task::new("one").with_command("true"))
        .await
        .unwrap();
    let page = q
        .list(ListOptions {
            statuses: vec![TaskStatus::Queued; 40_000],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 1);
}

/// Bounds and field names the interfaces rely on: a search limit of 0, an
/// approver name of 300 bytes, a lone task depending on a name, a listing
/// by a workflow id that is not one. Each error names the field as the
/// caller wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_field_as_the_caller_wrote_it() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let field_of = |r: task_queue::Error| match r {
        task_queue::Error::InvalidInput { field, message } => (field, message),
        other => panic!("{other:?}"),
    };
    let (f, m) = field_of(
        q.search(task_queue::search::SearchRequest {
            query: "deploy".into(),
            limit: 0,
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert_eq!((f.as_str(), m.as_str()), ("limit", "must be 1..=50, got 0"));

    let mut gate = Task::new("gate").with_command("true");
    gate.requires_approval = true;
    let gate = q.submit(gate).await.unwrap();
    let (f, _) = field_of(
        q.approve(&gate.id, true, None, Some("x".repeat(300)))
            .await
            .unwrap_err(),
    );
    assert_eq!(f, "by");

    let mut lone = Task::new("lone").with_command("true");
    lone.depends_on = vec![task_queue::model::Dependency::Name("nope".into())];
    let (f, m) = field_of(q.submit(lone).await.unwrap_err());
    assert_eq!(f, "depends_on[0]", "{m}");
    assert!(m.contains("by their ids"), "{m}");

    // An unknown id: `depends_on[0]` for a lone task, but in a workflow,
    // even of one task, the task's index is part of the field.
    let ghost = uuid::Uuid::now_v7().to_string();
    let mut lone = Task::new("lone").with_command("true");
    lone.depends_on = vec![task_queue::model::Dependency::Name(ghost.clone())];
    let (f, m) = field_of(q.submit(lone.clone()).await.unwrap_err());
    assert_eq!(f, "depends_on[0]", "{m}");
    let (f, m) = field_of(
        q.submit_workflow(task_queue::model::WorkflowSpec::new("one").add_task(lone))
            .await
            .unwrap_err(),
    );
    assert_eq!(f, "tasks[0].depends_on[0]", "{m}");
    assert!(m.contains(&ghost), "{m}");

    let (f, _) = field_of(
        q.list(ListOptions {
            workflow_id: Some("notanid".into()),
            ..Default::default()
        })
        .await
        .unwrap_err(),
    );
    assert_eq!(f, "workflow_id");
}

/// An external worker's output has the same cap as a command's result
/// file; the task stays claimed, and a smaller output completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_external_output_is_refused_and_the_task_stays_yours() {
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let t = q
        .submit(Task::new("ext").with_kind(task_queue::model::TaskKind::External))
        .await
        .unwrap();
    let got = q
        .claim("w", Default::default(), Duration::from_secs(30), 1)
        .await
        .unwrap();
    assert_eq!(got[0].task_id, t.id);
    let big = json!({"blob": "y".repeat(5 << 20)});
    match q.complete(&t.id, "w", Some(big)).await {
        Err(task_queue::Error::InvalidInput { field, message }) => {
            assert_eq!(field, "output");
            assert!(message.contains("at most 4194304"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let done = q
        .complete(&t.id, "w", Some(json!({"ok": true})))
        .await
        .unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
}

/// A keyed workflow with a cron schedule, submitted twice through the
/// library: one workflow, one schedule; the schedule's runs carry no key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_scheduled_workflow_is_stored_once() {
    use task_queue::model::{Schedule, WorkflowSpec};
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let spec = || {
        WorkflowSpec::new("hourly-report")
            .with_idempotency_key("hourly-report-v1")
            .with_schedule(Schedule {
                at: None,
                cron: Some("0 0 * * * *".into()),
                timezone: None,
            })
            .add_task(Task::new("report").with_command("true"))
    };
    let first = q.submit_workflow(spec()).await.unwrap();
    assert!(first.created);
    let sid = first
        .schedule_id
        .clone()
        .expect("a cron workflow has a schedule");
    let again = q.submit_workflow(spec()).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.workflow_id, first.workflow_id);
    assert_eq!(again.schedule_id.as_deref(), Some(sid.as_str()));
    assert_eq!(again.tasks[0].id, first.tasks[0].id);
    let schedules = q.list_schedules().await.unwrap();
    assert_eq!(schedules.len(), 1, "{schedules:?}");
    assert!(
        !schedules[0]
            .template
            .to_string()
            .contains("hourly-report-v1"),
        "the runs' template carries no key: {}",
        schedules[0].template
    );
    let w = q.workflow(&first.workflow_id).await.unwrap();
    assert_eq!(w.idempotency_key.as_deref(), Some("hourly-report-v1"));
    // A key of the wrong length is refused, naming the field.
    let err = q
        .submit_workflow(spec().with_idempotency_key(""))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("idempotency_key"), "{err}");
    // Keys count characters, not bytes; NUL is refused (PostgreSQL cannot
    // store it in text), for a workflow's fields and a task's alike.
    let wide = "é".repeat(256);
    let w = q
        .submit_workflow(spec().with_idempotency_key(wide.clone()))
        .await
        .unwrap();
    assert!(w.created);
    for (field, bad) in [
        ("idempotency_key", spec().with_idempotency_key("a\0b")),
        ("project", spec().with_project("a\0b")),
        ("tags[0]", spec().with_tag("a\0b")),
        ("description", spec().with_description("a\0b")),
    ] {
        let err = q.submit_workflow(bad).await.unwrap_err().to_string();
        assert!(err.contains(field) && err.contains("NUL"), "{field}: {err}");
    }
    let err = q
        .submit(
            Task::new("t")
                .with_command("true")
                .with_idempotency_key("a\0b"),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("idempotency_key") && err.contains("NUL"),
        "{err}"
    );
    let err = q
        .submit(Task::new("t").with_command("true").with_project("a\0b"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("project") && err.contains("NUL"), "{err}");
}

/// One key submitted many times at once (so some land in one write batch),
/// with a task whose own key matches a task of another workflow: every
/// answer names the one workflow stored, and only one says it was created.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_workflow_key_submitted_at_once_stores_one_workflow() {
    use task_queue::model::WorkflowSpec;
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    q.submit_workflow(
        WorkflowSpec::new("base").add_task(
            Task::new("shared")
                .with_command("true")
                .with_idempotency_key("shared"),
        ),
    )
    .await
    .unwrap();
    for round in 0..20 {
        let spec = move || {
            WorkflowSpec::new("release")
                .with_idempotency_key(format!("rel-{round}"))
                .add_task(
                    Task::new("shared")
                        .with_command("true")
                        .with_idempotency_key("shared"),
                )
                .add_task(Task::new("own").with_command("true"))
        };
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut handles = Vec::new();
        for _ in 0..16 {
            let (q, s, b) = (q.clone(), spec(), barrier.clone());
            handles.push(tokio::spawn(async move {
                b.wait().await;
                q.submit_workflow(s).await.unwrap()
            }));
        }
        let mut outs = Vec::new();
        for h in handles {
            outs.push(h.await.unwrap());
        }
        assert_eq!(
            outs.iter().filter(|o| o.created).count(),
            1,
            "round {round}"
        );
        let first = outs.iter().find(|o| o.created).unwrap();
        let w = q.workflow(&first.workflow_id).await.unwrap();
        assert_eq!(w.tasks_total, 1);
        for o in &outs {
            assert_eq!(o.workflow_id, first.workflow_id, "round {round}");
            if !o.created {
                // The repeat lists the workflow's own task.
                assert_eq!(o.tasks.len(), 1, "{o:?}");
                assert_eq!(o.tasks[0].name, "own");
            }
        }
    }
}

/// A workflow submitted again answers its status and its tasks' statuses
/// as of one moment, also while its last task is being completed: a
/// finished workflow never lists a task still running, and a running one
/// always lists one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_repeat_answers_its_tasks_as_of_its_status() {
    use task_queue::model::{TaskKind, WorkflowSpec};
    let dir = tempfile::tempdir().unwrap();
    let q = queue(&dir).await;
    let spec = |round: usize| {
        WorkflowSpec::new("repeat")
            .with_idempotency_key(format!("repeat-{round}"))
            .add_task(Task::new("job").with_kind(TaskKind::External))
    };
    let mut repeats = 0;
    for round in 0..30 {
        q.submit_workflow(spec(round)).await.unwrap();
        let claimed = q
            .claim(
                "w",
                task_queue::ClaimFilter::default(),
                Duration::from_secs(30),
                1,
            )
            .await
            .unwrap();
        assert_eq!(claimed.len(), 1);
        let completer = {
            let (q, id) = (q.clone(), claimed[0].task_id.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_micros(300 * (round as u64 % 7))).await;
                q.complete(&id, "w", None).await.unwrap();
            })
        };
        loop {
            let out = q.submit_workflow(spec(round)).await.unwrap();
            assert!(!out.created);
            repeats += 1;
            let all_done = out.tasks.iter().all(|t| t.status.is_terminal());
            assert_eq!(
                out.status.is_terminal(),
                all_done,
                "round {round}: workflow {:?} with tasks {:?}",
                out.status,
                out.tasks.iter().map(|t| t.status).collect::<Vec<_>>()
            );
            if all_done {
                break;
            }
        }
        completer.await.unwrap();
    }
    assert!(repeats >= 30);
}
