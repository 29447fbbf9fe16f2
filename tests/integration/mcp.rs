//! The MCP server driven by clients we did not write: the Python `mcp`
//! package (stdio, streamable HTTP, legacy SSE) and the MCP Inspector CLI.
//! `.ci/run` installs both (`pip install 'mcp>=2.3,<3'`, Node's npx).

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::common::Workspace;

fn repo(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_task-queue")
}

/// Runs tests/mcp/scenario.py and returns its report.
fn scenario(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(repo("tests/mcp/scenario.py"))
        .args(args)
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("No module named 'mcp'"),
        "the Python MCP client is missing: pip install 'mcp>=2.3,<3'"
    );
    assert!(
        out.status.success(),
        "scenario {args:?} failed:\n{stderr}\n{stdout}"
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    report
}

fn inspector(args: &[&str]) -> Value {
    let out = Command::new("npx")
        .args(["-y", "@modelcontextprotocol/inspector@0.15.0", "--cli"])
        .args(args)
        .output()
        .expect("npx (Node.js) is required for the MCP Inspector CLI");
    assert!(
        out.status.success(),
        "inspector {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "inspector printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn tools_schema_is_what_the_server_serves() {
    let out = Command::new(bin()).arg("tools-schema").output().unwrap();
    assert!(out.status.success());
    let printed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let file: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("tools.schema")).unwrap()).unwrap();
    assert!(
        printed == file,
        "tools.schema is stale: run `cargo run -- tools-schema > tools.schema`"
    );
    let tools = file["tools"].as_array().unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    for want in [
        "submit_task",
        "submit_workflow",
        "get_task",
        "list_tasks",
        "get_workflow",
        "wait_for_task",
        "cancel_task",
        "retry_task",
        "approve_task",
        "get_task_logs",
        "claim_task",
        "complete_task",
        "fail_task",
        "heartbeat_task",
        "search_tasks",
        "recommend",
        "queue_stats",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for t in tools {
        let name = t["name"].as_str().unwrap();
        assert!(
            t["description"].as_str().unwrap().len() > 80,
            "{name}: a description a model can act on"
        );
        assert_eq!(t["outputSchema"]["type"], "object", "{name}: outputSchema");
        assert_eq!(t["inputSchema"]["type"], "object", "{name}: inputSchema");
        let a = &t["annotations"];
        for hint in [
            "readOnlyHint",
            "destructiveHint",
            "idempotentHint",
            "openWorldHint",
        ] {
            assert!(a[hint].is_boolean(), "{name}: {hint}");
        }
    }
    // The hints match what the tools do.
    let hint = |name: &str, h: &str| {
        tools.iter().find(|t| t["name"] == name).unwrap()["annotations"][h]
            .as_bool()
            .unwrap()
    };
    assert!(hint("get_task", "readOnlyHint") && hint("wait_for_task", "readOnlyHint"));
    assert!(!hint("submit_task", "readOnlyHint") && hint("submit_task", "openWorldHint"));
    assert!(hint("cancel_task", "destructiveHint") && hint("cancel_task", "idempotentHint"));
}

#[test]
fn python_client_over_stdio() {
    let ws = Workspace::new();
    let db = ws.db();
    let config = ws.path("config.yml");
    let schema = repo("tools.schema");
    let report = scenario(&[
        "stdio",
        bin(),
        db.to_str().unwrap(),
        config.to_str().unwrap(),
        schema.to_str().unwrap(),
    ]);
    assert_eq!(report["tools"], 17);
    assert!(!report["progress_messages"].as_array().unwrap().is_empty());
}

#[test]
fn python_client_over_streamable_http_and_legacy_sse() {
    let ws = Workspace::new();
    let (base, _server) = ws.serve();
    let schema = repo("tools.schema");
    scenario(&["http", &format!("{base}/mcp"), schema.to_str().unwrap()]);
    scenario(&["sse", &format!("{base}/sse"), schema.to_str().unwrap()]);
    // Another site's name in the Host header (DNS rebinding) is refused on
    // every route, the legacy ones included.
    let addr = base.trim_start_matches("http://");
    for path in ["/sse", "/mcp"] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: evil.example\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 403", "{path}");
    }
    // The stored audit chain is intact after both sessions.
    let out = ws.run(&["audit", "verify"]);
    assert!(out.status.success());
}

