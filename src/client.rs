//! A Rust client for the REST API of `task-queue serve`.
//!
//! ```no_run
//! # async fn demo() -> task_queue::Result<()> {
//! use task_queue::client::Client;
//! use task_queue::Task;
//!
//! let client = Client::new("http://127.0.0.1:16080")?.with_token("tq_...");
//! let submitted = client.submit(&Task::new("build").with_command("cargo build")).await?;
//! let done = client.wait(&submitted.id, std::time::Duration::from_secs(600)).await?;
//! println!("{} {}", done.name, done.status);
//! # Ok(()) }
//! ```
//!
//! Errors come back as the same [`Error`] variants the service returns in
//! process (`InvalidInput` naming the field, `NotFound`, `Conflict`, ...);
//! authentication failures, other HTTP statuses and unreachable servers are
//! [`Error::Remote`].

use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::mcp::types::LogsOut;
use crate::model::{
    Attempt, TaskRecord, TaskSpec, Timestamp, WorkflowDetail, WorkflowRecord, WorkflowSpec,
    WorkflowStatus,
};
use crate::search::recommend::{RecommendRequest, Recommendation};
use crate::search::{SearchRequest, SearchResults};
use crate::service::{ClaimFilter, ClaimedWork, TaskPage, WorkflowPage, WorkflowSubmitted};
use crate::store::{QueueStats, Submitted};

/// The environment variable the CLI reads the API token from.
pub const TOKEN_ENV: &str = "TASK_QUEUE_TOKEN";

/// A client of one server. Cheap to clone; connections are pooled.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

/// A task with its attempts (`GET /api/v1/tasks/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskDetail {
    pub task: TaskRecord,
    pub attempts: Vec<Attempt>,
}

/// Filters for [`Client::list`]; empty fields do not filter.
#[derive(Debug, Clone, Default)]
pub struct TaskQuery {
    pub statuses: Vec<crate::model::TaskStatus>,
    pub project: Option<String>,
    pub workflow_id: Option<String>,
    pub tag: Option<String>,
    pub name: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// Which part of a task's output [`Client::logs`] returns.
#[derive(Debug, Clone, Default)]
pub struct LogsQuery {
    pub attempt: Option<u32>,
    /// `stdout` or `stderr` (default both).
    pub stream: Option<String>,
    /// The last N bytes of each stream.
    pub tail: Option<usize>,
    /// From this byte offset.
    pub offset: Option<usize>,
    /// At most this many bytes per stream (server default 64 KiB).
    pub limit: Option<usize>,
}

#[derive(Deserialize)]
struct TaskBody {
    task: TaskRecord,
}

#[derive(Deserialize)]
struct TasksBody<T> {
    tasks: Vec<T>,
}

#[derive(Deserialize)]
struct LeaseBody {
    lease_expires_at: Timestamp,
}

impl Client {
    /// A client of the server at `base_url` (`http://host:port`, with or
    /// without a trailing `/`; a `/api/v1` suffix is accepted too).
    pub fn new(base_url: &str) -> Result<Client> {
        let trimmed = base_url.trim().trim_end_matches('/');
        let trimmed = trimmed.strip_suffix("/api/v1").unwrap_or(trimmed);
        let url = reqwest::Url::parse(trimmed).map_err(|e| {
            Error::invalid(
                "server",
                format!("not a URL ({e}); expected http://HOST:PORT, got {base_url:?}"),
            )
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::invalid(
                "server",
                format!("expected an http:// or https:// URL with a host, got {base_url:?}"),
            ));
        }
        Ok(Client {
            base: trimmed.to_string(),
            token: None,
            http: crate::executor::http::client().clone(),
        })
    }

