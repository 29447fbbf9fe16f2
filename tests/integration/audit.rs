//! The audit hash chain and spec integrity, checked against edits made
//! with the sqlite3 CLI.

use crate::common::*;

#[test]
fn audit_verify_names_the_first_altered_row() {
    let ws = Workspace::new();
    let (code, _) = ws.run_file("tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'exit 1', retry: {max_attempts: 2, initial_delay: 10ms}}\n");
    assert_eq!(code, 1);
    let ok = ws.run(&["audit", "verify"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("intact"));

    // Rewrite history: claim that b's final transition was a success.
    let seq =
        ws.sqlite("SELECT seq FROM audit_events WHERE to_status = 'failed' ORDER BY seq LIMIT 1");
    let seq = seq.trim();
    ws.sqlite(&format!(
        "UPDATE audit_events SET to_status = 'succeeded' WHERE seq = {seq}"
    ));
    let bad = ws.run(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains(&format!("event #{seq}")), "{err}");
    assert!(err.contains("altered"), "{err}");
}

#[test]
fn audit_verify_detects_a_deleted_row() {
    let ws = Workspace::new();
    ws.run_file("tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n");
    ws.sqlite("DELETE FROM audit_events WHERE seq = 2");
    let bad = ws.run(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("event #3"));
}

/// Deleting the newest events leaves a valid chain; verify still fails,
/// because the tasks they moved no longer match their last event.
#[test]
fn audit_verify_detects_the_newest_rows_deleted() {
    let ws = Workspace::new();
    let (code, summary) =
        ws.run_file("tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n");
    assert_eq!(code, 0);
    assert!(ws.run(&["audit", "verify"]).status.success());
    let last = ws.sqlite("SELECT task_id FROM audit_events ORDER BY seq DESC LIMIT 1");
    let last = last.trim().to_string();
    assert!(
        summary["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["id"] == last.as_str())
    );
    ws.sqlite("DELETE FROM audit_events WHERE seq = (SELECT MAX(seq) FROM audit_events)");
    let bad = ws.run(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(&last) && err.contains("later events are missing"),
        "{err}"
    );
    // The whole tail from that task's first event on: it has none left.
    ws.sqlite(&format!(
        "DELETE FROM audit_events WHERE seq >= (SELECT MIN(seq) FROM audit_events WHERE task_id = '{last}')"
    ));
    let bad = ws.run(&["audit", "verify"]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("events are missing"), "{err}");
}

#[test]
fn a_tampered_spec_is_not_run() {
    let ws = Workspace::new();
    let ids = ws.submit("tasks:\n  - {name: safe, command: 'echo safe > out.txt'}\n");
    ws.sqlite("UPDATE tasks SET spec = replace(spec, 'echo safe', 'echo pwned')");
    let out = ws.run(&["worker", "--until-idle"]);
    assert!(out.status.success());
    let t = ws.status(&ids[0]);
    assert_eq!(t["status"], "failed");
    assert_eq!(t["attempts"], 1, "an integrity failure is not retried");
    assert!(
        t["error"]
            .as_str()
            .unwrap()
            .contains("integrity check failed"),
        "{t}"
    );
    assert!(
        !ws.path("out.txt").exists(),
        "the tampered command must not run"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_external_task_is_not_handed_to_a_worker() {
    use task_queue::model::TaskKind;
    use task_queue::{ClaimFilter, Config, Task, TaskQueue};
    let ws = Workspace::new();
    let mut config = Config::default();
    config.storage.path = ws.db();
    let q = TaskQueue::open_with(config).await.unwrap();
    let t = q
        .submit(
            Task::new("review")
                .with_kind(TaskKind::External)
                .with_parameters(serde_json::json!({"pr": 1})),
        )
        .await
        .unwrap();
    ws.sqlite("UPDATE tasks SET spec = replace(spec, '\"pr\":1', '\"pr\":2')");
    let got = q
        .claim(
            "agent",
            ClaimFilter::default(),
            std::time::Duration::from_secs(30),
            1,
        )
        .await
        .unwrap();
    assert!(got.is_empty(), "a tampered spec is not handed out");
    let rec = q.get(&t.id).await.unwrap();
    assert_eq!(rec.status.to_string(), "failed");
    assert!(
        rec.error.unwrap().contains("integrity check failed"),
        "the failure says why"
    );
}
