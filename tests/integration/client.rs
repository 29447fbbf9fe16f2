//! The Rust client and the CLI's `--server` commands against the real
//! `task-queue serve` binary on a free loopback port, with tokens.

use std::time::Duration;

use serde_json::{Value, json};
use task_queue::client::{Client, LogsQuery, TaskQuery};
use task_queue::model::{TaskKind, TaskStatus};
use task_queue::{ClaimFilter, Error, Task, Workflow};

use crate::common::*;

fn token(ws: &Workspace, role: &str) -> String {
    let out = ws.run(&["token", "create", "--role", role]);
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_covers_the_api_and_maps_its_errors() {
    let ws = Workspace::new();
    let operator = token(&ws, "operator");
    let viewer = token(&ws, "viewer");
    let worker = token(&ws, "worker");
    let (base, _server) = ws.serve();
    let op = Client::new(&base).unwrap().with_token(&operator);

    // Submit, wait, read back, logs.
    let s = op
        .submit(
            &Task::new("hello")
                .with_project("demo")
                .with_command("echo hello; echo '{\"n\": 3}' > \"$TASK_QUEUE_RESULT\""),
        )
        .await
        .unwrap();
    assert!(s.created);
    let done = op.wait(&s.id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(done.status, TaskStatus::Succeeded);
    assert_eq!(
        done.result.as_ref().unwrap().output.as_ref().unwrap()["n"],
        3
    );
    let detail = op.get(&s.id).await.unwrap();
    assert_eq!(detail.attempts.len(), 1);
    let logs = op
        .logs(
            &s.id,
            &LogsQuery {
                stream: Some("stdout".into()),
                ..LogsQuery::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(logs.logs[0].text, "hello\n");
    // Idempotency: the same key returns the first task.
    let k1 = op
        .submit(
            &Task::new("once")
                .with_command("true")
                .with_idempotency_key("k-1"),
        )
        .await
        .unwrap();
    let k2 = op
        .submit(
            &Task::new("once")
                .with_command("true")
                .with_idempotency_key("k-1"),
        )
        .await
        .unwrap();
    assert_eq!(k1.id, k2.id);
    assert!(!k2.created);

    // Batch and list with filters and a cursor.
    let batch: Vec<_> = (0..5)
        .map(|i| {
            Task::new(format!("b{i}"))
                .with_project("batch")
                .with_kind(TaskKind::External)
        })
        .collect();
    let ids = op.submit_batch(&batch).await.unwrap();
    assert_eq!(ids.len(), 5);
    let page = op
        .list(&TaskQuery {
            project: Some("batch".into()),
            limit: Some(3),
            ..TaskQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(page.tasks.len(), 3);
    let rest = op
        .list(&TaskQuery {
            project: Some("batch".into()),
            limit: Some(3),
            cursor: page.next_cursor.clone(),
            ..TaskQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(rest.tasks.len(), 2);
    assert!(rest.next_cursor.is_none());

    // Workflow with an approval gate: graph, approve, wait.
    let wf = Workflow::new("release")
        .add_task(Task::new("build").with_command("true"))
        .add_task(
            Task::new("ship")
                .with_command("true")
                .depends_on("build")
                .requiring_approval(),
        );
    let w = op.submit_workflow(&wf).await.unwrap();
    let graph = op.workflow_graph(&w.workflow_id, "dot").await.unwrap();
    assert!(graph.contains("digraph"), "{graph}");
    let ship = w
        .tasks
        .iter()
        .find(|t| t.name == "ship")
        .unwrap()
        .id
        .clone();
    assert!(wait_until(Duration::from_secs(30), || {
        let t = ws.status(&ship);
        t["status"] == "awaiting_approval"
    }));
    let approved = op
        .approve(&ship, true, Some("looks good"), Some("ci"))
        .await
        .unwrap();
    assert_ne!(approved.status, TaskStatus::AwaitingApproval);
    let shipped = op.wait(&ship, Duration::from_secs(30)).await.unwrap();
    assert_eq!(shipped.status, TaskStatus::Succeeded);
    let detail = op.workflow(&w.workflow_id).await.unwrap();
    assert_eq!(detail.workflow.status.to_string(), "succeeded");

    // External work with a worker token: claim, heartbeat, complete, fail.
    let wk = Client::new(&base).unwrap().with_token(&worker);
    let filter = ClaimFilter {
        project: Some("batch".into()),
        ..ClaimFilter::default()
    };
    let claimed = wk
        .claim("w-1", &filter, Duration::from_secs(60), 2)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 2);
    wk.heartbeat(&claimed[0].task_id, "w-1", Duration::from_secs(120))
        .await
        .unwrap();
    let c = wk
        .complete(&claimed[0].task_id, "w-1", Some(json!({"ok": true})))
        .await
        .unwrap();
    assert_eq!(c.status, TaskStatus::Succeeded);
    let f = wk
        .fail(&claimed[1].task_id, "w-1", "no disk", false)
        .await
        .unwrap();
    assert_eq!(f.status, TaskStatus::Failed);
    // Retry and cancel.
    let r = op.retry(&claimed[1].task_id).await.unwrap();
    assert_eq!(r.status, TaskStatus::Queued);
    let x = op.cancel(&claimed[1].task_id).await.unwrap();
    assert_eq!(x.status, TaskStatus::Cancelled);
    let stats = op.stats().await.unwrap();
    assert!(stats.by_project.contains_key("batch"), "{stats:?}");
    assert_eq!(op.health().await.unwrap()["status"], "ok");

    // History: search and recommendations.
    let found = op
        .search(&task_queue::search::SearchRequest {
            query: "hello".into(),
            project: Some("demo".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(found.hits[0].name, "hello", "{found:?}");
    let advice = op
        .recommend(&task_queue::search::recommend::RecommendRequest {
            name: Some("hello".into()),
            command: None,
            description: None,
            project: Some("demo".into()),
        })
        .await
        .unwrap();
    assert_eq!(advice.based_on.as_deref(), Some("hello"), "{advice:?}");

    // Errors keep their kinds across the wire.
    let e = op
        .submit(&Task::new("bad").with_command("true").with_priority(1000))
        .await
        .unwrap_err();
    match e {
        Error::InvalidInput { field, .. } => assert_eq!(field, "priority"),
        other => panic!("expected invalid priority, got {other:?}"),
    }
    let missing = "01890000-0000-7000-8000-000000000000";
    match op.get(missing).await.unwrap_err() {
        Error::NotFound { what, id } => assert_eq!((what, id.as_str()), ("task", missing)),
        other => panic!("expected not found, got {other:?}"),
    }
    match op.approve(&s.id, true, None, None).await.unwrap_err() {
        Error::Conflict(m) => assert!(m.contains("awaiting_approval"), "{m}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let anon = Client::new(&base).unwrap();
    match anon.stats().await.unwrap_err() {
        Error::Remote { status, code, .. } => {
            assert_eq!((status, code.as_str()), (401, "unauthorized"))
        }
        other => panic!("expected 401, got {other:?}"),
    }
    let view = Client::new(&base).unwrap().with_token(&viewer);
    match view.cancel(&s.id).await.unwrap_err() {
        Error::Remote {
            status, message, ..
        } => {
            assert_eq!(status, 403);
            assert!(message.contains("operator"), "{message}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    let gone = Client::new("http://127.0.0.1:1").unwrap();
    match gone.stats().await.unwrap_err() {
        Error::Remote {
            status: 0, code, ..
        } => assert_eq!(code, "unreachable"),
        other => panic!("expected unreachable, got {other:?}"),
    }
}

#[test]
fn cli_commands_work_against_a_server() {
    let ws = Workspace::new();
    let operator = token(&ws, "operator");
    let (base, _server) = ws.serve();
    // A separate, empty directory: the remote commands never open a database.
    let elsewhere = tempfile::tempdir().unwrap();
    let remote = |args: &[&str], token: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_task-queue"))
            .arg("--server")
            .arg(&base)
            .args(args)
            .current_dir(elsewhere.path())
            .env("TASK_QUEUE_TOKEN", token)
            .output()
            .unwrap()
    };
    let file = ws.write(
        "tasks.yml",
        "tasks:\n  - {name: greet, command: 'echo hi from the server'}\n  - {name: gate, command: 'true', requires_approval: true}\n",
    );
    let out = remote(&["submit", file.to_str().unwrap()], &operator);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let greet = v["tasks"][0]["id"].as_str().unwrap().to_string();
    let gate = v["tasks"][1]["id"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(30), || {
        let out = remote(&["status", &greet, "--json"], &operator);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v["status"] == "succeeded"
    }));
    let out = remote(&["logs", &greet], &operator);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hi from the server"), "{text}");
    let out = remote(&["search", "greet", "--json"], &operator);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["hits"][0]["name"], "greet", "{v}");
    let out = remote(&["status", "--json"], &operator);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"].as_array().unwrap().len(), 2);
    // Page by page: one task, then the other.
    let out = remote(&["status", "--json", "--limit", "1"], &operator);
    let first: Value = serde_json::from_slice(&out.stdout).unwrap();
    let cursor = first["next_cursor"]
        .as_str()
        .expect("a next page")
        .to_string();
    let out = remote(
        &["status", "--json", "--limit", "1", "--cursor", &cursor],
        &operator,
    );
    let second: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(second["tasks"].as_array().unwrap().len(), 1, "{second}");
    assert_ne!(first["tasks"][0]["id"], second["tasks"][0]["id"]);
    assert!(second.get("next_cursor").is_none(), "{second}");
    assert!(wait_until(
        Duration::from_secs(30),
        || ws.status(&gate)["status"] == "awaiting_approval"
    ));
    let out = remote(
        &["approve", &gate, "--reject", "--comment", "not today"],
        &operator,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ws.status(&gate)["status"], "failed");
    // Errors: no token, a command that needs the database.
    let out = remote(&["status", &greet], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    let out = remote(&["worker", "--until-idle"], &operator);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--server") && err.contains("worker"), "{err}");
    assert!(
        std::fs::read_dir(elsewhere.path())
            .unwrap()
            .next()
            .is_none(),
        "no database was created by remote commands"
    );
}

/// `TASK_QUEUE_SERVER` sends the client commands to that server; commands
/// that work on the database ignore it. An explicit `--server` on one of
/// those is refused, naming the command as it is typed.
#[test]
fn the_server_variable_applies_to_client_commands_only() {
    let ws = Workspace::new();
    ws.write("hello.yml", "tasks:\n  - {name: hello, command: echo hi}\n");
    // A local database for the local commands to read.
    ws.submit("tasks:\n  - {name: stored, command: 'true'}\n");
    let dead = "http://127.0.0.1:1";
    let with_var = |args: &[&str]| {
        ws.cmd(args)
            .env("TASK_QUEUE_SERVER", dead)
            .output()
            .unwrap()
    };
    // A client command goes to the (unreachable) server.
    let out = with_var(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Local commands run as if it were not set.
    for args in [
        &["check", "hello.yml"][..],
        &["tools-schema"],
        &["workflow", "list", "--json"],
    ] {
        let out = with_var(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = ws.run(&["--server", dead, "tools-schema"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`tools-schema` works on the database directly"),
        "{err}"
    );
}
