//! The REST API: every endpoint through the router (`oneshot`), and the
//! real `serve` binary over HTTP (events stream, bind refusal, SIGTERM and
//! restart).

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use serde_json::{Value, json};
use task_queue::rest::{ApiState, router};
use task_queue::{Config, TaskQueue};
use tower::ServiceExt;

use crate::common::{Workspace, wait_until};

/// method, uri, body, expected status, error code, text in the message.
type ErrorCase = (
    &'static str,
    String,
    Option<Value>,
    StatusCode,
    &'static str,
    &'static str,
);

async fn app(dir: &tempfile::TempDir) -> (axum::Router, TaskQueue) {
    let mut config = Config::default();
    config.storage.path = dir.path().join("rest.db");
    config.execution.poll_interval = "50ms".parse().unwrap();
    let queue = TaskQueue::open_with(config).await.unwrap();
    let state = ApiState {
        queue: queue.clone(),
        metrics: Default::default(),
        started: std::time::Instant::now(),
        shutdown: Default::default(),
    };
    (router(state), queue)
}

async fn call(
    app: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_with(app, method, uri, &[], body).await
}

async fn call_with(
    app: &axum::Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Body::from(v.to_string())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, v)
}

fn assert_error(v: &Value, code: &str, needle: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains(needle),
        "wanted {needle:?} in {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_answers_and_errors_have_one_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (app, queue) = app(&dir).await;
    let engine = queue.start();

    // Tasks: create (201 + Location), idempotent repeat (200), list, get, logs.
    let (s, t) = call(
        &app,
        "POST",
        "/api/v1/tasks",
        Some(json!({"name": "hello", "command": "echo hi", "idempotency_key": "k1"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let (s, again) = call(
        &app,
        "POST",
        "/api/v1/tasks",
        Some(json!({"name": "hello", "command": "echo hi", "idempotency_key": "k1"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(again["id"], id);
    assert_eq!(again["created"], false);
    let done = queue
        .wait(&id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.status.as_str(), "succeeded");
    let (s, page) = call(&app, "GET", "/api/v1/tasks?status=succeeded&limit=10", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(page["tasks"][0]["id"], id);
    let (s, got) = call(&app, "GET", &format!("/api/v1/tasks/{id}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got["attempts"].as_array().unwrap().len(), 1);
    let (s, logs) = call(
        &app,
        "GET",
        &format!("/api/v1/tasks/{id}/logs?stream=stdout"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(logs["logs"][0]["text"], "hi\n");
    // Out of the documented ranges: refused, naming the parameter.
    for (q, field) in [
        ("offset=4294967296", "offset"),
        ("tail=99999999999", "tail"),
        ("attempt=0", "attempt"),
    ] {
        let (s, e) = call(&app, "GET", &format!("/api/v1/tasks/{id}/logs?{q}"), None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{q}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{e}"
        );
    }

    // Batch with a dependency, then a workflow with a gate.
    let (s, b) = call(
        &app,
        "POST",
        "/api/v1/tasks/batch",
        Some(json!({"tasks": [
        {"name": "a", "command": "true"}, {"name": "b", "command": "true", "depends_on": ["a"]}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    assert_eq!(b["tasks"][1]["status"], "pending");
    let (s, w) = call(
        &app,
        "POST",
        "/api/v1/workflows",
        Some(json!({"name": "rel", "project": "p1", "tasks": [
        {"name": "build", "command": "true"},
        {"name": "gate", "command": "true", "requires_approval": true, "depends_on": ["build"]},
        {"name": "deploy", "command": "true", "depends_on": ["gate"]}]})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{w}");
    let wf = w["workflow_id"].as_str().unwrap().to_string();
    let gate = w["tasks"][1]["id"].as_str().unwrap().to_string();
    for _ in 0..200 {
        if queue.get(&gate).await.unwrap().status.as_str() == "awaiting_approval" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, r) = call(
        &app,
        "POST",
        &format!(
            "/api/v1/tasks/{}/approve",
            w["tasks"][2]["id"].as_str().unwrap()
        ),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{r}");
    let (s, _) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{gate}/approve"),
        Some(json!({"comment": "ok", "by": "ci"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let done = queue
        .wait_workflow(&wf, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.status.as_str(), "succeeded");
    let (s, d) = call(&app, "GET", &format!("/api/v1/workflows/{wf}"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(d["tasks"].as_array().unwrap().len(), 3);
    let (s, g) = call(
        &app,
        "GET",
        &format!("/api/v1/workflows/{wf}/graph?format=dot"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!(g.as_str().unwrap().starts_with("digraph"));
    let (s, l) = call(&app, "GET", "/api/v1/workflows?status=succeeded", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(l["workflows"][0]["id"], wf.as_str());
    let (s, e) = call(
        &app,
        "POST",
        &format!("/api/v1/workflows/{wf}/cancel"),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");

    // A keyed workflow posted twice: 201 with a new workflow, then 200 with it again.
    let keyed = json!({"name": "keyed", "tasks": [
        {"name": "k1", "command": "true", "idempotency_key": "keyed-k1"},
        {"name": "k2", "command": "true", "idempotency_key": "keyed-k2", "depends_on": ["k1"]}]});
    let (s, k1) = call(&app, "POST", "/api/v1/workflows", Some(keyed.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{k1}");
    let (s, k2) = call(&app, "POST", "/api/v1/workflows", Some(keyed)).await;
    assert_eq!(s, StatusCode::OK, "{k2}");
    assert_eq!(k1["workflow_id"], k2["workflow_id"]);
    assert_eq!(k2["tasks"][1]["created"], false, "{k2}");
    assert_eq!(k2["tasks"][1]["id"], k1["tasks"][1]["id"]);
    assert_eq!(
        (&k1["created"], &k2["created"]),
        (&json!(true), &json!(false))
    );

    // A workflow's own key, in the body or the Idempotency-Key header: the
    // repeat answers 200 with the first workflow and its tasks, whatever
    // tasks it lists; a header that differs from the body is refused.
    let body =
        |task: &str| json!({"name": "release", "tasks": [{"name": task, "command": "true"}]});
    let mut first = body("build");
    first["idempotency_key"] = json!("release-7");
    let (s, r1) = call(&app, "POST", "/api/v1/workflows", Some(first)).await;
    assert_eq!(s, StatusCode::CREATED, "{r1}");
    assert_eq!(r1["created"], true);
    let key = [("idempotency-key", "release-7")];
    let (s, r2) = call_with(&app, "POST", "/api/v1/workflows", &key, Some(body("other"))).await;
    assert_eq!(s, StatusCode::OK, "{r2}");
    assert_eq!(r2["workflow_id"], r1["workflow_id"]);
    assert_eq!(r2["created"], false);
    assert_eq!(r2["tasks"][0]["id"], r1["tasks"][0]["id"]);
    assert_eq!(r2["tasks"][0]["name"], "build");
    let (s, detail) = call(
        &app,
        "GET",
        &format!("/api/v1/workflows/{}", r1["workflow_id"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(detail["idempotency_key"], "release-7", "{detail}");
    let mut clash = body("build");
    clash["idempotency_key"] = json!("release-8");
    let (s, e) = call_with(&app, "POST", "/api/v1/workflows", &key, Some(clash)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_error(
        &e,
        "invalid_input",
        "differs from the Idempotency-Key header",
    );
    let too_long = "k".repeat(257);
    for bad in ["", too_long.as_str()] {
        let (s, e) = call_with(
            &app,
            "POST",
            "/api/v1/workflows",
            &[("idempotency-key", bad)],
            Some(body("build")),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
        assert_error(&e, "invalid_input", "Idempotency-Key");
    }
    let mut long = body("build");
    long["idempotency_key"] = json!("k".repeat(257));
    let (s, e) = call(&app, "POST", "/api/v1/workflows", Some(long)).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_error(&e, "invalid_input", "idempotency_key");

    // Reject, retry, cancel.
    let (_, w2) = call(
        &app,
        "POST",
        "/api/v1/workflows",
        Some(json!({"name": "rej", "tasks": [
        {"name": "gate", "command": "true", "requires_approval": true}]})),
    )
    .await;
    let g2 = w2["tasks"][0]["id"].as_str().unwrap().to_string();
    let (s, r) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{g2}/reject"),
        Some(json!({"comment": "no"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{r}");
    assert_eq!(r["task"]["status"], "failed");
    let (s, r) = call(&app, "POST", &format!("/api/v1/tasks/{g2}/retry"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["task"]["status"], "awaiting_approval");
    let (s, r) = call(&app, "POST", &format!("/api/v1/tasks/{g2}/cancel"), None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["task"]["status"], "cancelled");

    // Workers: claim, heartbeat, complete, fail.
    let (_, x) = call(
        &app,
        "POST",
        "/api/v1/tasks",
        Some(json!({"name": "ext", "kind": "external", "retry": {"max_attempts": 1}})),
    )
    .await;
    let xid = x["id"].as_str().unwrap().to_string();
    let (s, c) = call(
        &app,
        "POST",
        "/api/v1/workers/claim",
        Some(json!({"worker_id": "w1", "names": ["ext"], "lease_seconds": 30})),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{c}");
    assert_eq!(c["tasks"][0]["task_id"], xid.as_str());
    let (s, _) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{xid}/heartbeat"),
        Some(json!({"worker_id": "w1"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, e) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{xid}/complete"),
        Some(json!({"worker_id": "w2"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{e}");
    let (s, r) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{xid}/complete"),
        Some(json!({"worker_id": "w1", "output": {"ok": 1}})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["task"]["status"], "succeeded");
    let (_, y) = call(
        &app,
        "POST",
        "/api/v1/tasks",
        Some(json!({"name": "ext2", "kind": "external", "retry": {"max_attempts": 1}})),
    )
    .await;
    let yid = y["id"].as_str().unwrap().to_string();
    call(
        &app,
        "POST",
        "/api/v1/workers/claim",
        Some(json!({"worker_id": "w1", "names": ["ext2"]})),
    )
    .await;
    let (s, r) = call(
        &app,
        "POST",
        &format!("/api/v1/tasks/{yid}/fail"),
        Some(json!({"worker_id": "w1", "error": "nope", "retryable": false})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(r["task"]["status"], "failed");

    // Stats, health, metrics, OpenAPI.
    let (s, st) = call(&app, "GET", "/api/v1/stats", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(st["tasks"]["succeeded"].as_u64().unwrap() >= 5, "{st}");
    let (s, h) = call(&app, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK, "{h}");
    assert_eq!(h["checks"]["store"]["ok"], true);
    let (s, m) = call(&app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let m = m.as_str().unwrap();
    assert!(m.contains("task_queue_tasks{status=\"succeeded\"}"), "{m}");
    assert!(
        m.contains(
            "task_queue_http_requests_total{method=\"POST\",route=\"/api/v1/tasks\",status=\"201\"}"
        ),
        "{m}"
    );
    assert!(
        m.contains("task_queue_attempt_duration_seconds_bucket"),
        "{m}"
    );
    assert!(
        m.contains("task_queue_tasks_by_project{project=\"p1\",status=\"succeeded\"} 3"),
        "{m}"
    );
    let (s, doc) = call(&app, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/tasks",
        "/tasks/{id}",
        "/tasks/{id}/logs",
        "/workers/claim",
        "/workflows/{id}/graph",
        "/events",
        "/stats",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} documented");
    }
    // Every $ref resolves.
    let text = doc.to_string();
    for r in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = r.split('"').next().unwrap();
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{name} missing"
        );
    }

    // Errors: one shape, the right status, the field named.
    let cases: Vec<ErrorCase> = vec![
        (
            "POST",
            "/api/v1/tasks".into(),
            Some(json!({"name": "x", "command": "true", "priority": 500})),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "priority",
        ),
        (
            "POST",
            "/api/v1/tasks".into(),
            Some(json!({"name": "x", "command": "true", "colour": 1})),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "colour",
        ),
        (
            "POST",
            "/api/v1/workflows".into(),
            Some(
                json!({"name": "w", "tasks": [{"name": "a", "command": "true", "depends_on": ["a"]}]}),
            ),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "itself",
        ),
        (
            "GET",
            "/api/v1/tasks/nope".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "id",
        ),
        (
            "GET",
            "/api/v1/tasks/0193b0c2-0000-7000-8000-000000000000".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
            "not found",
        ),
        (
            "GET",
            "/api/v1/tasks?limit=0".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "limit",
        ),
        (
            "GET",
            "/api/v1/tasks?status=done".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "status",
        ),
        (
            "GET",
            "/api/v1/tasks?colour=red".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "colour",
        ),
        (
            "GET",
            format!("/api/v1/workflows/{wf}/graph?format=png"),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "format",
        ),
        (
            "POST",
            format!("/api/v1/tasks/{id}/cancel"),
            None,
            StatusCode::CONFLICT,
            "conflict",
            "already",
        ),
        (
            "GET",
            "/api/v1/search?q=***".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "invalid q:",
        ),
        (
            "POST",
            "/api/v1/tasks".into(),
            Some(json!(["posarg", null, "echo positional"])),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "invalid body: expected a JSON object, got an array",
        ),
        (
            "POST",
            format!("/api/v1/tasks/{id}/retry"),
            Some(json!({"reason": "x"})),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "reason",
        ),
        (
            "GET",
            "/api/v1/tasks?cursor=-5".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "invalid cursor",
        ),
        (
            "POST",
            "/api/v1/workers/claim".into(),
            Some(json!({"worker_id": "w", "lease_seconds": 0})),
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "invalid lease_seconds: must be between 1 and 3600 seconds",
        ),
        (
            "GET",
            "/api/v1/search?q=deploy&status=running".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "status[0]",
        ),
        (
            "GET",
            "/api/v1/search?q=deploy&since=yesterday".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "since",
        ),
        (
            "GET",
            "/api/v1/recommendations".into(),
            None,
            StatusCode::BAD_REQUEST,
            "invalid_input",
            "name",
        ),
        (
            "GET",
            "/api/v1/nothing".into(),
            None,
            StatusCode::NOT_FOUND,
            "not_found",
            "openapi",
        ),
    ];
    for (method, uri, body, status, code, needle) in cases {
        let (s, v) = call(&app, method, &uri, body).await;
        assert_eq!(s, status, "{method} {uri}: {v}");
        assert_error(&v, code, needle);
    }
    // Malformed JSON, wrong content type, too large.
    let resp = app
        .clone()
        .oneshot(
            Request::post("/api/v1/tasks")
                .header("content-type", "application/json")
                .body(Body::from("{"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let resp = app
        .clone()
        .oneshot(
            Request::post("/api/v1/tasks")
                .header("content-type", "text/plain")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let huge = json!({"name": "x", "command": "x".repeat(3 << 20)}).to_string();
    let limited = app
        .clone()
        .layer(axum::extract::DefaultBodyLimit::max(1 << 20));
    let resp = limited
        .oneshot(
            Request::post("/api/v1/tasks")
                .header("content-type", "application/json")
                .body(Body::from(huge))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Starts `serve` on a free port; returns the base URL.
/// A client that never finishes its request headers (slowloris) is cut
/// off after `server.request_timeout`, while the server goes on serving.
#[test]
fn unfinished_request_headers_are_cut_off() {
    use std::io::{Read, Write};
    let ws = Workspace::new();
    ws.write("config.yml", "server:\n  request_timeout: 2s\n");
    let (base, _server) = ws.serve();
    let addr = base.trim_start_matches("http://");
    let mut slow = std::net::TcpStream::connect(addr).unwrap();
    write!(
        slow,
        "GET /api/v1/stats HTTP/1.1\r\nHost: {addr}\r\nX-Slow: 1"
    )
    .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = std::time::Instant::now();
    let mut buf = Vec::new();
    let _ = slow.read_to_end(&mut buf);
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the connection stayed open {took:?}"
    );
    assert!(took >= Duration::from_millis(1500), "closed after {took:?}");
    // Other clients were served meanwhile and still are.
    let mut ok = std::net::TcpStream::connect(addr).unwrap();
    write!(
        ok,
        "GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    ok.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

/// Refusals from the HTTP layer itself (a path segment that is not
/// UTF-8, a method a route does not take) have the API's error shape too,
/// and a body must be `application/json`, not something that starts so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_of_the_http_layer_have_the_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (app, _queue) = app(&dir).await;
    for uri in ["/api/v1/tasks/%ff", "/api/v1/workflows/%ff/graph"] {
        let (s, e) = call(&app, "GET", uri, None).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{uri}: {e}");
        assert_error(&e, "invalid_input", "UTF-8");
        assert_eq!(e["error"]["details"]["field"], "id", "{e}");
    }
    let (s, e) = call(&app, "GET", "/api/v1/tasks?limit=1&limit=2", None).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{e}");
    assert_error(&e, "invalid_input", "is given more than once");
    assert_eq!(e["error"]["details"]["field"], "limit", "{e}");
    let (s, e) = call(&app, "DELETE", "/api/v1/stats", None).await;
    assert_eq!(s, StatusCode::METHOD_NOT_ALLOWED, "{e}");
    assert_eq!(e["error"]["code"], "method_not_allowed", "{e}");
    for ct in ["application/jsonx", "application/json-seq", "text/plain"] {
        let req = Request::builder()
            .method("POST")
            .uri("/api/v1/tasks")
            .header("content-type", ct)
            .body(Body::from(r#"{"name": "a", "command": "true"}"#))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "{ct}");
    }
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/tasks")
        .header("content-type", "Application/JSON; charset=utf-8")
        .body(Body::from(r#"{"name": "a", "command": "true"}"#))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    // An integer JSON numbers cannot hold exactly is refused, not rounded.
    let req = Request::builder()
        .method("POST")
        .uri("/api/v1/tasks")
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"name": "b", "command": "true", "parameters": {"id": 12345678901234567890123}}"#,
        ))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    let e: Value = serde_json::from_slice(&bytes).unwrap();
    assert_error(&e, "invalid_input", "does not fit in 64 bits");
}

/// Paging a log by `next_offset` with a limit smaller than a character
/// still moves on by whole characters, and reads the log exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_pages_always_advance_by_whole_characters() {
    let dir = tempfile::tempdir().unwrap();
    let (app, queue) = app(&dir).await;
    let engine = queue.start();
    let (s, t) = call(
        &app,
        "POST",
        "/api/v1/tasks",
        Some(json!({"name": "accents", "command": "printf 'h\u{e9}llo w\u{f6}rld \u{20ac}'"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{t}");
    let id = t["id"].as_str().unwrap().to_string();
    let done = queue
        .wait(&id, Some(Duration::from_secs(20)))
        .await
        .unwrap();
    assert_eq!(done.status.as_str(), "succeeded");
    let whole = "h\u{e9}llo w\u{f6}rld \u{20ac}";
    let mut text = String::new();
    let mut offset = 0;
    for _ in 0..=whole.len() {
        let (s, page) = call(
            &app,
            "GET",
            &format!("/api/v1/tasks/{id}/logs?stream=stdout&offset={offset}&limit=1"),
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{page}");
        let slice = &page["logs"][0];
        text.push_str(slice["text"].as_str().unwrap());
        match slice["next_offset"].as_u64() {
            Some(n) => {
                assert!(n as usize > offset, "stuck at {offset}: {page}");
                offset = n as usize;
            }
            None => break,
        }
    }
    assert_eq!(text, whole);
    // An offset inside a character starts at that character.
    let (_, page) = call(
        &app,
        "GET",
        &format!("/api/v1/tasks/{id}/logs?stream=stdout&offset=2&limit=1"),
        None,
    )
    .await;
    assert_eq!(page["logs"][0]["text"], "\u{e9}", "{page}");
    assert_eq!(page["logs"][0]["next_offset"], 3, "{page}");
    engine.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_streams_events_and_survives_sigterm() {
    let ws = Workspace::new();
    let (base, mut child) = ws.serve();
    let http = task_queue::executor::http::client().clone();
    // The event stream from the start.
    let mut events = http
        .get(format!("{base}/api/v1/events?after=0"))
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let t: Value = http
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({"name": "evt", "command": "echo '{\"n\": 7}' > \"$TASK_QUEUE_RESULT\""}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = t["id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let mut buf = String::new();
    let mut last_id = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|s: &String| s == "succeeded") && tokio::time::Instant::now() < deadline
    {
        let chunk = tokio::time::timeout(Duration::from_secs(5), events.chunk())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(pos) = buf.find("\n\n") {
            let frame: String = buf.drain(..pos + 2).collect();
            let mut data = None;
            for line in frame.lines() {
                if let Some(v) = line.strip_prefix("data:") {
                    data = Some(v.trim().to_string());
                }
                if let Some(v) = line.strip_prefix("id:") {
                    last_id = v.trim().to_string();
                }
            }
            if let Some(d) = data {
                let e: Value = serde_json::from_str(&d).unwrap();
                if e["task_id"] == id.as_str() {
                    seen.push(e["to"].as_str().unwrap().to_string());
                }
            }
        }
    }
    assert_eq!(
        seen,
        vec!["queued", "running", "succeeded"],
        "transitions in order"
    );
    // Resuming after the last id replays nothing already seen.
    let resumed = http
        .get(format!("{base}/api/v1/events"))
        .header("Last-Event-ID", &last_id)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    drop(resumed);
    let got: Value = http
        .get(format!("{base}/api/v1/tasks/{id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["task"]["result"]["output"]["n"], 7);

    // A body over `server.max_body_bytes` (16 MiB by default) is refused,
    // and the refusal says what the limit is.
    let huge = json!({"name": "huge", "command": "x".repeat(17 << 20)}).to_string();
    let resp = http
        .post(format!("{base}/api/v1/tasks"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    // The body was not read: the connection closes, and the answer says so,
    // so the client's next request does not go out on it.
    assert_eq!(
        resp.headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "payload_too_large", "{e}");
    let m = e["error"]["message"].as_str().unwrap();
    assert!(
        m.contains("16777216 bytes") && m.contains("server.max_body_bytes"),
        "{e}"
    );

    // SIGTERM in the middle of a run: the server stops; a restart finishes the work.
    let slow: Value = http
        .post(format!("{base}/api/v1/tasks"))
        .json(&json!({"name": "slow", "command": "sleep 2; echo done >> slow.log"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slow_id = slow["id"].as_str().unwrap().to_string();
    assert!(wait_until(Duration::from_secs(10), || ws.status(&slow_id)
        ["status"]
        == "running"));
    unsafe {
        libc_kill(child.id() as i32, 15);
    }
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "graceful exit: {status:?}");
    let (base2, _child2) = ws.serve();
    let _ = base2;
    assert!(wait_until(Duration::from_secs(30), || ws.status(&slow_id)
        ["status"]
        == "succeeded"));
    assert_eq!(
        ws.read("slow.log").lines().count(),
        1,
        "ran to completion once"
    );
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn binding_a_public_address_without_auth_is_refused() {
    let ws = Workspace::new();
    let out = ws.run(&["serve", "--bind", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.bind") && err.contains("--insecure"),
        "{err}"
    );
}

fn token(ws: &Workspace, role: &str) -> String {
    let out = ws.run(&["token", "create", "--role", role, "--name", role]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_roles_guard_every_route() {
    let ws = Workspace::new();
    let viewer = token(&ws, "viewer");
    let worker = token(&ws, "worker");
    let admin = token(&ws, "admin");
    let (base, _child) = ws.serve();
    let http = task_queue::executor::http::client().clone();
    let status = |r: reqwest::Response| r.status().as_u16();
    let get = |path: &str, tok: Option<&str>| {
        let mut r = http.get(format!("{base}{path}"));
        if let Some(t) = tok {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let post = |path: &str, tok: Option<&str>, body: Value| {
        let mut r = http.post(format!("{base}{path}")).json(&body);
        if let Some(t) = tok {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    // Health stays open for probes; everything else needs a token, also on loopback.
    assert_eq!(status(get("/health", None).await.unwrap()), 200);
    let r = get("/api/v1/tasks", None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    assert_eq!(
        status(get("/api/v1/tasks", Some("tq_wrong")).await.unwrap()),
        401
    );
    assert_eq!(status(get("/metrics", None).await.unwrap()), 401);
    assert_eq!(status(post("/mcp", None, json!({})).await.unwrap()), 401);
    // viewer: reads only.
    assert_eq!(
        status(get("/api/v1/tasks", Some(&viewer)).await.unwrap()),
        200
    );
    let task = json!({"name": "guarded", "kind": "external"});
    let r = post("/api/v1/tasks", Some(&viewer), task.clone())
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("operator"),
        "{body}"
    );
    // worker: claims, but cannot submit.
    assert_eq!(
        status(
            post("/api/v1/tasks", Some(&worker), task.clone())
                .await
                .unwrap()
        ),
        403
    );
    // admin: everything.
    let r = post("/api/v1/tasks", Some(&admin), task).await.unwrap();
    assert_eq!(r.status(), 201);
    let r = post(
        "/api/v1/workers/claim",
        Some(&worker),
        json!({"worker_id": "w1", "names": ["guarded"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let claimed: Value = r.json().await.unwrap();
    assert_eq!(claimed["tasks"].as_array().unwrap().len(), 1);
    // Any valid token opens MCP (each tool checks its own role), so a
    // worker's request is past auth: not 401, not 403.
    let mcp = status(post("/mcp", Some(&worker), json!({})).await.unwrap());
    assert!(mcp != 401 && mcp != 403, "{mcp}");
    // A revoked token stops working.
    let list = ws.run(&["token", "list"]);
    let tokens: Value = serde_json::from_slice(&list.stdout).unwrap();
    let viewer_id = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["role"] == "viewer")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ws.run(&["token", "revoke", &viewer_id]).status.success());
    assert_eq!(
        status(get("/api/v1/tasks", Some(&viewer)).await.unwrap()),
        401
    );
    // With tokens, a public address is allowed.
    let mut public = ws
        .cmd(&["serve", "--bind", "0.0.0.0:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ws.track(public.id());
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(public.stderr.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("listening on http://0.0.0.0:"), "{first}");
    let port = first
        .split("0.0.0.0:")
        .nth(1)
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .to_string();
    std::thread::spawn(move || for _ in lines {});
    // Revoking every token does not reopen a server listening off loopback.
    for t in tokens["tokens"].as_array().unwrap() {
        ws.run(&["token", "revoke", t["id"].as_str().unwrap()]);
    }
    let r = http
        .get(format!("http://127.0.0.1:{port}/api/v1/tasks"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "still closed with no live token");
    let _ = public.kill();
    let _ = public.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_requests_from_other_sites_are_refused() {
    let ws = Workspace::new();
    let (base, _child) = ws.serve();
    let http = task_queue::executor::http::client().clone();
    let task = json!({"name": "csrf", "command": "true"});
    // Another site's page: its Origin on a state-changing request.
    let r = http
        .post(format!("{base}/api/v1/tasks"))
        .header("origin", "https://evil.example")
        .json(&task)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "forbidden_origin");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("server.cors_origins")
    );
    // The same request from the server's own origin is fine.
    let own = base.clone();
    let r = http
        .post(format!("{base}/api/v1/tasks"))
        .header("origin", own)
        .json(&task)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A body that does not say it is JSON (a browser's "simple" request).
    for ct in [None, Some("text/plain")] {
        let mut req = http
            .post(format!("{base}/api/v1/tasks"))
            .body(task.to_string());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{ct:?}");
    }
    // DNS rebinding: another name in Host, on every route.
    let addr = base.trim_start_matches("http://");
    for path in ["/api/v1/tasks", "/metrics", "/sse"] {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: evil.example:16080\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 403", "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_and_metrics_follow_the_configuration() {
    let ws = Workspace::new();
    ws.write(
        "config.yml",
        "server:\n  cors_origins: [http://app.example]\nmonitoring:\n  metrics: false\n",
    );
    let (base, _child) = ws.serve();
    let http = task_queue::executor::http::client().clone();
    let r = http
        .request(reqwest::Method::OPTIONS, format!("{base}/api/v1/tasks"))
        .header("Origin", "http://app.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "http://app.example"
    );
    let r = http
        .get(format!("{base}/api/v1/stats"))
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    let r = http.get(format!("{base}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 404);
}
