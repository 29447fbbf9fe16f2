//! Several `task-queue` processes sharing one PostgreSQL database, one of
//! them killed with SIGKILL midway. Needs `TASK_QUEUE_TEST_PG_URL`.

use std::collections::HashMap;
use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::Workspace;
use crate::conformance::Backend;

/// Workflow groups: a root, fan-out tasks, and a join. The last group's
/// join also waits for every other join, so the workflow ends in one task.
const GROUPS: usize = 20;
const GROUP_SIZE: usize = 100;
const INDEPENDENT: usize = 5_000;

fn effect(name: &str, file: &str) -> serde_json::Value {
    json!({
        "name": name,
        "command": format!("echo {name} >> {file}"),
        "retry": {"max_attempts": 3, "initial_delay": "100ms"},
    })
}

fn workflow_file(file: &str) -> serde_json::Value {
    let mut tasks = Vec::new();
    for g in 0..GROUPS {
        let root = format!("g{g}-root");
        tasks.push(effect(&root, file));
        let mut fans = Vec::new();
        for f in 0..GROUP_SIZE - 2 {
            let name = format!("g{g}-fan{f}");
            let mut t = effect(&name, file);
            t["depends_on"] = json!([root]);
            tasks.push(t);
            fans.push(name);
        }
        let mut join = effect(&format!("g{g}-join"), file);
        if g == GROUPS - 1 {
            fans.extend((0..GROUPS - 1).map(|k| format!("g{k}-join")));
        }
        join["depends_on"] = json!(fans);
        tasks.push(join);
    }
    json!({"name": "multinode", "tasks": tasks})
}

fn independent_file(file: &str) -> serde_json::Value {
    let tasks: Vec<_> = (0..INDEPENDENT)
        .map(|i| effect(&format!("ind{i}"), file))
        .collect();
    json!({ "tasks": tasks })
}

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql.to_string()))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_queue_and_survive_a_sigkill() {
    let _machine = crate::common::MACHINE.lock().await;
    let Some(backend) =
        Backend::postgres("three_nodes_share_one_queue_and_survive_a_sigkill").await
    else {
        return;
    };
    let url = backend.url();
    let ws = Workspace::new();
    ws.write(
        "config.yml",
        "execution:\n  lease_duration: 3s\n  poll_interval: 200ms\n  kill_grace: 1s\n  max_concurrent_tasks: 8\n",
    );
    let effects = ws.path("effects.txt");
    let effects_s = effects.display().to_string();
    let wf = ws.write("wf.json", &workflow_file(&effects_s).to_string());
    let ind = ws.write("ind.json", &independent_file(&effects_s).to_string());
    let run = |args: &[&str]| ws.cmd_on(url.as_ref(), args).output().unwrap();
    for f in [&wf, &ind] {
        let out = run(&["submit", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let total = (GROUPS * GROUP_SIZE + INDEPENDENT) as i64;
    let spawn = || -> Child {
        let mut c = ws.cmd_on(url.as_ref(), &["worker"]);
        c.stdout(std::process::Stdio::null()).stderr(ws.log_file());
        let child = c.spawn().unwrap();
        ws.track(child.id());
        child
    };
    let mut nodes: Vec<Child> = (0..3).map(|_| spawn()).collect();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let terminal = "SELECT COUNT(*) FROM tasks WHERE status IN \
                    ('succeeded', 'failed', 'timed_out', 'cancelled', 'skipped')";
    // Kill one node once a third of the work is done.
    let deadline = Instant::now() + Duration::from_secs(600);
    while scalar(&pool, terminal).await < total / 3 {
        assert!(Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut victim = nodes.remove(0);
    let victim_pid = victim.id() as i64;
    // SAFETY: kill(2) on a child this test started.
    unsafe { libc::kill(victim.id() as i32, libc::SIGKILL) };
    let _ = victim.wait();
    let killed_at = scalar(&pool, terminal).await;
    while scalar(&pool, terminal).await < total {
        assert!(
            Instant::now() < deadline,
            "not every task finished: {} of {total}",
            scalar(&pool, terminal).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for mut n in nodes {
        let _ = n.kill();
        let _ = n.wait();
    }
    let succeeded = scalar(
        &pool,
        "SELECT COUNT(*) FROM tasks WHERE status = 'succeeded'",
    )
    .await;
    assert_eq!(succeeded, total, "every task succeeded");
    let victim_worker: String = sqlx::query_scalar(
        "SELECT id FROM workers WHERE pid = $1 ORDER BY started_at DESC LIMIT 1",
    )
    .bind(victim_pid)
    .fetch_one(&pool)
    .await
    .unwrap();
    // Tasks the killed node was running: their lost attempt is recorded.
    let lost: Vec<(String, i64)> = sqlx::query_as(
        "SELECT t.name, t.attempts FROM attempts a JOIN tasks t ON t.id = a.task_id \
         WHERE a.status = 'lost' AND a.worker_id = $1",
    )
    .bind(&victim_worker)
    .fetch_all(&pool)
    .await
    .unwrap();
    let lost: HashMap<String, i64> = lost.into_iter().collect();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for line in std::fs::read_to_string(&effects).unwrap().lines() {
        *seen.entry(line.to_string()).or_default() += 1;
    }
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM tasks")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names.len() as i64, total);
    let mut twice = 0;
    for name in &names {
        match seen.get(name).copied().unwrap_or(0) {
            0 => panic!("{name} never ran"),
            1 => {}
            2 => {
                let attempts = lost.get(name).copied();
                assert!(
                    attempts.is_some_and(|a| a >= 2),
                    "{name} ran twice but was not a lost attempt of the killed node re-run"
                );
                twice += 1;
            }
            n => panic!("{name} ran {n} times"),
        }
    }
    assert!(seen.len() == names.len(), "a side effect of no task");
    eprintln!(
        "multinode: {total} tasks, node killed after {killed_at}; {} attempts lost, {twice} side effects repeated",
        lost.len()
    );
    let out = run(&["audit", "verify"]);
    assert!(
        out.status.success(),
        "audit verify failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    pool.close().await;
    backend.cleanup().await;
}