/// What the HTTP transports refuse is still JSON-RPC: a body that is not a
/// message is a parse error (HTTP 400, `-32700`, as over stdio), an
/// unknown session an invalid request with the transport's reason.
#[test]
fn http_transport_refusals_are_jsonrpc_errors() {
    use std::io::{Read, Write};
    let ws = Workspace::new();
    let (base, _server) = ws.serve();
    let addr = base.trim_start_matches("http://").to_string();
    // One request on a connection of its own; the whole answer.
    let raw = |method: &str, path: &str, extra: &str, body: &str| -> String {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Accept: application/json, text/event-stream\r\n{extra}Content-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let post = |path: &str, extra: &str, body: &str| -> (u16, Value) {
        let out = raw("POST", path, extra, body);
        let status: u16 = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
        let start = body.find('{').unwrap_or(0);
        let end = body.rfind('}').map_or(body.len(), |e| e + 1);
        let v = serde_json::from_str(&body[start..end])
            .unwrap_or_else(|e| panic!("{path} {body:?}: not JSON ({e}): {out}"));
        (status, v)
    };
    for body in ["{bad", "", "[]"] {
        let (status, v) = post("/mcp", "", body);
        assert_eq!(status, 400, "{body:?}: {v}");
        assert_eq!(v["error"]["code"], -32700, "{body:?}: {v}");
        assert_eq!(v["id"], Value::Null, "{v}");
    }
    let msg = r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#;
    let (status, v) = post("/mcp", "Mcp-Session-Id: nope\r\n", msg);
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], -32600, "{v}");
    // Ending a session: one that exists ends once; after that, and for one
    // that never existed, the answer is 404.
    let init = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let answer = raw("POST", "/mcp", "", init);
    let session = answer
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("mcp-session-id:")
                .then(|| l.split_once(':').unwrap().1.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no session id: {answer}"));
    let header = format!("Mcp-Session-Id: {session}\r\n");
    let ended = raw("DELETE", "/mcp", &header, "");
    assert!(ended.starts_with("HTTP/1.1 20"), "{ended}");
    for extra in [header.as_str(), "Mcp-Session-Id: nope\r\n"] {
        let again = raw("DELETE", "/mcp", extra, "");
        assert!(again.starts_with("HTTP/1.1 404"), "{extra}: {again}");
        assert!(again.contains("-32600"), "{again}");
    }
    let (status, v) = post("/messages?sessionId=zzz", "", msg);
    assert_eq!(status, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("sessionId"),
        "{v}"
    );
    // Arguments the MCP library would read the wrong way are answered with
    // the request's id (over stdio too: `the_stdio_server_answers_unreadable_lines`).
    let twice = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"get_task","arguments":{"id":"a","id":"b"}}}"#;
    let (status, v) = post("/mcp", "", twice);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!(7), json!(-32602)),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("twice"),
        "{v}"
    );
    // On the legacy transport the answer comes on the session's stream.
    let mut sse = std::net::TcpStream::connect(&addr).unwrap();
    sse.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        sse,
        "GET /sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    let mut seen = String::new();
    let mut read_until = |sse: &mut std::net::TcpStream, what: &str| -> String {
        let mut buf = [0u8; 4096];
        while !seen.contains(what) {
            let n = sse.read(&mut buf).unwrap();
            assert!(n > 0, "the stream ended: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen.clone()
    };
    let got = read_until(&mut sse, "sessionId=");
    let session: String = got
        .split("sessionId=")
        .nth(1)
        .unwrap()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let wide = r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":"submit_task","arguments":{"name":"w","command":"true","priority":123456789012345678901234}}}"#;
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /messages?sessionId={session} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{wide}",
        wide.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 202"), "{out}");
    let got = read_until(&mut sse, "64 bits");
    let data = got
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|l| l.contains("64 bits"))
        .unwrap();
    let v: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (v["id"].clone(), v["error"]["code"].clone()),
        (json!(8), json!(-32602)),
        "{v}"
    );
}

