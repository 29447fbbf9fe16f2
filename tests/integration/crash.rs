//! Crash recovery: kill -9 of a worker mid-run, restart, and two workers
//! sharing one database file.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

#[test]
fn kill_9_mid_run_then_restart_finishes_every_task_exactly_once() {
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("started")).unwrap();
    let marker = format!("2.{}", std::process::id());
    let mut yaml = String::from("tasks:\n");
    for i in 0..12 {
        // The side effect is the task's last act, after a long sleep.
        yaml.push_str(&format!(
            "  - {{name: job-{i}, command: 'touch started/$TASK_QUEUE_TASK_ID-$TASK_QUEUE_ATTEMPT; sleep {marker}; echo $TASK_QUEUE_TASK_ID >> effects.txt'}}\n"
        ));
    }
    let ids = ws.submit(&yaml);
    let mut worker = ws.spawn(&["worker", "--concurrency", "4"]);
    let started = || {
        std::fs::read_dir(ws.path("started"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(10), || started() >= 4),
        "no task started"
    );
    // kill -9: no cleanup code of the worker runs.
    worker.kill().unwrap();
    worker.wait().unwrap();
    // The interrupted attempts' processes die with the engine.
    assert!(
        wait_until(Duration::from_secs(3), || processes_with(&marker)
            .is_empty()),
        "task processes outlived the killed engine: {:?}",
        processes_with(&marker)
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        ws.read("effects.txt"),
        "",
        "an interrupted attempt finished behind the engine's back"
    );

    let out = ws.run(&["worker", "--until-idle", "--concurrency", "4"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let effects = ws.read("effects.txt");
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for line in effects.lines() {
        *counts.entry(line).or_default() += 1;
    }
    let mut retried = 0;
    for id in &ids {
        let t = ws.status(id);
        assert_eq!(t["status"], "succeeded", "{t}");
        assert_eq!(
            counts.get(id.as_str()),
            Some(&1),
            "side effect of {id} happened {:?} times",
            counts.get(id.as_str())
        );
        let history = t["attempt_history"].as_array().unwrap();
        if t["attempts"] == 2 {
            retried += 1;
            assert_eq!(history[0]["status"], "lost", "{t}");
            assert_eq!(history[1]["status"], "succeeded", "{t}");
        } else {
            assert_eq!(t["attempts"], 1, "{t}");
        }
    }
    assert!(
        retried >= 4,
        "the interrupted tasks re-ran as second attempts ({retried})"
    );
    let verify = ws.run(&["audit", "verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn a_lost_task_with_no_attempts_left_fails() {
    let ws = Workspace::new();
    let marker = format!("3.{}", std::process::id());
    let ids = ws.submit(&format!(
        "tasks:\n  - {{name: once, command: 'sleep {marker}', retry: {{max_attempts: 1}}}}\n"
    ));
    let mut worker = ws.spawn(&["worker"]);
    assert!(wait_until(Duration::from_secs(10), || !processes_with(
        &marker
    )
    .is_empty()));
    worker.kill().unwrap();
    worker.wait().unwrap();
    let out = ws.run(&["worker", "--until-idle"]);
    assert!(out.status.success());
    let t = ws.status(&ids[0]);
    assert_eq!(t["status"], "failed", "{t}");
    assert!(t["error"].as_str().unwrap().contains("was lost"), "{t}");
}

#[test]
fn two_workers_on_one_file_never_run_a_task_twice() {
    let ws = Workspace::new();
    let mut yaml = String::from("tasks:\n");
    for i in 0..300 {
        yaml.push_str(&format!(
            "  - {{name: t{i}, command: 'echo \"start $TASK_QUEUE_TASK_ID\" >> log.txt; sleep 0.01; echo \"end $TASK_QUEUE_TASK_ID\" >> log.txt'}}\n"
        ));
    }
    let ids = ws.submit(&yaml);
    let a = ws.spawn(&["worker", "--until-idle", "--concurrency", "8"]);
    let b = ws.spawn(&["worker", "--until-idle", "--concurrency", "8"]);
    for mut w in [a, b] {
        assert!(w.wait().unwrap().success());
    }
    let log = ws.read("log.txt");
    let mut starts: HashMap<&str, usize> = HashMap::new();
    for line in log.lines() {
        if let Some(id) = line.strip_prefix("start ") {
            *starts.entry(id).or_default() += 1;
        }
    }
    assert_eq!(starts.len(), ids.len());
    assert!(starts.values().all(|&n| n == 1), "a task ran twice");
    let workers = ws.sqlite("SELECT COUNT(DISTINCT worker_id) FROM attempts");
    assert_eq!(workers.trim(), "2", "both workers took part");
    let attempts = ws.sqlite("SELECT COUNT(*) FROM attempts");
    assert_eq!(attempts.trim(), "300");
}

#[test]
fn sigterm_lets_the_running_task_finish() {
    let ws = Workspace::new();
    let ids = ws.submit("tasks:\n  - {name: slow, command: 'sleep 1; echo done > done.txt'}\n");
    let mut worker = ws.spawn(&["worker"]);
    assert!(wait_until(
        Duration::from_secs(10),
        || ws.status(&ids[0])["status"] == "running"
    ));
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let status = worker.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(ws.read("done.txt"), "done\n");
    assert_eq!(ws.status(&ids[0])["status"], "succeeded");
}

/// `worker --until-idle` stops on a signal like `worker` does: a second
/// SIGTERM stops the running task at once, and the task goes back to the
/// queue (`lost`, not counted) instead of staying `running` under a lease
/// and failing once that expires.
#[test]
fn until_idle_worker_stops_gracefully_on_signals() {
    let ws = Workspace::new();
    let ids =
        ws.submit("tasks:\n  - {name: long, command: 'sleep 41.7', retry: {max_attempts: 1}}\n");
    let mut worker = ws.spawn(&["worker", "--until-idle"]);
    assert!(wait_until(
        Duration::from_secs(10),
        || ws.status(&ids[0])["status"] == "running"
    ));
    // SAFETY: plain syscalls on our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    unsafe { libc::kill(worker.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = worker.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let task = ws.status(&ids[0]);
    assert!(
        task["status"] == "pending" || task["status"] == "retrying",
        "{task}"
    );
    let attempts = ws.sqlite(&format!(
        "SELECT status FROM attempts WHERE task_id = '{}'",
        ids[0]
    ));
    assert_eq!(attempts.trim(), "lost");
    assert!(processes_with("sleep 41.7").is_empty());
}

/// Processes that open a database file that does not exist yet, all at
/// once (a worker and a `submit` started together), all get in: none is
/// told "database is locked" while another one creates the file, switches
/// it to WAL and migrates it.
#[test]
fn processes_opening_a_new_database_at_once_all_get_in() {
    for round in 0..60 {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.db");
        let file = dir.path().join("one.yml");
        std::fs::write(&file, "tasks:\n  - {name: a, command: 'true'}\n").unwrap();
        let children: Vec<_> = (0..6)
            .map(|_| {
                std::process::Command::new(env!("CARGO_BIN_EXE_task-queue"))
                    .arg("--db")
                    .arg(&db)
                    .arg("submit")
                    .arg(&file)
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
