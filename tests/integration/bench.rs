//! The benchmark scenarios run end to end on the real binary with small
//! counts: each prints one JSON object whose numbers come from the work it
//! did (every task accounted for), with its same-run baseline.

use crate::common::Workspace;

fn bench(ws: &Workspace, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = ws.run(&all);
    assert!(
        out.status.success(),
        "bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bench {args:?} printed no JSON object ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn positive(v: &serde_json::Value, key: &str) -> f64 {
    let n = v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"));
    assert!(n > 0.0, "{key} = {n} in {v}");
    n
}

#[test]
fn submit_noop_command_and_http_benchmarks_report_the_work_they_did() {
    let ws = Workspace::new();

    let submit = bench(&ws, &["submit", "--tasks", "400", "--concurrency", "8"]);
    assert_eq!(submit["scenario"], "submit");
    assert_eq!(submit["tasks"], 400);
    positive(&submit, "tasks_per_sec");
    positive(&submit["baseline"], "tasks_per_sec");

    // Batched submits also measure the storage floor: the same rows by
    // SQLite alone, with its checkpoint timed apart.
    let batched = bench(
        &ws,
        &[
            "submit",
            "--tasks",
            "600",
            "--concurrency",
            "2",
            "--batch",
            "100",
        ],
    );
    assert_eq!(batched["batch"], 100);
    assert_eq!(batched["storage_floor"]["tasks"], 600, "{batched}");
    positive(&batched["storage_floor"], "tasks_per_sec");
    positive(&batched["storage_floor"], "us_per_task");
    positive(&batched["storage_floor"], "tasks_per_sec_with_checkpoint");
    positive(&batched, "floor_ratio");
    assert!(submit.get("storage_floor").is_none(), "{submit}");

    let noop = bench(&ws, &["noop", "--tasks", "600", "--concurrency", "20"]);
    assert_eq!(noop["scenario"], "noop");
    assert_eq!(noop["tasks"], 600);
    // One latency sample per task: every task was claimed and finished.
    assert_eq!(noop["latency_samples"], 600);
    positive(&noop, "tasks_per_sec");
    positive(&noop, "peak_rss_mb");

    // Three spawn loops beside the engine's run: tokio's posix_spawn, its
    // fork path, and the engine's executor without the store.
    let command = bench(&ws, &["command", "--tasks", "100", "--concurrency", "4"]);
    assert_eq!(command["latency_samples"], 100);
    positive(&command, "tasks_per_sec");
    for key in ["baseline", "baseline_fork", "executor_alone"] {
        assert_eq!(command[key]["tasks"], 100, "{key}: {command}");
        positive(&command[key], "tasks_per_sec");
    }

    let http = bench(&ws, &["http", "--tasks", "300", "--concurrency", "4"]);
    assert_eq!(http["scenario"], "http");
    positive(&http, "tasks_per_sec");
    positive(&http["get"], "requests_per_sec");
    positive(&http["baseline"], "tasks_per_sec");
    assert!(http["goal"]["met"].is_boolean(), "{http}");
}
