//! The SDKs under `clients/` against the real server: each one's own test
//! suite (Python's unittest, Node's test runner) runs against
//! `task-queue serve` on a free loopback port, with API tokens so that
//! roles are checked too.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::Workspace;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs a client's test suite; kills it (and fails) if it runs past
/// `limit`, so a suite that hangs cannot hang `cargo test`.
fn run_suite(cmd: &mut Command, limit: Duration) -> Output {
    use std::io::Read;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the client's tests");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let so = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let se = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the client's tests ran past {limit:?}:\n{}\n{}",
                String::from_utf8_lossy(&so.join().unwrap()),
                String::from_utf8_lossy(&se.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Output {
        status,
        stdout: so.join().unwrap(),
        stderr: se.join().unwrap(),
    }
}

/// `task-queue serve` with an admin and a viewer token: base URL, child,
/// admin token, viewer token.
fn serve_with_tokens(ws: &Workspace) -> (String, std::process::Child, String, String) {
    let token = |role: &str| {
        let out = ws.run(&["token", "create", "--role", role]);
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let (admin, viewer) = (token("admin"), token("viewer"));
    let (base, child) = ws.serve();
    (base, child, admin, viewer)
}

#[test]
fn python_client_against_the_server() {
    let ws = Workspace::new();
    let (base, _server, admin, viewer) = serve_with_tokens(&ws);
    let out = run_suite(
        Command::new("python3")
            .args(["-m", "unittest", "discover", "-v", "-s", "tests"])
            .current_dir(repo("clients/python"))
            .env("TASK_QUEUE_URL", &base)
            .env("TASK_QUEUE_TOKEN", &admin)
            .env("TASK_QUEUE_VIEWER_TOKEN", &viewer),
        Duration::from_secs(300),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n{stderr}"
    );
    // Every test ran, none was skipped.
    assert!(stderr.contains("Ran 10 tests"), "{stderr}");
    assert!(!stderr.contains("skipped"), "{stderr}");
    // What the tests did left the audit chain intact.
    let out = ws.run(&["audit", "verify"]);
    assert!(out.status.success());
}

#[test]
fn typescript_client_against_the_server() {
    let dir = repo("clients/typescript");
    // The compiler is the package's one dev dependency; `.ci/run` installs
    // it, and so does this test when it is missing.
    if !dir.join("node_modules/typescript").exists() {
        let out = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .output()
            .expect("npm (Node.js) is needed for the TypeScript client's tests");
        assert!(
            out.status.success(),
            "npm ci in clients/typescript failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ws = Workspace::new();
    let (base, _server, admin, viewer) = serve_with_tokens(&ws);
    let out = run_suite(
        Command::new("npm")
            .args(["test"])
            .current_dir(&dir)
            .env("TASK_QUEUE_URL", &base)
            .env("TASK_QUEUE_TOKEN", &admin)
            .env("TASK_QUEUE_VIEWER_TOKEN", &viewer),
        Duration::from_secs(300),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the TypeScript client's tests failed:\n{stdout}\n{stderr}"
    );
    // Every test ran, none was skipped.
    assert!(stdout.contains("# pass 9"), "{stdout}");
    assert!(stdout.contains("# skipped 0"), "{stdout}");
    let out = ws.run(&["audit", "verify"]);
    assert!(out.status.success());
}