#[test]
fn python_client_with_tokens_gets_what_each_role_allows() {
    let ws = Workspace::new();
    let token = |role: &str| {
        let out = ws.run(&["token", "create", "--role", role]);
        assert!(out.status.success());
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let (viewer, worker, operator) = (token("viewer"), token("worker"), token("operator"));
    let (base, _server) = ws.serve();
    let report = scenario(&["roles", &format!("{base}/mcp"), &viewer, &worker, &operator]);
    assert!(
        report["viewer_denied"]
            .as_str()
            .unwrap()
            .contains("task-queue token create --role operator"),
        "{report}"
    );
    let id = report["operator_submitted"].as_str().unwrap();
    assert_eq!(ws.status(id)["name"], "allowed");
}

#[test]
fn inspector_cli_over_stdio_http_and_sse() {
    let ws = Workspace::new();
    let db_env = format!("TASK_QUEUE_DB={}", ws.db().display());
    let list = inspector(&["-e", &db_env, bin(), "mcp", "--method", "tools/list"]);
    assert_eq!(list["tools"].as_array().unwrap().len(), 17);
    let (base, _server) = ws.serve();
    let called = inspector(&[
        &format!("{base}/mcp"),
        "--transport",
        "http",
        "--method",
        "tools/call",
        "--tool-name",
        "submit_task",
        "--tool-arg",
        "name=from-inspector",
        "--tool-arg",
        "command=true",
    ]);
    assert_eq!(called["isError"], false, "{called}");
    assert_eq!(called["structuredContent"]["name"], "from-inspector");
    let templates = inspector(&[
        &format!("{base}/sse"),
        "--transport",
        "sse",
        "--method",
        "resources/templates/list",
    ]);
    assert_eq!(templates["resourceTemplates"].as_array().unwrap().len(), 2);
    let bad = inspector(&[
        &format!("{base}/sse"),
        "--transport",
        "sse",
        "--method",
        "tools/call",
        "--tool-name",
        "get_task",
        "--tool-arg",
        "id=not-a-uuid",
    ]);
    assert_eq!(bad["isError"], true, "{bad}");
    assert!(
        bad["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("invalid id")
    );
}

/// `task-queue mcp` on a new database, its stdin and stdout piped.
fn stdio_server() -> (
    tempfile::TempDir,
    std::process::Child,
    std::process::ChildStdin,
) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .arg("--db")
        .arg(dir.path().join("q.db"))
        .arg("mcp")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    (dir, child, stdin)
}

/// SIGTERM ends `task-queue mcp` even while its client keeps stdin open:
/// the engine stops and the process exits, instead of lingering on a read
/// of stdin that nothing will answer.
#[test]
fn the_stdio_server_exits_on_sigterm_with_stdin_open() {
    use std::io::{BufRead, Write};
    let (_dir, mut child, mut stdin) = stdio_server();
    writeln!(
        stdin,
        r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-06-18","capabilities":{{}},"clientInfo":{{"name":"t","version":"0"}}}}}}"#
    )
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"id\":1"), "{line}");
    writeln!(
        stdin,
        r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > std::time::Duration::from_secs(15) {
            let _ = child.kill();
            panic!("still running 15 s after SIGTERM");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    drop(stdin);
}

/// Over stdio every request gets an answer: a line that is not JSON, JSON
/// nested past the parser's limit, and `tools/call` with `arguments` that
/// is not an object get JSON-RPC errors; the session goes on after them.
#[test]
fn the_stdio_server_answers_unreadable_lines() {
    use std::io::{BufRead, Write};
    let (_dir, mut child, mut stdin) = stdio_server();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut answer = |stdin: &mut std::process::ChildStdin, line: &str| -> Value {
        writeln!(stdin, "{line}").unwrap();
        let mut got = String::new();
        out.read_line(&mut got).unwrap();
        serde_json::from_str(&got).unwrap_or_else(|e| panic!("{e}: {got}"))
    };
    let init = answer(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"0"}}}"#,
    );
    assert_eq!(init["id"], 1);
    writeln!(
        stdin,
        r#"{{"jsonrpc":"2.0","method":"notifications/initialized"}}"#
    )
    .unwrap();
    let e = answer(&mut stdin, "garbage");
    assert_eq!(e["error"]["code"], -32700, "{e}");
    let deep = format!(
        r#"{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"submit_task","arguments":{{"name":"d","command":"true","parameters":{{"x":{}1{}}}}}}}}}"#,
        "[".repeat(150),
        "]".repeat(150)
    );
    let e = answer(&mut stdin, &deep);
    assert_eq!(e["error"]["code"], -32700, "{e}");
    let e = answer(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"get_task","arguments":[1,2]}}"#,
    );
    assert_eq!(
        (e["id"].clone(), e["error"]["code"].clone()),
        (serde_json::json!(3), serde_json::json!(-32602)),
        "{e}"
    );
    // What the library would take the wrong way is answered with the id:
    // a key given twice (it would keep the last), an integer wider than 64
    // bits (it would become a float), a call without a tool name, an id
    // without a method.
    for (id, line, code, says) in [
        (
            21,
            r#"{"jsonrpc":"2.0","id":21,"method":"tools/call","params":{"name":"submit_task","arguments":{"name":"a","command":"true","command":"rm -rf x"}}}"#,
            -32602,
            "twice",
        ),
        (
            22,
            r#"{"jsonrpc":"2.0","id":22,"method":"tools/call","params":{"name":"submit_task","arguments":{"name":"a","command":"true","parameters":{"n":123456789012345678901234567890}}}}"#,
            -32602,
            "64 bits",
        ),
        (
            23,
            r#"{"jsonrpc":"2.0","id":23,"method":"tools/call","params":{"arguments":{}}}"#,
            -32602,
            "name",
        ),
        (24, r#"{"jsonrpc":"2.0","id":24}"#, -32600, "method"),
    ] {
        let e = answer(&mut stdin, line);
        assert_eq!(e["id"], id, "{e}");
        assert_eq!(e["error"]["code"], code, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(says),
            "{e}"
        );
    }
    let list = answer(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#,
    );
    assert_eq!(list["id"], 4);
    assert!(
        list["result"]["tools"]
            .as_array()
            .is_some_and(|t| !t.is_empty()),
        "{list}"
    );
    drop(stdin);
    assert!(child.wait().unwrap().success());
}

/// A client that writes its requests and closes stdin at once still gets
/// an answer to each, also to a last line the server refuses itself
/// before the MCP library sees it.
#[test]
fn the_stdio_server_answers_the_last_line_before_end_of_input() {
    use std::io::{Read, Write};
    for round in 0..5 {
        let (_dir, mut child, mut stdin) = stdio_server();
        writeln!(
            stdin,
            r#"{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-06-18","capabilities":{{}},"clientInfo":{{"name":"t","version":"0"}}}}}}
{{"jsonrpc":"2.0","method":"notifications/initialized"}}
{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"get_task","arguments":{{"id":"a","id":"b"}}}}}}"#
        )
        .unwrap();
        drop(stdin);
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        assert!(child.wait().unwrap().success());
        let answers: Vec<Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert!(answers.iter().any(|a| a["id"] == 1), "round {round}: {out}");
        assert!(
            answers
                .iter()
                .any(|a| a["id"] == 2 && a["error"]["code"] == -32602),
            "round {round}: {out}"
        );
    }
}
