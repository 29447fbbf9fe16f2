//! Workflows through the real binary: conditions, skips, diamonds,
//! fan-out/fan-in, graph checks, approvals, services, HTTP tasks,
//! schedules and a restart in the middle of a workflow.

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::{Workspace, processes_with, task_by_name, wait_until};

fn status_of<'a>(summary: &'a Value, name: &str) -> &'a str {
    task_by_name(summary, name)["status"].as_str().unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn conditions_skips_and_cascades() {
    let ws = Workspace::new();
    let (code, v) = ws.run_file(
        r#"
name: conditions
tasks:
  - name: ok
    command: "echo '{\"version\": 2}' > \"$TASK_QUEUE_RESULT\""
  - name: bad
    command: exit 3
    retry: {max_attempts: 1}
  - name: on-ok
    command: "true"
    depends_on: [ok]
  - name: on-bad-failure
    command: "true"
    depends_on: [{task: bad, condition: failure}]
  - name: on-bad-success
    command: "true"
    depends_on: [bad]
  - name: cascade
    command: "true"
    depends_on: [on-bad-success]
  - name: cleanup
    command: "true"
    depends_on: [{task: on-bad-success, condition: completion}]
  - name: schema-yes
    command: "true"
    depends_on:
      - task: ok
        condition: {schema: {type: object, required: [version], properties: {version: {minimum: 2}}}}
  - name: schema-no
    command: "true"
    depends_on:
      - task: ok
        condition: {schema: {type: object, properties: {version: {minimum: 3}}}}
  - name: on-ok-failure
    command: "true"
    depends_on: [{task: ok, condition: failure}]
"#,
    );
    assert_eq!(code, 1, "a failed task fails the run: {v}");
    assert_eq!(v["workflow_status"], "failed", "{v}");
    assert!(v["workflow_id"].is_string(), "{v}");
    for (name, want) in [
        ("ok", "succeeded"),
        ("bad", "failed"),
        ("on-ok", "succeeded"),
        ("on-bad-failure", "succeeded"),
        ("on-bad-success", "skipped"),
        ("cascade", "skipped"),
        ("cleanup", "succeeded"),
        ("schema-yes", "succeeded"),
        ("schema-no", "skipped"),
        ("on-ok-failure", "skipped"),
    ] {
        assert_eq!(status_of(&v, name), want, "{name} in {v}");
    }
    // A skipped task never started and says why.
    let skipped = ws.status(task_by_name(&v, "cascade")["id"].as_str().unwrap());
    assert_eq!(skipped["attempts"], 0);
    assert!(
        skipped["error"]
            .as_str()
            .unwrap()
            .contains("on-bad-success"),
        "{skipped}"
    );
    let no = ws.status(task_by_name(&v, "schema-no")["id"].as_str().unwrap());
    assert!(
        no["error"].as_str().unwrap().contains("schema"),
        "the reason names the schema condition: {no}"
    );
}

#[test]
fn a_diamond_runs_in_dependency_order_and_succeeds() {
    let ws = Workspace::new();
    let log = ws.path("order.log");
    let log = log.to_str().unwrap();
    let (code, v) = ws.run_file(&format!(
        r#"
name: diamond
tasks:
  - {{name: d, command: "echo d >> {log}", depends_on: [b, c]}}
  - {{name: b, command: "sleep 0.2; echo b >> {log}", depends_on: [a]}}
  - {{name: c, command: "echo c >> {log}", depends_on: [a]}}
  - {{name: a, command: "echo a >> {log}"}}
"#
    ));
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["workflow_status"], "succeeded");
    let lines: Vec<String> = std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(lines.len(), 4, "each task ran once: {lines:?}");
    assert_eq!(lines[0], "a");
    assert_eq!(lines[3], "d");
}

