//! Helpers shared by the integration tests: a temp workspace with its own
//! database, and a way to run the real `task-queue` binary against it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Workspace {
    pub dir: tempfile::TempDir,
    /// Processes started with `spawn`, killed when the workspace goes (a
    /// failing test must not leave workers behind).
    spawned: std::sync::Mutex<Vec<u32>>,
    /// Log files handed out by `log_file`.
    logs: std::sync::atomic::AtomicUsize,
}

impl Drop for Workspace {
    fn drop(&mut self) {
        for pid in self.spawned.lock().unwrap().drain(..) {
            // SAFETY: kill(2) on a pid this workspace started; harmless if it is gone.
            unsafe {
                libc_kill(pid as i32, 9);
            }
        }
        // A failing test shows what its background processes logged.
        if std::thread::panicking() {
            let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("spawned-") && n.ends_with(".log"))
                })
                .collect();
            logs.sort();
            for log in logs {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(200).collect();
                eprintln!("--- {} (last {} lines) ---", log.display(), tail.len());
                for line in tail.into_iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

impl Workspace {
    pub fn new() -> Self {
        let ws = Workspace {
            dir: tempfile::tempdir().expect("temp dir"),
            spawned: std::sync::Mutex::new(Vec::new()),
            logs: std::sync::atomic::AtomicUsize::new(0),
        };
        // Short leases and polls keep crash and cancel tests fast.
        ws.write(
            "config.yml",
            "execution:\n  lease_duration: 3s\n  poll_interval: 100ms\n  kill_grace: 1s\n",
        );
        ws
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn db(&self) -> PathBuf {
        self.path("q.db")
    }

    pub fn write(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.path(rel);
        std::fs::write(&p, text).expect("write file");
        p
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.path(rel)).unwrap_or_default()
    }

    /// A `task-queue` command with `--db` and `--config` set.
    pub fn cmd(&self, args: &[&str]) -> Command {
        self.cmd_on(self.db().as_os_str(), args)
    }

    /// A `task-queue` command on another database (a PostgreSQL URL).
    pub fn cmd_on(&self, db: &std::ffi::OsStr, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_task-queue"));
        c.arg("--db")
            .arg(db)
            .arg("--config")
            .arg(self.path("config.yml"))
            .args(args)
            .current_dir(self.dir.path())
            // Tasks must not see the server's environment beyond the allowlist.
            .env("SECRET_FROM_SERVER", "leaked")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().expect("run task-queue")
    }

    /// Kills `pid` when the workspace goes.
    pub fn track(&self, pid: u32) {
        self.spawned.lock().unwrap().push(pid);
    }

    /// Starts `task-queue serve` on a free loopback port; returns its base
    /// URL and the child (killed when the workspace goes). Its stderr is
    /// drained so it never blocks on a full pipe.
    pub fn serve(&self) -> (String, Child) {
        use std::io::{BufRead, BufReader};
        let mut child = self
            .cmd(&["serve", "--bind", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        self.track(child.id());
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let url = loop {
            let line = lines
                .next()
                .expect("serve printed its address")
                .expect("read stderr");
            if let Some(rest) = line.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        (url, child)
    }

    /// A new `spawned-NN.log` in the workspace for a background process's
    /// stderr; printed if the test fails.
    pub fn log_file(&self) -> std::fs::File {
        let n = self.logs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::fs::File::create(self.path(&format!("spawned-{n:02}.log"))).expect("create log file")
    }

    /// Starts `task-queue ARGS` in the background, killed when the
    /// workspace goes. It logs at debug level (or `TASK_QUEUE_LOG`) to a
    /// file of [`Workspace::log_file`].
    pub fn spawn(&self, args: &[&str]) -> Child {
        let child = self
            .cmd(args)
            .env(
                "TASK_QUEUE_LOG",
                std::env::var("TASK_QUEUE_LOG").unwrap_or_else(|_| "task_queue=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .expect("spawn task-queue");
        self.track(child.id());
        child
    }

    /// `task-queue run FILE --json`: exit code and the summary.
    pub fn run_file(&self, yaml: &str) -> (i32, Value) {
        let f = self.write("tasks.yml", yaml);
        let out = self.run(&["run", f.to_str().unwrap(), "--json"]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "run --json printed no JSON ({e}); stdout: {stdout}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    /// `task-queue submit FILE`: the new ids in order.
    pub fn submit(&self, yaml: &str) -> Vec<String> {
        let f = self.write("submit.yml", yaml);
        let out = self.run(&["submit", f.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).expect("submit prints JSON");
        v["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// `task-queue status ID --json`.
    pub fn status(&self, id: &str) -> Value {
        let out = self.run(&["status", id, "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status prints JSON")
    }

    pub fn sqlite(&self, sql: &str) -> String {
        let out = Command::new("sqlite3")
            .arg(self.db())
            .arg(sql)
            .output()
            .expect("the sqlite3 CLI is required (apt-get install sqlite3)");
        assert!(
            out.status.success(),
            "sqlite3 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// Polls `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    f()
}

/// Processes whose command line contains `marker`.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        // Zombies have an empty cmdline; they are not running.
        if cmdline.contains(marker) && !is_zombie(pid) {
            out.push(pid);
        }
    }
    out
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(true)
}

pub fn task_by_name<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no task {name} in {summary}"))
}

pub fn ms(v: &Value) -> i64 {
    let s = v.as_str().expect("timestamp string");
    let t = humantime::parse_rfc3339(s).expect("rfc3339");
    t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

pub fn exists(p: &Path) -> bool {
    p.exists()
}

/// Held by tests that saturate the machine (several engine processes, many
/// child processes) and by tests that follow a manual clock in real time:
/// the two never run side by side, so the latter's waits stay meaningful
/// on a two-core machine.
pub static MACHINE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
