//! The orchestration service API on a real SQLite file: the workflow
//! builder, external workers (claim, heartbeat, complete, fail, lease
//! expiry), and cron schedules under an injected clock.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use task_queue::engine::clock::ManualClock;
use task_queue::model::{Condition, Dependency, Schedule, TaskKind, TaskStatus, WorkflowStatus};
use task_queue::{ClaimFilter, Config, Task, TaskQueue, Workflow};

fn config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config::default();
    config.storage.path = dir.path().join("orch.db");
    config.execution.poll_interval = "50ms".parse().unwrap();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builder_workflow_runs_and_draws_its_graph() {
    let dir = tempfile::tempdir().unwrap();
    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let engine = q.start();
    let w = Workflow::new("build-and-test")
        .with_project("api")
        .add_task(Task::new("compile").with_command("true"))
        .add_task(Task::new("unit").with_command("true").depends_on("compile"))
        .add_task(Task::new("report").with_command("true").depends_on("unit"))
        .add_task({
            let mut t = Task::new("on-fail").with_command("true");
            t.depends_on.push(Dependency::Detailed {
                task: "unit".into(),
                condition: Condition::Failure,
            });
            t
        });
    let sub = q.submit_workflow(w).await.unwrap();
    assert_eq!(sub.tasks.len(), 4);
    assert_eq!(sub.tasks[0].status, TaskStatus::Queued);
    assert_eq!(sub.tasks[1].status, TaskStatus::Pending);
    let done = q
        .wait_workflow(&sub.workflow_id, Some(Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(done.status, WorkflowStatus::Succeeded);
    assert_eq!(done.tasks_done, 4);
    let detail = q.get_workflow(&sub.workflow_id).await.unwrap();
    assert_eq!(detail.edges.len(), 3);
    // Tasks take the workflow's project.
    assert!(
        detail
            .tasks
            .iter()
            .all(|t| t.project.as_deref() == Some("api"))
    );
    assert_eq!(detail.counts.get(&TaskStatus::Skipped), Some(&1));
    let mermaid = q.workflow_graph(&sub.workflow_id, "mermaid").await.unwrap();
    assert!(mermaid.contains("flowchart"), "{mermaid}");
    assert!(mermaid.contains("failure"), "{mermaid}");
    let dot = q.workflow_graph(&sub.workflow_id, "dot").await.unwrap();
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(q.workflow_graph(&sub.workflow_id, "png").await.is_err());

    // A later task can depend on a finished one by id.
    let compile = &sub.tasks[0].id;
    let t = q
        .submit(
            Task::new("after")
                .with_command("true")
                .depends_on(compile.as_str()),
        )
        .await
        .unwrap();
    let t = q.wait(&t.id, Some(Duration::from_secs(20))).await.unwrap();
    assert_eq!(t.status, TaskStatus::Succeeded);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_workflow_stops_its_running_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let engine = q.start();
    let sub = q
        .submit_workflow(
            Workflow::new("long")
                .add_task(Task::new("slow").with_command("sleep 30"))
                .add_task(Task::new("next").with_command("true").depends_on("slow")),
        )
        .await
        .unwrap();
    let slow = sub.tasks[0].id.clone();
    for _ in 0..100 {
        if q.get(&slow).await.unwrap().status == TaskStatus::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = std::time::Instant::now();
    let w = q.cancel_workflow(&sub.workflow_id).await.unwrap();
    assert_eq!(w.status, WorkflowStatus::Cancelled);
    for t in &sub.tasks {
        assert_eq!(q.get(&t.id).await.unwrap().status, TaskStatus::Cancelled);
    }
    // The attempt was stopped, not left to run for 30 s.
    let mut stopped = false;
    for _ in 0..100 {
        let a = q.attempts(&slow).await.unwrap();
        if !a.is_empty() {
            stopped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(stopped && started.elapsed() < Duration::from_secs(10));
    // Cancelling again is harmless; cancelling a finished workflow is a conflict.
    q.cancel_workflow(&sub.workflow_id).await.unwrap();
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_workers_claim_heartbeat_complete_and_fail() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let q = TaskQueue::open_with_clock(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let review = q
        .submit(
            Task::new("review")
                .with_kind(TaskKind::External)
                .with_project("docs")
                .with_tag("agent")
                .with_parameters(json!({"pr": 42}))
                .with_validation(json!({"type": "object", "required": ["verdict"]})),
        )
        .await
        .unwrap();
    let flaky = q
        .submit(
            Task::new("flaky")
                .with_kind(TaskKind::External)
                .with_max_attempts(2),
        )
        .await
        .unwrap();
    let filter = |name: &str| ClaimFilter {
        names: vec![name.into()],
        ..ClaimFilter::default()
    };
    // Filters: wrong project or tag claims nothing.
    let none = q
        .claim(
            "agent-1",
            ClaimFilter {
                project: Some("other".into()),
                ..ClaimFilter::default()
            },
            Duration::from_secs(30),
            10,
        )
        .await
        .unwrap();
    assert!(none.is_empty());
    let got = q
        .claim(
            "agent-1",
            ClaimFilter {
                tags: vec!["agent".into()],
                project: Some("docs".into()),
                ..ClaimFilter::default()
            },
            Duration::from_secs(30),
            10,
        )
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].task_id, review.id);
    assert_eq!(got[0].spec.parameters, Some(json!({"pr": 42})));
    // Another worker cannot report for it.
    let err = q
        .complete(&review.id, "agent-2", Some(json!({})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict");
    // Output that breaks the validation schema is refused; the task stays claimed.
    let err = q
        .complete(&review.id, "agent-1", Some(json!({"note": "lgtm"})))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "invalid_input");
    assert!(err.to_string().contains("output"), "{err}");
    clock.advance_ms(20_000);
    let until = q
        .heartbeat(&review.id, "agent-1", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(until.0, clock_now(&clock) + 30_000);
    clock.advance_ms(20_000);
    // The heartbeat kept the lease: nothing was reclaimed.
    assert!(
        q.claim("agent-2", filter("review"), Duration::from_secs(30), 1)
            .await
            .unwrap()
            .is_empty()
    );
    let t = q
        .complete(&review.id, "agent-1", Some(json!({"verdict": "approve"})))
        .await
        .unwrap();
    assert_eq!(t.status, TaskStatus::Succeeded);
    assert_eq!(
        t.result.unwrap().output,
        Some(json!({"verdict": "approve"}))
    );

    // Retryable failure goes back to the queue; the last attempt fails for good.
    let c = q
        .claim("agent-1", filter("flaky"), Duration::from_secs(10), 1)
        .await
        .unwrap();
    assert_eq!(c[0].attempt, 1);
    let t = q
        .fail(&flaky.id, "agent-1", "upstream 503".into(), true)
        .await
        .unwrap();
    assert_eq!(t.status, TaskStatus::Retrying);
    clock.advance_ms(10 * 60_000);
    let c = q
        .claim("agent-1", filter("flaky"), Duration::from_secs(10), 1)
        .await
        .unwrap();
    assert_eq!(c[0].attempt, 2);
    // The lease expires: another worker's claim takes the task back (attempt counted).
    clock.advance_ms(11_000);
    assert!(
        q.claim("agent-2", filter("flaky"), Duration::from_secs(10), 1)
            .await
            .unwrap()
            .is_empty(),
        "no attempts left: it failed instead of coming back"
    );
    let t = q.get(&flaky.id).await.unwrap();
    assert_eq!(t.status, TaskStatus::Failed);
    let err = q
        .heartbeat(&flaky.id, "agent-1", Duration::from_secs(10))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "conflict");
    let attempts = q.attempts(&flaky.id).await.unwrap();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[1].status.as_str(), "lost");

    // Bad input names the field.
    let err = q
        .claim(
            "bad worker!",
            ClaimFilter::default(),
            Duration::from_secs(10),
            1,
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("worker_id"), "{err}");
    let err = q
        .claim("w", ClaimFilter::default(), Duration::from_millis(10), 1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("lease"), "{err}");
    assert!(q.verify_audit().await.unwrap().ok);
}

fn clock_now(c: &ManualClock) -> i64 {
    use task_queue::engine::clock::Clock;
    c.now_ms()
}

/// An expired lease with attempts left returns the task to the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_external_lease_returns_the_task() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(1_800_000_000_000);
    let q = TaskQueue::open_with_clock(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let t = q
        .submit(Task::new("label").with_kind(TaskKind::External))
        .await
        .unwrap();
    let c = q
        .claim("a", ClaimFilter::default(), Duration::from_secs(5), 1)
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    clock.advance_ms(6_000);
    // The next claim takes the expired lease back: the attempt is counted
    // as lost and the task waits for its backoff.
    let c = q
        .claim("b", ClaimFilter::default(), Duration::from_secs(5), 1)
        .await
        .unwrap();
    assert!(c.is_empty());
    assert_eq!(q.get(&t.id).await.unwrap().status, TaskStatus::Retrying);
    clock.advance_ms(10 * 60_000);
    let c = q
        .claim("b", ClaimFilter::default(), Duration::from_secs(5), 1)
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].task_id, t.id);
    assert_eq!(c[0].attempt, 2);
    let done = q.complete(&t.id, "b", None).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
}

/// A cron workflow fires once per slot; a downtime of many slots fires once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cron_fires_each_slot_and_a_missed_stretch_once() {
    let _machine = crate::common::MACHINE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    // 2027-01-15T08:00:00Z: on a 10-second boundary.
    let t0 = 1_800_000_000_000i64;
    assert_eq!(t0 % 10_000, 0);
    let clock = ManualClock::new(t0 + 1);
    let q = TaskQueue::open_with_clock(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let sub = q
        .submit_workflow(
            Workflow::new("every-10s")
                .with_schedule(Schedule {
                    at: None,
                    cron: Some("*/10 * * * * *".into()),
                    timezone: None,
                })
                .add_task(Task::new("tick").with_command("true")),
        )
        .await
        .unwrap();
    let schedule_id = sub.schedule_id.clone().expect("a schedule");
    let s = q.get_schedule(&schedule_id).await.unwrap();
    assert_eq!(s.next_fire_at.unwrap().0, t0 + 10_000);
    assert_eq!(s.upcoming_run.as_deref(), Some(sub.workflow_id.as_str()));

    let engine = q.start();
    // Generous: on a loaded machine a run can take seconds to be fired,
    // run and recorded (the multi-node test, the heaviest, is kept apart
    // by `common::MACHINE`).
    let runs_done = |q: TaskQueue, n: usize| async move {
        for _ in 0..1200 {
            let page = q
                .list_workflows(vec![WorkflowStatus::Succeeded], None, Some(100), None)
                .await
                .unwrap();
            if page.workflows.len() >= n {
                return page.workflows.len();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("fewer than {n} runs finished");
    };
    // Nothing runs before the slot.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        q.get_workflow(&sub.workflow_id).await.unwrap().tasks[0].status,
        TaskStatus::Pending
    );
    // A run can start (its task is due) before the engine's schedule check
    // has recorded the slot as fired; the clock moves on only once it has,
    // so each step of the test is one slot.
    let fired_up_to = |q: TaskQueue, next: i64| {
        let schedule_id = schedule_id.clone();
        async move {
            for _ in 0..1200 {
                let s = q.get_schedule(&schedule_id).await.unwrap();
                if s.next_fire_at.is_some_and(|t| t.0 >= next) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            panic!("the schedule did not fire the slot before {next}");
        }
    };
    clock.advance_ms(10_000);
    assert_eq!(runs_done(q.clone(), 1).await, 1);
    fired_up_to(q.clone(), t0 + 20_000).await;
    clock.advance_ms(10_000);
    assert_eq!(runs_done(q.clone(), 2).await, 2);
    fired_up_to(q.clone(), t0 + 30_000).await;
    engine.shutdown(Duration::from_secs(5)).await.unwrap();

    // Down for ten slots: on start, the missed run happens once.
    clock.advance_ms(100_000);
    let engine = q.start();
    assert_eq!(runs_done(q.clone(), 3).await, 3);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let page = q
        .list_workflows(vec![WorkflowStatus::Succeeded], None, Some(100), None)
        .await
        .unwrap();
    assert_eq!(page.workflows.len(), 3, "not once per missed slot");
    let s = q.get_schedule(&schedule_id).await.unwrap();
    assert_eq!(s.runs, 3);
    assert!(s.next_fire_at.unwrap().0 > clock_now(&clock));
    // Paused: the upcoming run is cancelled and nothing more fires.
    let s = q.pause_schedule(&schedule_id).await.unwrap();
    assert!(s.paused);
    assert!(s.next_fire_at.is_none());
    clock.advance_ms(60_000);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let page = q
        .list_workflows(vec![WorkflowStatus::Succeeded], None, Some(100), None)
        .await
        .unwrap();
    assert_eq!(page.workflows.len(), 3);
    let s = q.resume_schedule(&schedule_id).await.unwrap();
    assert!(!s.paused);
    assert!(s.next_fire_at.unwrap().0 > clock_now(&clock));
    q.remove_schedule(&schedule_id).await.unwrap();
    assert_eq!(
        q.get_schedule(&schedule_id).await.unwrap_err().code(),
        "not_found"
    );
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(q.verify_audit().await.unwrap().ok);
}

/// A failed task retried after the cause is fixed: what was skipped
/// because of it runs, and the workflow succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrying_a_failed_task_reopens_what_it_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("fixed");
    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let engine = q.start();
    let sub = q
        .submit_workflow(
            Workflow::new("fix-and-retry")
                .add_task(
                    Task::new("check")
                        .with_command(format!("test -f {}", flag.display()))
                        .with_max_attempts(1),
                )
                .add_task(Task::new("deploy").with_command("true").depends_on("check"))
                .add_task(
                    Task::new("announce")
                        .with_command("true")
                        .depends_on("deploy"),
                ),
        )
        .await
        .unwrap();
    let w = q
        .wait_workflow(&sub.workflow_id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.status, WorkflowStatus::Failed);
    let announce = &sub.tasks[2].id;
    assert_eq!(q.get(announce).await.unwrap().status, TaskStatus::Skipped);
    // Only finished, unsuccessful tasks can be retried.
    assert_eq!(q.retry(announce).await.unwrap_err().code(), "conflict");

    // The engine is stopped while the retry is checked, so what the retry
    // did is not raced by a claim.
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    std::fs::write(&flag, "").unwrap();
    let t = q.retry(&sub.tasks[0].id).await.unwrap();
    assert_eq!(t.status, TaskStatus::Queued);
    assert_eq!(t.max_attempts, 2);
    assert_eq!(q.get(announce).await.unwrap().status, TaskStatus::Pending);
    assert_eq!(
        q.workflow(&sub.workflow_id).await.unwrap().status,
        WorkflowStatus::Running
    );
    let engine = q.start();
    let w = q
        .wait_workflow(&sub.workflow_id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(w.status, WorkflowStatus::Succeeded);
    assert_eq!(w.tasks_done, 3);
    let check = q.attempts(&sub.tasks[0].id).await.unwrap();
    assert_eq!(check.len(), 2, "the history of the first attempt stays");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(q.verify_audit().await.unwrap().ok);
}

/// The engine checks schedules when their next slot comes, not only once
/// per poll interval: with a poll far longer than the cron spacing, every
/// slot still fires on time, one run each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedules_fire_at_their_slots_whatever_the_poll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir);
    cfg.execution.poll_interval = "30s".parse().unwrap();
    let q = TaskQueue::open_with(cfg).await.unwrap();
    let sub = q
        .submit_workflow(
            Workflow::new("every-second")
                .with_schedule(Schedule {
                    at: None,
                    cron: Some("* * * * * *".into()),
                    timezone: None,
                })
                .add_task(Task::new("tick").with_command("true")),
        )
        .await
        .unwrap();
    let schedule_id = sub.schedule_id.clone().expect("a schedule");
    let engine = q.start();
    // Within ~4.5 s the poll (30 s) comes once, at start, when no slot is
    // due yet; every fire after that is the engine waking for the slot.
    let start = std::time::Instant::now();
    let mut fires = Vec::new();
    let mut last_runs = 0;
    while start.elapsed() < Duration::from_millis(4500) {
        let s = q.get_schedule(&schedule_id).await.unwrap();
        if s.runs > last_runs {
            last_runs = s.runs;
            fires.push((s.runs, s.last_fired_at.map(|t| t.0)));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
    assert!(
        last_runs >= 3,
        "a schedule firing every second fired {last_runs} times in 4.5 s with a 30 s poll: {fires:?}"
    );
    // One run per slot: consecutive fires are one second apart, none folded.
    let slots: Vec<i64> = fires.iter().filter_map(|(_, at)| *at).collect();
    for w in slots.windows(2) {
        assert_eq!(w[1] - w[0], 1000, "slots fired: {slots:?}");
    }
}

/// Idempotency keys of a scheduled run carry its slot from the first run
/// on, and a run cancelled by a pause before it started gives its keys
/// back: resumed within the same slot, the schedule builds that run again
/// with its task, instead of an empty run matched to the cancelled one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_slot_resumed_in_time_runs_its_keyed_task() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_800_000_000_000i64;
    let clock = ManualClock::new(t0 + 1);
    let q = TaskQueue::open_with_clock(config(&dir), Arc::new(clock.clone()))
        .await
        .unwrap();
    let sub = q
        .submit_workflow(
            Workflow::new("hourly")
                .with_schedule(Schedule {
                    at: None,
                    cron: Some("0 0 * * * *".into()),
                    timezone: None,
                })
                .add_task(
                    Task::new("job")
                        .with_command("true")
                        .with_idempotency_key("job-key"),
                ),
        )
        .await
        .unwrap();
    let schedule_id = sub.schedule_id.clone().unwrap();
    let slot = q
        .get_schedule(&schedule_id)
        .await
        .unwrap()
        .next_fire_at
        .unwrap()
        .0;
    let first = q.get_workflow(&sub.workflow_id).await.unwrap();
    let job = q.get(&first.tasks[0].id).await.unwrap();
    assert_eq!(
        job.spec.idempotency_key.as_deref(),
        Some(format!("job-key@{slot}").as_str())
    );

    q.pause_schedule(&schedule_id).await.unwrap();
    assert_eq!(
        q.get_workflow(&sub.workflow_id)
            .await
            .unwrap()
            .workflow
            .status,
        WorkflowStatus::Cancelled
    );
    let s = q.resume_schedule(&schedule_id).await.unwrap();
    assert_eq!(s.next_fire_at.unwrap().0, slot);
    let run = q
        .get_workflow(s.upcoming_run.as_deref().unwrap())
        .await
        .unwrap();
    assert_ne!(run.workflow.id, sub.workflow_id);
    assert_eq!(run.tasks.len(), 1, "{run:?}");
    assert_eq!(run.tasks[0].status, TaskStatus::Pending);
    assert_eq!(run.workflow.status, WorkflowStatus::Running);
}
