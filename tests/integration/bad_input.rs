//! Bad input gets a clear error naming the field, exit code 2, and stores nothing.

use crate::common::*;
use serde_json::Value;

fn rejected(ws: &Workspace, yaml: &str) -> String {
    let f = ws.write("bad.yml", yaml);
    let out = ws.run(&["run", f.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn malformed_and_mistyped_files_are_rejected_with_the_field() {
    let ws = Workspace::new();
    let cases: &[(&str, &[&str])] = &[
        ("tasks: [ {name: a, command: 'true' ", &["malformed YAML"]),
        ("{\"tasks\": [{\"name\": \"a\", ", &["malformed JSON"]),
        ("- just a list\n", &["tasks"]),
        (
            "tasks:\n  - {name: a, command: 'true', priority: high}\n",
            &["tasks[0].priority"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', priority: 500}\n",
            &["tasks[0].priority", "between -100 and 100"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', colour: red}\n",
            &["colour"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', timeout: soon}\n",
            &["tasks[0].timeout", "duration"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', retry: {max_delay: 500ms}}\n",
            &[
                "tasks[0].retry.initial_delay",
                "by default",
                "give initial_delay too",
            ],
        ),
        // Refusals found past parsing name the file too.
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [a]}\n",
            &["bad.yml: tasks[0].depends_on[0]", "depends on itself"],
        ),
        // YAML in flow style is YAML: its error is about the task, not JSON.
        (
            "{tasks: [{name: a, command: 'true', priority: high}]}\n",
            &["tasks[0].priority"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', timeout: 1ns}\n",
            &["tasks[0].timeout", "between 1ms and 7 days"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', timeout: 0.0001}\n",
            &["tasks[0].timeout", "between 1ms and 7 days"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', retry: {max_attempts: 0}}\n",
            &["tasks[0].retry.max_attempts"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', retry: {tries: 3}}\n",
            &["tries"],
        ),
        (
            "tasks:\n  - {name: 'has space', command: 'true'}\n",
            &["tasks[0].name"],
        ),
        ("tasks:\n  - {name: a}\n", &["tasks[0].command", "required"]),
        (
            "tasks:\n  - {name: a, command: 'true', argv: ['true']}\n",
            &["tasks[0].argv", "not both"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', env: {TASK_QUEUE_RESULT: x}}\n",
            &["env.TASK_QUEUE_RESULT"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', limits: {memory_bytes: 12 parsecs}}\n",
            &["tasks[0].limits.memory_bytes"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', validation: {type: 12}}\n",
            &["tasks[0].validation", "JSON Schema"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [b]}\n",
            &["tasks[0].depends_on[0]", "unknown task \"b\""],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', schedule: {cron: 'every tuesday'}}\n",
            &["tasks[0].schedule.cron"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', schedule: {at: tomorrow}}\n",
            &["tasks[0].schedule.at"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', schedule: {cron: '* * * * *', timezone: Mars/Base}}\n",
            &["tasks[0].schedule.timezone", "IANA"],
        ),
        (
            "tasks:\n  - {name: a, kind: http, http: {url: 'ftp://x'}}\n",
            &["tasks[0].http.url", "http or https"],
        ),
        (
            "tasks:\n  - {name: a, http: {method: FETCH, url: 'http://x'}}\n",
            &["tasks[0].http.method"],
        ),
        (
            "tasks:\n  - {name: a, kind: http}\n",
            &["tasks[0].http", "required"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', health_check: {url: 'localhost:80'}}\n",
            &["tasks[0].health_check.url"],
        ),
        (
            "tasks:\n  - {name: a, command: 'true', depends_on: [{task: b, condition: {schema: {type: 3}}}]}\n  - {name: b, command: 'true'}\n",
            &["tasks[0].depends_on[0].condition.schema", "JSON Schema"],
        ),
        ("tasks:\n  - {name: a, kind: rocket}\n", &["tasks[0].kind"]),
        ("tasks: []\n", &["at least one"]),
    ];
    for (yaml, needles) in cases {
        let err = rejected(&ws, yaml);
        for n in *needles {
            assert!(err.contains(n), "for {yaml:?} expected {n:?} in: {err}");
        }
    }
    // Nothing of a rejected file was stored.
    let page = ws.run(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&page.stdout).unwrap();
    assert!(v["tasks"].as_array().unwrap().is_empty());
}

#[test]
fn oversize_values_are_rejected() {
    let ws = Workspace::new();
    let long_name = "n".repeat(200);
    let err = rejected(
        &ws,
        &format!("tasks:\n  - {{name: {long_name}, command: 'true'}}\n"),
    );
    assert!(
        err.contains("tasks[0].name") && err.contains("1 to 128"),
        "{err}"
    );
    let huge = "x".repeat(200 * 1024);
    let err = rejected(
        &ws,
        &format!("tasks:\n  - {{name: a, command: 'echo {huge}'}}\n"),
    );
    assert!(
        err.contains("tasks[0].command") && err.contains("at most"),
        "{err}"
    );
    let err = rejected(
        &ws,
        &format!(
            "tasks:\n  - {{name: a, command: 'true', parameters: {{blob: '{huge}{huge}'}}}}\n"
        ),
    );
    assert!(err.contains("tasks[0].parameters"), "{err}");
}

#[test]
fn a_bad_config_names_the_key() {
    let ws = Workspace::new();
    ws.write("config.yml", "execution:\n  max_concurent_tasks: 3\n");
    let out = ws.run(&["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("max_concurent_tasks"));
}

#[test]
fn unknown_ids_are_named() {
    let ws = Workspace::new();
    ws.submit("tasks:\n  - {name: a, command: 'true'}\n");
    let out = ws.run(&["status", "not-an-id"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not-an-id"));
    let out = ws.run(&["cancel", "01a21990-b7b0-716b-8a47-009bbaa5872d"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

/// An id is a UUID in any form a UUID parser reads: uppercase, without
/// hyphens or in braces it names the same task, workflow or dependency.
#[test]
fn ids_in_any_uuid_form_name_the_same_task() {
    let ws = Workspace::new();
    let (code, summary) = ws.run_file(
        "name: forms\ntasks:\n  - {name: once, command: 'echo hi'}\n  - {name: after, command: 'true', depends_on: [once]}\n",
    );
    assert_eq!(code, 0, "{summary}");
    let id = summary["tasks"][0]["id"].as_str().unwrap().to_string();
    let wf = summary["workflow_id"].as_str().unwrap().to_string();
    let upper = id.to_uppercase();
    let simple = id.replace('-', "");
    let braced = format!("{{{id}}}");
    for form in [&upper, &simple, &braced] {
        let out = ws.run(&["status", form, "--json"]);
        assert!(
            out.status.success(),
            "{form}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["id"], id.as_str(), "{form}: {v}");
        let out = ws.run(&["logs", form, "--attempt", "1"]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("hi"),
            "{form}"
        );
    }
    let out = ws.run(&["workflow", "show", &wf.to_uppercase(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A schedule paused and resumed by its uppercase id.
    let f = ws.write(
        "cron.yml",
        "name: nightly\nschedule: {cron: '0 3 * * *'}\ntasks:\n  - {name: n, command: 'true'}\n",
    );
    let out = ws.run(&["submit", f.to_str().unwrap()]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let sid = v["schedule_id"].as_str().unwrap().to_uppercase();
    for verb in ["pause", "resume"] {
        let out = ws.run(&["schedule", verb, &sid]);
        assert!(
            out.status.success(),
            "schedule {verb} {sid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A dependency on an existing task, by its uppercase id.
    let ids = ws.submit(&format!(
        "tasks:\n  - {{name: later, command: 'true', depends_on: ['{upper}']}}\n"
    ));
    let out = ws.run(&["status", &ids[0], "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "queued", "{v}");
}

/// Output into a pipe nobody reads any more (`task-queue status | head`):
/// the command ends as command-line tools do, without a panic or a
/// backtrace.
#[test]
fn a_closed_output_pipe_ends_the_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let ws = Workspace::new();
    ws.submit("tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n");
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = ws
        .cmd(&["status", "--json"])
        .env("RUST_BACKTRACE", "1")
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

/// A command about what a queue holds, pointed at a database that does
/// not exist (a mistyped `--db`), says so instead of creating an empty one
/// and its directories; the commands that write create it.
#[test]
fn reading_commands_do_not_create_a_database() {
    let ws = Workspace::new();
    let db = ws.path("not/there/q.db");
    for args in [
        vec!["status"],
        vec!["audit", "verify"],
        vec!["workflow", "list"],
        vec!["token", "list"],
        vec!["search", "deploy"],
    ] {
        let out = ws.cmd_on(db.as_os_str(), &args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains("no database at"), "{args:?}: {err}");
        assert!(!ws.path("not").exists(), "{args:?} created it");
    }
    let f = ws.write("one.yml", "tasks:\n  - {name: a, command: 'true'}\n");
    // `submit` creates it; then `status` reads it.
    for args in [
        vec!["submit", f.to_str().unwrap()],
        vec!["status", "--json"],
    ] {
        let out = ws.cmd_on(db.as_os_str(), &args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{args:?}: {err}");
    }
}

/// `run` keeps SIGPIPE ignored while its engine runs, so a reader that
/// went away before the summary makes the write fail: the command still
/// ends with the run's own exit status, without a panic, and the tasks ran.
#[test]
fn run_into_a_closed_output_pipe_keeps_its_exit_status() {
    let ws = Workspace::new();
    let f = ws.write(
        "tasks.yaml",
        "tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n",
    );
    for args in [
        vec!["run", f.to_str().unwrap(), "--json"],
        vec!["run", f.to_str().unwrap()],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = ws
            .cmd(&args)
            .env("RUST_BACKTRACE", "1")
            .stdout(writer)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(!err.contains("cannot write"), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    }
    let out = ws.run(&["status", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tasks = v
        .as_array()
        .or_else(|| v["tasks"].as_array())
        .expect("a list of tasks");
    assert_eq!(tasks.len(), 4, "{v}");
    assert!(tasks.iter().all(|t| t["status"] == "succeeded"), "{v}");
}

/// Attempts and ids that do not exist are errors naming the field, not
/// empty successes; the plain status shows exit codes as numbers.
#[test]
fn attempts_and_ids_that_do_not_exist_are_refused() {
    let ws = Workspace::new();
    let (code, summary) = ws.run_file("tasks:\n  - {name: once, command: 'echo hi'}\n");
    assert_eq!(code, 0);
    let id = summary["tasks"][0]["id"].as_str().unwrap().to_string();
    for (args, expect) in [
        (
            vec!["logs", id.as_str(), "--attempt", "9"],
            "invalid attempt: task",
        ),
        (
            vec!["logs", id.as_str(), "--attempt", "0"],
            "invalid attempt",
        ),
        (vec!["audit", "show", "nonsense"], "invalid id"),
        (vec!["audit", "show", "--limit", "0"], "invalid limit"),
        (
            vec!["worker", "--concurrency", "0"],
            "invalid --concurrency",
        ),
    ] {
        let out = ws.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // A well-formed id that names nothing is not an empty trail.
    let out = ws.run(&["audit", "show", "0193b0c2-0000-7000-8000-000000000000"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not found"), "{err}");
    let out = ws.run(&["audit", "show", &id]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"submitted\""));
    let out = ws.run(&["logs", &id, "--attempt", "1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("hi"));
    let out = ws.run(&["status", &id]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("#1 succeeded exit=0 "), "{text}");
    assert!(!text.contains("Some(") && !text.contains("None"), "{text}");
}

/// Logs to a pipe or a file are plain text (no colour codes), and `run`
/// says up front that an external task waits for a worker to claim it
/// instead of leaving the user looking at a run that never ends.
#[test]
fn plain_logs_off_a_terminal_and_a_note_for_external_tasks_in_run() {
    use std::io::Read;
    let ws = Workspace::new();
    let one = ws.write("one.yml", "tasks:\n  - {name: one, command: 'true'}\n");
    let out = ws.run(&[
        "--log-level",
        "task_queue=debug",
        "run",
        one.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.is_empty(), "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");

    let f = ws.write("ext.yml", "tasks:\n  - {name: by-hand, kind: external}\n");
    let mut child = ws
        .cmd(&["run", f.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("is an external task") {
                break;
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    let seen = wait_until(std::time::Duration::from_secs(10), || reader.is_finished());
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "no note within 10 s");
    let text = reader.join().unwrap();
    assert!(
        text.contains("by-hand") && text.contains("waits until a worker claims it"),
        "{text}"
    );
}
