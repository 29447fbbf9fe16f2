//! Running commands: retries, timeouts, priorities, idempotency, results,
//! validation, artifacts, limits, cancel.

use std::time::{Duration, Instant};

use crate::common::*;

#[test]
fn retries_reach_max_attempts_with_growing_delays() {
    let ws = Workspace::new();
    let (code, summary) = ws.run_file(
        "tasks:\n  - name: always-fails\n    command: 'echo attempt $TASK_QUEUE_ATTEMPT >&2; exit 3'\n    \
         retry: {max_attempts: 4, initial_delay: 200ms, multiplier: 2, max_delay: 10s, jitter: 0}\n",
    );
    assert_eq!(code, 1, "{summary}");
    let t = task_by_name(&summary, "always-fails");
    assert_eq!(t["status"], "failed");
    assert_eq!(t["attempts"], 4);
    assert_eq!(t["exit_code"], 3);
    let status = ws.status(t["id"].as_str().unwrap());
    let history = status["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 4);
    let starts: Vec<i64> = history.iter().map(|a| ms(&a["started_at"])).collect();
    let ends: Vec<i64> = history.iter().map(|a| ms(&a["finished_at"])).collect();
    let gaps: Vec<i64> = (1..4).map(|i| starts[i] - ends[i - 1]).collect();
    // 200ms, 400ms, 800ms of backoff (no jitter), each at least as long as planned.
    for (gap, planned) in gaps.iter().zip([200, 400, 800]) {
        assert!(
            *gap >= planned,
            "gap {gap} ms shorter than the planned {planned} ms: {gaps:?}"
        );
    }
    assert!(
        gaps[0] < gaps[1] && gaps[1] < gaps[2],
        "delays must grow: {gaps:?}"
    );
    for (i, a) in history.iter().enumerate() {
        assert_eq!(a["attempt"], i as u64 + 1);
        assert_eq!(a["status"], "failed");
        assert_eq!(a["exit_code"], 3);
        assert!(
            a["stderr_tail"]
                .as_str()
                .unwrap()
                .contains(&format!("attempt {}", i + 1))
        );
    }
}

#[test]
fn timeout_kills_the_whole_process_group() {
    let ws = Workspace::new();
    let marker = format!("30.{}", std::process::id());
    let started = Instant::now();
    let (code, summary) = ws.run_file(&format!(
        "tasks:\n  - name: sleeper\n    command: 'sleep {marker} & sleep {marker}; echo done'\n    \
         timeout: 1s\n    retry: {{max_attempts: 1}}\n"
    ));
    let elapsed = started.elapsed();
    assert_eq!(code, 1);
    let t = task_by_name(&summary, "sleeper");
    assert_eq!(t["status"], "timed_out", "{summary}");
    assert!(elapsed < Duration::from_secs(6), "took {elapsed:?}");
    // Neither the foreground nor the background sleep survives.
    assert!(
        wait_until(Duration::from_secs(2), || processes_with(&marker)
            .is_empty()),
        "left behind: {:?}",
        processes_with(&marker)
    );
    let status = ws.status(t["id"].as_str().unwrap());
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{status}"
    );
}