    /// Sends `Authorization: Bearer TOKEN` with every request.
    pub fn with_token(mut self, token: impl Into<String>) -> Client {
        let t = token.into();
        self.token = (!t.is_empty()).then_some(t);
        self
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    async fn send(&self, req: RequestBuilder) -> Result<reqwest::Response> {
        let resp = req.send().await.map_err(|e| Error::Remote {
            status: 0,
            code: "unreachable".into(),
            message: format!("cannot reach {}: {e}", self.base),
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(api_error(resp).await)
    }

    async fn json<T: DeserializeOwned>(&self, req: RequestBuilder) -> Result<T> {
        let resp = self.send(req).await?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|e| Error::Remote {
            status: status.as_u16(),
            code: "body".into(),
            message: format!("the response body could not be read: {e}"),
        })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Remote {
            status: status.as_u16(),
            code: "body".into(),
            message: format!("unexpected response from {}: {e}", self.base),
        })
    }

    async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        self.json(self.request(Method::POST, path).json(body)).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T> {
        self.json(self.request(Method::GET, path).query(query))
            .await
    }

    /// Submits one task (`POST /api/v1/tasks`). A repeated
    /// `idempotency_key` returns the first task with `created: false`.
    pub async fn submit(&self, spec: &TaskSpec) -> Result<Submitted> {
        self.post("/api/v1/tasks", spec).await
    }

    /// Submits tasks in one request and one commit (`POST /api/v1/tasks/batch`).
    pub async fn submit_batch(&self, specs: &[TaskSpec]) -> Result<Vec<Submitted>> {
        let b: TasksBody<Submitted> = self
            .post("/api/v1/tasks/batch", &json!({ "tasks": specs }))
            .await?;
        Ok(b.tasks)
    }

    /// Submits a workflow (`POST /api/v1/workflows`).
    pub async fn submit_workflow(&self, spec: &WorkflowSpec) -> Result<WorkflowSubmitted> {
        self.post("/api/v1/workflows", spec).await
    }

    /// One task with its attempts.
    pub async fn get(&self, id: &str) -> Result<TaskDetail> {
        self.get_json(&format!("/api/v1/tasks/{}", seg(id)), &[])
            .await
    }

    /// Tasks, newest first, one page at a time (`next_cursor` fetches the next).
    pub async fn list(&self, q: &TaskQuery) -> Result<TaskPage> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if !q.statuses.is_empty() {
            let s: Vec<String> = q.statuses.iter().map(|s| s.to_string()).collect();
            query.push(("status", s.join(",")));
        }
        let opt = [
            ("project", &q.project),
            ("workflow_id", &q.workflow_id),
            ("tag", &q.tag),
            ("name", &q.name),
            ("cursor", &q.cursor),
        ];
        for (k, v) in opt {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        if let Some(l) = q.limit {
            query.push(("limit", l.to_string()));
        }
        self.get_json("/api/v1/tasks", &query).await
    }

    /// A task's captured output.
    pub async fn logs(&self, id: &str, q: &LogsQuery) -> Result<LogsOut> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(a) = q.attempt {
            query.push(("attempt", a.to_string()));
        }
        if let Some(s) = &q.stream {
            query.push(("stream", s.clone()));
        }
        for (k, v) in [("tail", q.tail), ("offset", q.offset), ("limit", q.limit)] {
            if let Some(v) = v {
                query.push((k, v.to_string()));
            }
        }
        self.get_json(&format!("/api/v1/tasks/{}/logs", seg(id)), &query)
            .await
    }

    /// Cancels a task; a running task's processes are stopped.
    pub async fn cancel(&self, id: &str) -> Result<TaskRecord> {
        self.task_op(id, "cancel", &json!({})).await
    }

    /// Runs a finished (failed, timed out, cancelled) task again.
    pub async fn retry(&self, id: &str) -> Result<TaskRecord> {
        self.task_op(id, "retry", &json!({})).await
    }

    /// Approves a task in `awaiting_approval`, or rejects it (`approve: false`).
    pub async fn approve(
        &self,
        id: &str,
        approve: bool,
        comment: Option<&str>,
        by: Option<&str>,
    ) -> Result<TaskRecord> {
        let mut body = json!({});
        if let Some(c) = comment {
            body["comment"] = json!(c);
        }
        if let Some(b) = by {
            body["by"] = json!(b);
        }
        let op = if approve { "approve" } else { "reject" };
        self.task_op(id, op, &body).await
    }