#[test]
fn fan_out_and_fan_in_of_a_thousand_tasks() {
    let ws = Workspace::new();
    ws.write(
        "config.yml",
        "execution:\n  max_concurrent_tasks: 64\n  poll_interval: 100ms\n",
    );
    let mut yaml = String::from("name: fan\ntasks:\n  - {name: split, argv: [\"true\"]}\n");
    let mut join = Vec::new();
    for i in 0..1000 {
        yaml.push_str(&format!(
            "  - {{name: leaf-{i}, argv: [\"true\"], depends_on: [split]}}\n"
        ));
        join.push(format!("leaf-{i}"));
    }
    yaml.push_str(&format!(
        "  - {{name: join, argv: [\"true\"], depends_on: [{}]}}\n",
        join.join(", ")
    ));
    let (code, v) = ws.run_file(&yaml);
    assert_eq!(
        code,
        0,
        "{}",
        &v.to_string()[..500.min(v.to_string().len())]
    );
    assert_eq!(v["tasks"].as_array().unwrap().len(), 1002);
    assert_eq!(v["workflow_status"], "succeeded");
    // The join started after every leaf finished.
    let join_id = task_by_name(&v, "join")["id"].as_str().unwrap().to_string();
    let started: i64 = ws
        .sqlite(&format!(
            "SELECT started_at FROM tasks WHERE id = '{join_id}'"
        ))
        .trim()
        .parse()
        .unwrap();
    let last_leaf: i64 = ws
        .sqlite("SELECT MAX(finished_at) FROM tasks WHERE name LIKE 'leaf-%'")
        .trim()
        .parse()
        .unwrap();
    assert!(
        started >= last_leaf,
        "join {started} vs last leaf {last_leaf}"
    );
    let out = ws.run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn bad_graphs_are_rejected_whole_and_store_nothing() {
    let ws = Workspace::new();
    let cases = [
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [c]}\n  - {name: b, command: 'true', depends_on: [a]}\n  - {name: c, command: 'true', depends_on: [b]}\n",
            "cycle: ",
        ),
        (
            "tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true', depends_on: [bild]}\n",
            "tasks[1].depends_on[0]",
        ),
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [a]}\n",
            "itself",
        ),
        (
            "name: w\ntasks:\n  - {name: a, command: 'true'}\n  - {name: a, command: 'false'}\n",
            "duplicate task name",
        ),
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [0193b0c2-0000-7000-8000-000000000000]}\n",
            "no task has id",
        ),
        (
            "name: w\ntasks:\n  - {name: a, command: 'true', schedule: {cron: '* * * * *'}}\n",
            "put `schedule` on the workflow",
        ),
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [{task: b, condition: sometimes}]}\n  - {name: b, command: 'true'}\n",
            "tasks[0].depends_on[0]: condition \"sometimes\" is not one of success, failure, completion",
        ),
    ];
    for (yaml, want) in cases {
        let f = ws.write("bad.yml", yaml);
        let out = ws.run(&["submit", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{yaml}: {err}");
        assert!(err.contains(want), "{yaml}: wanted {want:?} in {err}");
    }
    // The cycle is named as a path.
    let f = ws.write(
        "cycle.yml",
        "tasks:\n  - {name: a, command: 'true', depends_on: [c]}\n  - {name: b, command: 'true', depends_on: [a]}\n  - {name: c, command: 'true', depends_on: [b]}\n  - {name: d, command: 'true'}\n",
    );
    let out = ws.run(&["check", f.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a -> b -> c -> a")
            || err.contains("b -> c -> a -> b")
            || err.contains("c -> a -> b -> c"),
        "{err}"
    );
    assert_eq!(ws.sqlite("SELECT COUNT(*) FROM tasks").trim(), "0");
    assert_eq!(ws.sqlite("SELECT COUNT(*) FROM workflows").trim(), "0");
}

fn submit_workflow(ws: &Workspace, yaml: &str) -> Value {
    let f = ws.write("wf.yml", yaml);
    let out = ws.run(&["submit", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "submit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn id_of(sub: &Value, name: &str) -> String {
    sub["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn workflow_status(ws: &Workspace, id: &str) -> Value {
    let out = ws.run(&["workflow", "show", id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn approval_gates_a_task_and_rejection_runs_the_failure_path() {
    let ws = Workspace::new();
    let mut worker = ws.spawn(&["worker"]);
    let yaml = r#"
name: release
tasks:
  - {name: build, command: "true"}
  - {name: gate, kind: external, requires_approval: true, depends_on: [build], description: "approve the release"}
  - {name: deploy, command: "true", depends_on: [gate]}
  - {name: notify, command: "true", depends_on: [{task: gate, condition: failure}]}
"#;
    // The gate is an external task with no worker: approval alone does not
    // run it, so use a command gate for the approve path.
    let approve_yaml = yaml.replace(
        "kind: external, requires_approval",
        "command: \"true\", requires_approval",
    );
    let a = submit_workflow(&ws, &approve_yaml);
    let gate = id_of(&a, "gate");
    assert!(wait_until(
        Duration::from_secs(15),
        || ws.status(&gate)["status"] == "awaiting_approval"
    ));
    // Nothing downstream moved while it waits.
    assert_eq!(ws.status(&id_of(&a, "deploy"))["status"], "pending");
    let out = ws.run(&["approve", &gate, "--comment", "ship it", "--by", "alice"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wf = a["workflow_id"].as_str().unwrap();
    assert!(wait_until(Duration::from_secs(15), || workflow_status(
        &ws, wf
    )["status"]
        == "succeeded"));
    let g = ws.status(&gate);
    assert_eq!(g["approval"]["approved"], true);
    assert_eq!(g["approval"]["comment"], "ship it");
    assert_eq!(g["approval"]["by"], "alice");
    assert_eq!(ws.status(&id_of(&a, "notify"))["status"], "skipped");

    // Rejection: the gate fails, its failure handler runs, deploy is skipped.
    let r = submit_workflow(&ws, yaml);
    let gate = id_of(&r, "gate");
    assert!(wait_until(
        Duration::from_secs(15),
        || ws.status(&gate)["status"] == "awaiting_approval"
    ));
    // Approving twice or too early is a clear conflict.
    let early = ws.run(&["approve", &id_of(&r, "deploy")]);
    assert_eq!(early.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&early.stderr).contains("not awaiting_approval"));
    let out = ws.run(&["approve", &gate, "--reject", "--comment", "not today"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wf = r["workflow_id"].as_str().unwrap();
    assert!(wait_until(Duration::from_secs(15), || workflow_status(
        &ws, wf
    )["status"]
        == "failed"));
    assert_eq!(ws.status(&gate)["status"], "failed");
    assert!(
        ws.status(&gate)["error"]
            .as_str()
            .unwrap()
            .contains("not today")
    );
    assert_eq!(ws.status(&id_of(&r, "notify"))["status"], "succeeded");
    assert_eq!(ws.status(&id_of(&r, "deploy"))["status"], "skipped");
    let _ = worker.kill();
    let _ = worker.wait();
    let out = ws.run(&["audit", "verify"]);
    assert!(out.status.success());
}

#[test]
fn a_service_task_serves_its_dependents_and_stops_with_the_workflow() {
    let ws = Workspace::new();
    let port = free_port();
    std::fs::create_dir_all(ws.path("site")).unwrap();
    ws.write("site/hello.txt", "hello from the service\n");
    let marker = format!("http.server {port}");
    let (code, v) = ws.run_file(&format!(
        r#"
name: with-service
tasks:
  - name: web
    argv: [python3, -m, http.server, "{port}", --bind, 127.0.0.1, --directory, site]
    health_check: {{url: "http://127.0.0.1:{port}/hello.txt", interval: 100ms, timeout: 20s}}
  - name: client
    depends_on: [web]
    command: python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/hello.txt').read().decode())"
"#
    ));
    assert_eq!(code, 0, "{v}");
    assert_eq!(status_of(&v, "web"), "succeeded");
    assert_eq!(status_of(&v, "client"), "succeeded");
    let client = ws.status(task_by_name(&v, "client")["id"].as_str().unwrap());
    assert!(
        client["result"]["stdout_tail"]
            .as_str()
            .unwrap()
            .contains("hello from the service"),
        "{client}"
    );
    // The workflow finished, so the service was stopped.
    assert!(
        wait_until(Duration::from_secs(10), || processes_with(&marker)
            .is_empty()),
        "the service still runs: {:?}",
        processes_with(&marker)
    );
    // Its output was kept when it stopped (the client's request is in its log).
    let web = task_by_name(&v, "web")["id"].as_str().unwrap().to_string();
    let logs = ws.run(&["logs", &web]);
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("GET /hello.txt"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );

    // A service that exits before it is healthy fails, and its dependent is skipped.
    let (code, v) = ws.run_file(
        r#"
name: broken-service
tasks:
  - name: web
    command: "echo starting; exit 4"
    retry: {max_attempts: 1}
    health_check: {url: "http://127.0.0.1:9/", interval: 100ms, timeout: 10s}
  - {name: client, command: "true", depends_on: [web]}
"#,
    );
    assert_eq!(code, 1);
    assert_eq!(status_of(&v, "web"), "failed");
    assert_eq!(status_of(&v, "client"), "skipped");
    let web = ws.status(task_by_name(&v, "web")["id"].as_str().unwrap());
    assert!(
        web["error"]
            .as_str()
            .unwrap()
            .contains("before its health check passed"),
        "{web}"
    );
}

#[test]
fn http_tasks_call_a_local_server() {
    let ws = Workspace::new();
    let port = free_port();
    std::fs::create_dir_all(ws.path("www")).unwrap();
    ws.write("www/build.json", r#"{"version": "1.4.2", "ok": true}"#);
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .current_dir(ws.path("www"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3");
    assert!(wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    }));
    let (code, v) = ws.run_file(&format!(
        r#"
name: http
tasks:
  - name: fetch
    http: {{url: "http://127.0.0.1:{port}/build.json", headers: {{accept: application/json}}}}
    validation: {{type: object, required: [version]}}
  - name: use
    depends_on: [{{task: fetch, condition: {{schema: {{properties: {{ok: {{const: true}}}}}}}}}}]
    command: "true"
  - name: missing
    kind: http
    http: {{url: "http://127.0.0.1:{port}/nope.json"}}
    retry: {{max_attempts: 3, initial_delay: 100ms}}
  - name: unsupported-method
    http: {{method: POST, url: "http://127.0.0.1:{port}/build.json", body: {{a: 1}}}}
    retry: {{max_attempts: 2, initial_delay: 100ms}}
"#
    ));
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(code, 1, "{v}");
    assert_eq!(status_of(&v, "fetch"), "succeeded");
    assert_eq!(status_of(&v, "use"), "succeeded");
    let fetch = ws.status(task_by_name(&v, "fetch")["id"].as_str().unwrap());
    assert_eq!(fetch["result"]["output"]["version"], "1.4.2", "{fetch}");
    // 404 is not retried; 501 (a 5xx) is.
    let missing = task_by_name(&v, "missing");
    assert_eq!(missing["status"], "failed");
    assert_eq!(missing["attempts"], 1, "{missing}");
    let post = task_by_name(&v, "unsupported-method");
    assert_eq!(post["status"], "failed");
    assert_eq!(post["attempts"], 2, "{post}");
}

#[test]
fn a_restart_in_the_middle_of_a_workflow_finishes_it() {
    let ws = Workspace::new();
    let log = ws.path("side.log");
    let log = log.to_str().unwrap();
    let sub = submit_workflow(
        &ws,
        &format!(
            r#"
name: chain
tasks:
  - {{name: a, command: "echo a >> {log}"}}
  - {{name: b, command: "echo b-start >> {log}; sleep 3; echo b >> {log}", depends_on: [a]}}
  - {{name: c, command: "echo c >> {log}", depends_on: [b]}}
  - {{name: fanout-1, command: "echo f1 >> {log}", depends_on: [b]}}
  - {{name: fanout-2, command: "echo f2 >> {log}", depends_on: [b]}}
  - {{name: end, command: "echo end >> {log}", depends_on: [c, fanout-1, fanout-2]}}
"#
        ),
    );
    let mut worker = ws.spawn(&["worker"]);
    assert!(wait_until(Duration::from_secs(15), || {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .contains("b-start")
    }));
    worker.kill().unwrap();
    worker.wait().unwrap();
    let out = ws.run(&["worker", "--until-idle"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wf = sub["workflow_id"].as_str().unwrap();
    assert_eq!(workflow_status(&ws, wf)["status"], "succeeded");
    let text = std::fs::read_to_string(log).unwrap();
    let count = |s: &str| text.lines().filter(|l| *l == s).count();
    for once in ["a", "b", "c", "f1", "f2", "end"] {
        assert_eq!(count(once), 1, "{once} in {text}");
    }
    assert_eq!(
        count("b-start"),
        2,
        "b was re-run as a second attempt: {text}"
    );
    assert_eq!(ws.status(&id_of(&sub, "b"))["attempts"], 2);
    let out = ws.run(&["audit", "verify"]);
    assert!(out.status.success());
}

#[test]
fn a_cron_schedule_fires_every_second_until_paused() {
    let ws = Workspace::new();
    let log = ws.path("cron.log");
    let log_s = log.to_str().unwrap().to_string();
    let sub = submit_workflow(
        &ws,
        &format!(
            "name: tick\nschedule: {{cron: \"* * * * * *\"}}\ntasks:\n  - {{name: beat, command: \"date +%s%N >> {log_s}\"}}\n"
        ),
    );
    let schedule = sub["schedule_id"].as_str().unwrap().to_string();
    assert_eq!(sub["tasks"][0]["status"], "pending");
    let mut worker = ws.spawn(&["worker"]);
    assert!(
        wait_until(Duration::from_secs(15), || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .count()
                >= 3
        }),
        "three firings"
    );
    let out = ws.run(&["schedule", "pause", &schedule]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let paused: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(paused["paused"], true);
    std::thread::sleep(Duration::from_millis(1500));
    let after_pause = std::fs::read_to_string(&log).unwrap().lines().count();
    std::thread::sleep(Duration::from_millis(2000));
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        after_pause,
        "no firing while paused"
    );
    let out = ws.run(&["schedule", "list"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        list["schedules"][0]["runs"].as_u64().unwrap() >= 2,
        "{list}"
    );
    // Each firing is its own workflow run, linked to the schedule.
    let runs = ws.sqlite(&format!(
        "SELECT COUNT(*) FROM workflows WHERE schedule_id = '{schedule}' AND status = 'succeeded'"
    ));
    assert!(runs.trim().parse::<u32>().unwrap() >= 3, "{runs}");
    let _ = worker.kill();
    let _ = worker.wait();
}

#[test]
fn every_example_file_checks() {
    let ws = Workspace::new();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yml") {
            continue;
        }
        seen += 1;
        let out = ws.run(&["check", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("flowchart TD"));
    }
    assert!(seen >= 5, "the examples are there");
}

/// A service that passed its health check runs under the worker that
/// started it: `task-queue cancel` from another process says how to stop
/// it, and cancelling its workflow from that process does stop it.
#[test]
fn a_service_under_another_process_stops_with_its_cancelled_workflow() {
    let ws = Workspace::new();
    let port = free_port();
    let marker = format!("http.server {port}");
    let ids = ws.submit(&format!(
        r#"
name: long-service
tasks:
  - name: web
    argv: [python3, -m, http.server, "{port}", --bind, 127.0.0.1]
    health_check: {{url: "http://127.0.0.1:{port}/", interval: 100ms, timeout: 20s}}
  - name: user
    depends_on: [web]
    command: sleep 30.{port}
"#
    ));
    let mut worker = ws.spawn(&["worker"]);
    let web = &ids[0];
    assert!(
        wait_until(Duration::from_secs(20), || ws.status(web)["status"]
            == "succeeded"),
        "the service never became healthy"
    );
    let out = ws.run(&["cancel", web]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cancel its workflow"), "{err}");
    assert!(!processes_with(&marker).is_empty(), "the service stopped");

    let wf = ws.status(web)["workflow_id"].as_str().unwrap().to_string();
    let out = ws.run(&["workflow", "cancel", &wf]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || processes_with(&marker)
            .is_empty()),
        "the service still runs after its workflow was cancelled"
    );
    let _ = worker.kill();
    let _ = worker.wait();
}

/// A client that submits a keyed workflow again (say, after losing the
/// answer) gets the first workflow back, and its tasks run once.
#[test]
fn a_keyed_workflow_submitted_again_is_the_same_workflow_and_runs_once() {
    let ws = Workspace::new();
    let log = ws.path("runs.log");
    let log = log.to_str().unwrap();
    let yaml = format!(
        r#"
name: release
tasks:
  - {{name: build, command: "echo build >> {log}", idempotency_key: release-42-build}}
  - {{name: ship, command: "echo ship >> {log}", depends_on: [build], idempotency_key: release-42-ship}}
"#
    );
    let first = submit_workflow(&ws, &yaml);
    let again = submit_workflow(&ws, &yaml);
    assert_eq!(first["workflow_id"], again["workflow_id"], "{again}");
    assert_eq!(again["status"], "running", "{again}");
    for name in ["build", "ship"] {
        assert_eq!(id_of(&first, name), id_of(&again, name));
    }
    let tasks = again["tasks"].as_array().unwrap();
    assert!(tasks.iter().all(|t| t["created"] == false), "{again}");
    assert!(
        tasks
            .iter()
            .all(|t| t["workflow_id"] == first["workflow_id"]),
        "{again}"
    );
    // `run` of the same file waits for that workflow and runs each task once.
    let (code, v) = ws.run_file(&yaml);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["workflow_status"], "succeeded", "{v}");
    let lines = std::fs::read_to_string(log).unwrap();
    assert_eq!(lines, "build\nship\n");
    let out = ws.run(&["workflow", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["workflows"].as_array().unwrap().len(), 1, "{list}");
    // Submitted once more after it finished, it is still that workflow.
    let done = submit_workflow(&ws, &yaml);
    assert_eq!(done["workflow_id"], first["workflow_id"]);
    assert_eq!(done["status"], "succeeded", "{done}");
}

#[test]
fn a_workflow_key_runs_the_workflow_once_whatever_is_submitted_again() {
    let ws = Workspace::new();
    let log = ws.path("runs.log");
    let log = log.to_str().unwrap();
    let file = |step: &str| {
        format!(
            r#"
name: nightly
idempotency_key: nightly-2026-11-28
tasks:
  - {{name: {step}, command: "echo {step} >> {log}"}}
  - {{name: report, command: "echo report >> {log}", depends_on: [{step}]}}
"#
        )
    };
    let first = submit_workflow(&ws, &file("build"));
    // Tasks without keys, and other tasks this time: the key alone names
    // the first workflow.
    let again = submit_workflow(&ws, &file("compile"));
    assert_eq!(first["workflow_id"], again["workflow_id"], "{again}");
    assert_eq!(
        (&first["created"], &again["created"]),
        (&Value::Bool(true), &Value::Bool(false))
    );
    assert_eq!(id_of(&first, "build"), id_of(&again, "build"));
    assert_eq!(again["tasks"].as_array().unwrap().len(), 2, "{again}");
    let (code, v) = ws.run_file(&file("compile"));
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["workflow_status"], "succeeded", "{v}");
    assert_eq!(std::fs::read_to_string(log).unwrap(), "build\nreport\n");
    let out = ws.run(&["workflow", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let workflows = list["workflows"].as_array().unwrap();
    assert_eq!(workflows.len(), 1, "{list}");
    assert_eq!(workflows[0]["idempotency_key"], "nightly-2026-11-28");
    let out = ws.run(&["workflow", "show", first["workflow_id"].as_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(idempotency key nightly-2026-11-28)"),
        "{text}"
    );
    // A file of lone tasks has no workflow to key.
    let p = ws.path("tasks.yaml");
    std::fs::write(
        &p,
        "idempotency_key: x\ntasks:\n  - {name: a, command: \"true\"}\n",
    )
    .unwrap();
    let out = ws.run(&["submit", p.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("idempotency_key") && err.contains("belongs to a workflow"),
        "{err}"
    );
}

/// A scheduled workflow run starts at its time, every task of it: also a
/// task whose only dependency is a task outside the workflow that has
/// already finished (it used to run at once, ahead of its run).
#[test]
fn every_task_of_a_scheduled_run_waits_for_its_time() {
    let ws = Workspace::new();
    let (code, done) = ws.run_file("tasks:\n  - name: earlier\n    command: \"true\"\n");
    assert_eq!(code, 0, "{done}");
    let earlier = done["tasks"][0]["id"].as_str().unwrap().to_string();
    for schedule in [
        "{at: \"2099-01-01T00:00:00Z\"}".to_string(),
        "{cron: \"0 0 1 1 *\"}".to_string(),
    ] {
        let sub = submit_workflow(
            &ws,
            &format!(
                "name: later\nschedule: {schedule}\ntasks:\n  - name: after-earlier\n    command: \"true\"\n    depends_on: [\"{earlier}\"]\n  - name: root\n    command: \"true\"\n"
            ),
        );
        for name in ["after-earlier", "root"] {
            let t = ws.status(&id_of(&sub, name));
            assert_eq!(t["status"], "pending", "{schedule} {name}: {t}");
        }
        let a = ws.status(&id_of(&sub, "after-earlier"));
        let r = ws.status(&id_of(&sub, "root"));
        assert_eq!(a["run_at"], r["run_at"], "{schedule}");
        // The graph draws the dependency outside the workflow, with its edge.
        let wid = sub["workflow_id"].as_str().unwrap();
        let out = ws.run(&["workflow", "graph", wid, "--format", "dot"]);
        assert!(out.status.success());
        let dot = String::from_utf8_lossy(&out.stdout);
        assert!(dot.contains("earlier (outside)"), "{dot}");
        assert!(dot.contains("\"t2\" -> \"t0\""), "{dot}");
        let out = ws.run(&["workflow", "graph", wid]);
        let mermaid = String::from_utf8_lossy(&out.stdout);
        assert!(mermaid.contains("t2 --> t0"), "{mermaid}");
    }
}