#[test]
fn priorities_order_execution_fifo_within_a_priority() {
    let ws = Workspace::new();
    let mut yaml = String::from("tasks:\n");
    for (name, prio) in [
        ("low-1", -5),
        ("mid-1", 0),
        ("high-1", 10),
        ("mid-2", 0),
        ("high-2", 10),
        ("low-2", -5),
    ] {
        yaml.push_str(&format!(
            "  - {{name: {name}, priority: {prio}, command: 'echo {name} >> order.txt'}}\n"
        ));
    }
    ws.submit(&yaml);
    let out = ws.run(&["worker", "--until-idle", "--concurrency", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let order: Vec<String> = ws.read("order.txt").lines().map(String::from).collect();
    assert_eq!(
        order,
        ["high-1", "high-2", "mid-1", "mid-2", "low-1", "low-2"]
    );
}

#[test]
fn idempotent_submit_returns_the_same_task() {
    let ws = Workspace::new();
    let yaml = "tasks:\n  - {name: deploy, command: 'true', idempotency_key: deploy-2026-11-26}\n";
    let first = ws.submit(yaml);
    let f = ws.write("again.yml", yaml);
    let out = ws.run(&["submit", f.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tasks"][0]["id"], first[0].as_str());
    assert_eq!(v["tasks"][0]["created"], false);
    let list = ws.run(&["status", "--json"]);
    let page: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 1);
}

#[test]
fn result_file_validation_artifacts_params_and_env() {
    let ws = Workspace::new();
    let (code, summary) = ws.run_file(
        r#"tasks:
  - name: good
    parameters: {coverage: 91}
    env: {GREETING: hi}
    command: |
      printf '%s' "$TASK_QUEUE_PARAMS" > params.json
      echo "$GREETING $TASK_QUEUE_TASK_ID" > artifact.txt
      [ -z "$SECRET_FROM_SERVER" ] || exit 9
      echo '{"coverage": 91, "report": "artifact.txt"}' > "$TASK_QUEUE_RESULT"
    validation: {type: object, required: [coverage], properties: {coverage: {minimum: 80}}}
    artifacts: [artifact.txt]
    retry: {max_attempts: 1}
  - name: bad
    command: |
      echo '{"coverage": 42}' > "$TASK_QUEUE_RESULT"
    validation: {type: object, properties: {coverage: {minimum: 80}}}
    retry: {max_attempts: 3}
  - name: not-json
    command: |
      echo 'coverage=42' > "$TASK_QUEUE_RESULT"
    retry: {max_attempts: 1}
  - name: twice
    command: |
      echo '{"a": 1, "a": 2}' > "$TASK_QUEUE_RESULT"
    retry: {max_attempts: 1}
"#,
    );
    assert_eq!(code, 1, "{summary}");
    let good = ws.status(task_by_name(&summary, "good")["id"].as_str().unwrap());
    assert_eq!(good["status"], "succeeded", "{good}");
    assert_eq!(good["result"]["output"]["coverage"], 91);
    let artifact = &good["result"]["artifacts"][0];
    let content = ws.read("artifact.txt");
    assert_eq!(artifact["path"], "artifact.txt");
    assert_eq!(artifact["size"], content.len() as u64);
    use sha2::Digest;
    assert_eq!(
        artifact["sha256"],
        hex::encode(sha2::Sha256::digest(content.as_bytes()))
    );
    assert_eq!(ws.read("params.json"), r#"{"coverage":91}"#);
    assert!(content.starts_with("hi "));

    let bad = ws.status(task_by_name(&summary, "bad")["id"].as_str().unwrap());
    assert_eq!(bad["status"], "failed");
    assert_eq!(bad["attempts"], 1, "a validation failure is not retried");
    assert!(
        bad["error"].as_str().unwrap().contains("validation schema"),
        "{bad}"
    );
    let twice = ws.status(task_by_name(&summary, "twice")["id"].as_str().unwrap());
    assert_eq!(twice["status"], "failed", "{twice}");
    assert!(
        twice["error"].as_str().unwrap().contains("given twice"),
        "{twice}"
    );
    let nj = ws.status(task_by_name(&summary, "not-json")["id"].as_str().unwrap());
    assert!(
        nj["error"].as_str().unwrap().contains("not valid JSON"),
        "{nj}"
    );
}

/// Files that never end (a device, a FIFO) as an artifact or as the result
/// file fail their task with an error naming the file. Reading them hung a
/// thread of the runtime (and with it every other task, and SIGTERM).
#[test]
fn endless_files_fail_their_task_instead_of_hanging_the_engine() {
    let ws = Workspace::new();
    let f = ws.write(
        "endless.yml",
        r#"tasks:
  - name: artifact-device
    command: 'true'
    artifacts: [/dev/zero]
  - name: artifact-fifo
    command: mkfifo pipe.fifo
    artifacts: [pipe.fifo]
  - name: result-device
    command: 'rm -f "$TASK_QUEUE_RESULT"; ln -s /dev/zero "$TASK_QUEUE_RESULT"'
  - name: result-fifo
    command: 'rm -f "$TASK_QUEUE_RESULT"; mkfifo "$TASK_QUEUE_RESULT"'
  - name: ordinary
    command: 'echo "{\"ok\": true}" > "$TASK_QUEUE_RESULT"'
"#,
    );
    let mut child = ws
        .cmd(&["run", f.to_str().unwrap(), "--json"])
        .stdout(std::fs::File::create(ws.path("summary.json")).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    ws.track(child.id());
    let mut code = None;
    let ended = wait_until(Duration::from_secs(60), || {
        code = child.try_wait().unwrap().map(|s| s.code());
        code.is_some()
    });
    assert!(ended, "run did not end within 60 s");
    assert_eq!(code, Some(Some(1)));
    let summary: serde_json::Value = serde_json::from_str(&ws.read("summary.json")).unwrap();
    for (name, expect) in [
        (
            "artifact-device",
            "artifact \"/dev/zero\" was not produced: not a regular file",
        ),
        (
            "artifact-fifo",
            "artifact \"pipe.fifo\" was not produced: not a regular file",
        ),
        (
            "result-device",
            "cannot read the result file $TASK_QUEUE_RESULT: not a regular file",
        ),
        (
            "result-fifo",
            "cannot read the result file $TASK_QUEUE_RESULT: not a regular file",
        ),
    ] {
        let t = ws.status(task_by_name(&summary, name)["id"].as_str().unwrap());
        assert_eq!(t["status"], "failed", "{name}: {t}");
        assert!(t["error"].as_str().unwrap().contains(expect), "{name}: {t}");
    }
    let ok = ws.status(task_by_name(&summary, "ordinary")["id"].as_str().unwrap());
    assert_eq!(ok["status"], "succeeded", "{ok}");
    assert_eq!(ok["result"]["output"]["ok"], true, "{ok}");
}

#[test]
fn memory_limit_stops_a_memory_hog() {
    let ws = Workspace::new();
    let (code, summary) = ws.run_file(
        "tasks:\n  - name: hog\n    argv: [python3, -c, 'b = bytearray(1024 * 1024 * 1024); print(len(b))']\n    \
         limits: {memory_bytes: 256MiB}\n    retry: {max_attempts: 1}\n  \
         - name: modest\n    argv: [python3, -c, 'b = bytearray(16 * 1024 * 1024); print(len(b))']\n    \
         limits: {memory_bytes: 256MiB}\n",
    );
    assert_eq!(code, 1);
    let hog = ws.status(task_by_name(&summary, "hog")["id"].as_str().unwrap());
    assert_eq!(hog["status"], "failed", "{hog}");
    assert!(
        hog["result"]["stderr_tail"]
            .as_str()
            .unwrap()
            .contains("MemoryError"),
        "{hog}"
    );
    assert!(
        hog["error"].as_str().unwrap().contains("memory limit"),
        "{hog}"
    );
    assert_eq!(task_by_name(&summary, "modest")["status"], "succeeded");
}

#[test]
fn cpu_limit_and_output_cap() {
    let ws = Workspace::new();
    let started = Instant::now();
    let (_, summary) = ws.run_file(
        "tasks:\n  - name: spin\n    command: 'while :; do :; done'\n    limits: {cpu_seconds: 1}\n    \
         retry: {max_attempts: 1}\n  - name: chatty\n    command: 'head -c 200000 /dev/zero | tr \"\\\\0\" x'\n    \
         limits: {max_output_bytes: 4KiB}\n  - name: last-words\n    command: 'head -c 300000 /dev/zero | tr \"\\\\0\" x; echo; echo the-last-line'\n    \
         limits: {max_output_bytes: 1KiB}\n",
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    let spin = ws.status(task_by_name(&summary, "spin")["id"].as_str().unwrap());
    assert_eq!(spin["status"], "failed", "{spin}");
    assert!(
        spin["result"]["signal"] == 24 || spin["result"]["signal"] == 9,
        "{spin}"
    );
    let chatty = task_by_name(&summary, "chatty");
    assert_eq!(chatty["status"], "succeeded");
    let logs = ws.run(&["logs", chatty["id"].as_str().unwrap()]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains("195904 more bytes dropped"), "{text}");
    // The result's tail is the end of the stream, past the cap.
    let last = ws.status(task_by_name(&summary, "last-words")["id"].as_str().unwrap());
    let tail = last["result"]["stdout_tail"].as_str().unwrap();
    assert!(
        tail.ends_with("x\nthe-last-line\n"),
        "{}",
        &tail[tail.len().saturating_sub(80)..]
    );
    assert_eq!(tail.len(), 4096);
}

#[test]
fn cancel_from_another_process_stops_the_running_task() {
    let ws = Workspace::new();
    // A long lease: the renewal (every 20 s) cannot be what notices.
    ws.write(
        "config.yml",
        "execution:\n  lease_duration: 60s\n  poll_interval: 100ms\n  kill_grace: 1s\n",
    );
    let marker = format!("41.{}", std::process::id());
    let ids = ws.submit(&format!(
        "tasks:\n  - {{name: long, command: 'sleep {marker}'}}\n"
    ));
    let mut worker = ws.spawn(&["worker"]);
    assert!(
        wait_until(Duration::from_secs(10), || ws.status(&ids[0])["status"]
            == "running"),
        "never started"
    );
    assert!(wait_until(Duration::from_secs(5), || !processes_with(
        &marker
    )
    .is_empty()));
    let out = ws.run(&["cancel", &ids[0]]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(ws.status(&ids[0])["status"], "cancelled");
    // The worker checks its running tasks for cancels every second.
    let t = std::time::Instant::now();
    assert!(
        wait_until(Duration::from_secs(6), || processes_with(&marker)
            .is_empty()),
        "the cancelled task's process is still running"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let again = ws.run(&["cancel", &ids[0]]);
    assert!(again.status.success(), "cancelling twice is fine");
    let _ = worker.kill();
    let _ = worker.wait();
}

/// `run FILE` runs the file's tasks and the unfinished tasks outside it
/// that they depend on, and leaves the rest of the queue to the workers:
/// a task queued for a worker is neither started nor stopped by it.
#[test]
fn run_takes_only_its_own_tasks_and_their_dependencies() {
    let ws = Workspace::new();
    let ids = ws.submit(
        "tasks:\n  - {name: for-a-worker, command: 'echo ran >> other.log', retry: {max_attempts: 1}}\n  \
         - {name: needed, command: 'echo needed >> needed.log', depends_on: [first]}\n  \
         - {name: first, command: 'echo first >> needed.log'}\n",
    );
    let (other, needed) = (&ids[0], &ids[1]);
    let (code, summary) = ws.run_file(&format!(
        "tasks:\n  - {{name: mine, command: 'true'}}\n  \
         - {{name: after-needed, command: 'true', depends_on: ['{}']}}\n",
        needed.to_uppercase()
    ));
    assert_eq!(code, 0, "{summary}");
    assert_eq!(summary["status"], "succeeded", "{summary}");
    let o = ws.status(other);
    assert_eq!(o["status"], "queued", "{o}");
    assert_eq!(o["attempts"], 0, "{o}");
    assert!(!exists(&ws.path("other.log")), "the other task ran");
    assert_eq!(ws.status(needed)["status"], "succeeded");
    // And what that task depends on, outside the file too.
    assert_eq!(ws.status(&ids[2])["status"], "succeeded");
    assert_eq!(ws.read("needed.log"), "first\nneeded\n");
    // A worker then runs the other task once.
    let out = ws.run(&["worker", "--until-idle"]);
    assert!(out.status.success());
    assert_eq!(ws.status(other)["status"], "succeeded");
    assert_eq!(ws.read("other.log").trim(), "ran");
}

/// The longest command, environment variable and parameters a task may
/// have start (each is one string for the kernel, at most 128 KiB with its
/// NUL); one byte more is refused at submit, naming the field.
#[test]
fn the_longest_command_env_and_parameters_allowed_start() {
    let ws = Workspace::new();
    let pad = |n: usize| "x".repeat(n);
    // `: xxx…` is a shell no-op of exactly 131,071 bytes.
    let command = format!(": {}", pad(131_071 - 2));
    let file = serde_json::json!({"tasks": [
        {"name": "long-command", "command": command},
        {"name": "long-env", "command": "test ${#V} -eq 131069", "env": {"V": pad(131_069)}},
        {"name": "long-params", "command": "test ${#TASK_QUEUE_PARAMS} -eq 131053",
         "parameters": pad(131_051)},
    ]});
    let (code, summary) = ws.run_file(&file.to_string());
    assert_eq!(code, 0, "{summary}");
    for t in summary["tasks"].as_array().unwrap() {
        assert_eq!(t["status"], "succeeded", "{t}");
    }
    let over = serde_json::json!({"tasks": [
        {"name": "p", "command": "true", "parameters": pad(131_052)},
    ]});
    let f = ws.write("over.json", &over.to_string());
    let out = ws.run(&["submit", f.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parameters"), "{err}");
}

/// `worker --until-idle` runs what can run now and exits: a task waiting
/// for a later `schedule.at` stays pending for a later worker, as a
/// schedule's next run does.
#[test]
fn until_idle_does_not_wait_for_a_later_time() {
    let ws = Workspace::new();
    let ids = ws.submit(
        "tasks:\n  - {name: now, command: 'true'}\n  \
         - {name: later, command: 'true', schedule: {at: '2099-01-01T00:00:00Z'}}\n",
    );
    let mut worker = ws.spawn(&["worker", "--until-idle"]);
    let exited = wait_until(Duration::from_secs(20), || {
        matches!(worker.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = worker.kill();
    }
    let _ = worker.wait();
    assert!(exited, "the worker waited for a task due in 2099");
    assert_eq!(ws.status(&ids[0])["status"], "succeeded");
    assert_eq!(ws.status(&ids[1])["status"], "pending");
}

/// A limit over the worker's own hard limit cannot be set without
/// CAP_SYS_RESOURCE: the attempt fails naming the field, what it asked for
/// and the worker's limit (with the capability the task simply runs).
#[test]
fn a_limit_over_the_workers_hard_limit_is_named() {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let hard: Option<u64> = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|h| h.parse().ok());
    let Some(hard) = hard else {
        // "unlimited": nothing is over it.
        return;
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|c| u64::from_str_radix(c.trim(), 16).ok())
        .unwrap_or(0);
    let may_raise = caps & (1 << 24) != 0; // CAP_SYS_RESOURCE
    let ws = Workspace::new();
    let (code, summary) = ws.run_file(&format!(
        "tasks: [{{name: np, command: 'true', limits: {{max_processes: {}}}, retry: {{max_attempts: 1}}}}]\n",
        hard + 1
    ));
    let t = task_by_name(&summary, "np");
    if may_raise {
        assert_eq!(code, 0, "{summary}");
        return;
    }
    assert_eq!(code, 1, "{summary}");
    let id = t["id"].as_str().unwrap();
    let error = ws.status(id)["error"].as_str().unwrap_or("").to_string();
    assert!(
        error.contains("limits.max_processes")
            && error.contains(&(hard + 1).to_string())
            && error.contains(&format!("hard limit of {hard}")),
        "{error}"
    );
}

/// `status` pages through a long listing with `--cursor`.
#[test]
fn status_pages_with_a_cursor() {
    let ws = Workspace::new();
    let ids = ws.submit(
        "tasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true'}\n  \
         - {name: c, command: 'true'}\n  - {name: d, command: 'true'}\n  - {name: e, command: 'true'}\n",
    );
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut args = vec!["status", "--json", "--limit", "2"];
        if let Some(c) = &cursor {
            args.extend(["--cursor", c.as_str()]);
        }
        let out = ws.run(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let page: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for t in page["tasks"].as_array().unwrap() {
            seen.push(t["id"].as_str().unwrap().to_string());
        }
        cursor = page["next_cursor"].as_str().map(str::to_string);
        if cursor.is_none() {
            break;
        }
    }
    assert!(cursor.is_none(), "still more after five pages");
    seen.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(seen, want);
    // Off a terminal the plain listing says how to go on, on stderr.
    let out = ws.run(&["status", "--limit", "2"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("more: --cursor "));
}