    async fn task_op(&self, id: &str, op: &str, body: &Value) -> Result<TaskRecord> {
        let b: TaskBody = self
            .post(&format!("/api/v1/tasks/{}/{op}", seg(id)), body)
            .await?;
        Ok(b.task)
    }

    /// Polls the task until it is finished or `timeout` passes, and returns
    /// its last state either way (check `status.is_terminal()`).
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<TaskRecord> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(50);
        loop {
            let t = self.get(id).await?.task;
            if t.status.is_terminal() || Instant::now() >= deadline {
                return Ok(t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Takes up to `limit` external tasks for `worker_id`, leased for `lease`.
    pub async fn claim(
        &self,
        worker_id: &str,
        filter: &ClaimFilter,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<ClaimedWork>> {
        let mut body = json!({
            "worker_id": worker_id,
            "names": filter.names,
            "tags": filter.tags,
            "lease_seconds": lease.as_secs(),
            "limit": limit,
        });
        if let Some(p) = &filter.project {
            body["project"] = json!(p);
        }
        let b: TasksBody<ClaimedWork> = self.post("/api/v1/workers/claim", &body).await?;
        Ok(b.tasks)
    }

    /// Renews a claimed task's lease; returns when it now expires.
    pub async fn heartbeat(&self, id: &str, worker_id: &str, lease: Duration) -> Result<Timestamp> {
        let b: LeaseBody = self
            .post(
                &format!("/api/v1/tasks/{}/heartbeat", seg(id)),
                &json!({"worker_id": worker_id, "lease_seconds": lease.as_secs()}),
            )
            .await?;
        Ok(b.lease_expires_at)
    }

    /// Reports a claimed task done with its output (checked against the
    /// task's `validation` schema).
    pub async fn complete(
        &self,
        id: &str,
        worker_id: &str,
        output: Option<Value>,
    ) -> Result<TaskRecord> {
        let mut body = json!({ "worker_id": worker_id });
        if let Some(o) = output {
            body["output"] = o;
        }
        self.task_op(id, "complete", &body).await
    }

    /// Reports a claimed task failed; `retryable` lets its retry policy run it again.
    pub async fn fail(
        &self,
        id: &str,
        worker_id: &str,
        error: &str,
        retryable: bool,
    ) -> Result<TaskRecord> {
        self.task_op(
            id,
            "fail",
            &json!({"worker_id": worker_id, "error": error, "retryable": retryable}),
        )
        .await
    }

    /// A workflow with its tasks and edges.
    pub async fn workflow(&self, id: &str) -> Result<WorkflowDetail> {
        self.get_json(&format!("/api/v1/workflows/{}", seg(id)), &[])
            .await
    }

    /// Workflows, newest first.
    pub async fn list_workflows(
        &self,
        statuses: &[WorkflowStatus],
        project: Option<&str>,
        limit: Option<usize>,
        cursor: Option<&str>,
    ) -> Result<WorkflowPage> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if !statuses.is_empty() {
            let s: Vec<String> = statuses.iter().map(|s| s.to_string()).collect();
            query.push(("status", s.join(",")));
        }
        if let Some(p) = project {
            query.push(("project", p.to_string()));
        }
        if let Some(l) = limit {
            query.push(("limit", l.to_string()));
        }
        if let Some(c) = cursor {
            query.push(("cursor", c.to_string()));
        }
        self.get_json("/api/v1/workflows", &query).await
    }

    /// A workflow's graph as Mermaid (`format: "mermaid"`) or DOT (`"dot"`).
    pub async fn workflow_graph(&self, id: &str, format: &str) -> Result<String> {
        let resp = self
            .send(
                self.request(Method::GET, &format!("/api/v1/workflows/{}/graph", seg(id)))
                    .query(&[("format", format)]),
            )
            .await?;
        resp.text().await.map_err(|e| Error::Remote {
            status: 200,
            code: "body".into(),
            message: format!("the response body could not be read: {e}"),
        })
    }

    /// Cancels every unfinished task of a workflow.
    pub async fn cancel_workflow(&self, id: &str) -> Result<WorkflowRecord> {
        self.post(&format!("/api/v1/workflows/{}/cancel", seg(id)), &json!({}))
            .await
    }

    /// Past tasks ranked for `req.query` (`GET /api/v1/search`).
    /// `prefer_project` is not sent (the REST endpoint has no such filter).
    pub async fn search(&self, req: &SearchRequest) -> Result<SearchResults> {
        let mut query: Vec<(&str, String)> = vec![("q", req.query.clone())];
        if let Some(p) = &req.project {
            query.push(("project", p.clone()));
        }
        if !req.statuses.is_empty() {
            let s: Vec<String> = req.statuses.iter().map(|s| s.to_string()).collect();
            query.push(("status", s.join(",")));
        }
        for t in &req.tags {
            query.push(("tag", t.clone()));
        }
        if let Some(t) = req.since {
            query.push(("since", t.to_string()));
        }
        if let Some(t) = req.until {
            query.push(("until", t.to_string()));
        }
        if req.limit > 0 {
            query.push(("limit", req.limit.to_string()));
        }
        self.get_json("/api/v1/search", &query).await
    }

    /// Advice from similar past tasks (`GET /api/v1/recommendations`).
    pub async fn recommend(&self, req: &RecommendRequest) -> Result<Recommendation> {
        let mut query: Vec<(&str, String)> = Vec::new();
        let fields = [
            ("name", &req.name),
            ("command", &req.command),
            ("description", &req.description),
            ("project", &req.project),
        ];
        for (k, v) in fields {
            if let Some(v) = v {
                query.push((k, v.clone()));
            }
        }
        self.get_json("/api/v1/recommendations", &query).await
    }

    /// Queue depth by status, running tasks, throughput and ages.
    pub async fn stats(&self) -> Result<QueueStats> {
        self.get_json("/api/v1/stats", &[]).await
    }

    /// `GET /health`: readiness of store, scheduler, executor and outbox.
    /// A server that is up but not ready answers 503, returned as
    /// [`Error::Remote`] with status 503.
    pub async fn health(&self) -> Result<Value> {
        self.get_json("/health", &[]).await
    }
}

/// One path segment, percent-encoded so an id cannot change the route.
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The server's `{"error": {code, message, details}}` as an [`Error`].
async fn api_error(resp: reqwest::Response) -> Error {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let err = &body["error"];
    let code = err["code"].as_str().unwrap_or("http").to_string();
    let message = err["message"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let details = &err["details"];
    match (status, code.as_str()) {
        (StatusCode::BAD_REQUEST, "invalid_input") => {
            let field = details["field"].as_str().unwrap_or("request").to_string();
            let prefix = format!("invalid {field}: ");
            let message = message
                .strip_prefix(&prefix)
                .map(str::to_string)
                .unwrap_or(message);
            Error::InvalidInput { field, message }
        }
        (_, "unsupported") => {
            let field = details["field"].as_str().unwrap_or("request").to_string();
            let prefix = format!("unsupported {field}: ");
            let message = message
                .strip_prefix(&prefix)
                .map(str::to_string)
                .unwrap_or(message);
            Error::Unsupported { field, message }
        }
        (StatusCode::NOT_FOUND, "not_found") if details["id"].is_string() => Error::NotFound {
            what: match details["kind"].as_str() {
                Some("task") => "task",
                Some("workflow") => "workflow",
                Some("schedule") => "schedule",
                _ => "object",
            },
            id: details["id"].as_str().unwrap_or_default().to_string(),
        },
        (StatusCode::CONFLICT, _) => Error::Conflict(message),
        _ => Error::Remote {
            status: status.as_u16(),
            code,
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_checked_and_normalised() {
        let c = Client::new("http://127.0.0.1:16080/").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:16080");
        let c = Client::new("https://q.example.com/api/v1").unwrap();
        assert_eq!(c.base_url(), "https://q.example.com");
        for bad in ["", "127.0.0.1:16080", "ftp://x", "http://"] {
            let e = Client::new(bad).unwrap_err().to_string();
            assert!(e.contains("server"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn ids_cannot_change_the_route() {
        assert_eq!(seg("abc-123"), "abc-123");
        assert_eq!(seg("../stats"), "..%2Fstats");
        assert_eq!(seg("a b?c"), "a%20b%3Fc");
    }
}
