//! The REST API under `/api/v1` (SPEC §5), plus `/health` and `/metrics`.
//! Handlers are thin: parse, call [`TaskQueue`], map errors to
//! `{"error": {"code", "message", "details"}}` with the right status.

pub mod metrics;
pub mod openapi;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::error::Error;
use crate::mcp::types::{ClaimArgs, CompleteArgs, FailArgs, HeartbeatArgs, LogSlice, LogsOut};
use crate::model::{TaskSpec, TaskStatus, WorkflowSpec, from_value};
use crate::service::{ClaimFilter, ListOptions, TaskQueue};

/// State shared by the handlers.
#[derive(Clone)]
pub struct ApiState {
    pub queue: TaskQueue,
    pub metrics: Arc<metrics::Metrics>,
    pub started: Instant,
    /// Cancelled when the server shuts down: long-lived streams end.
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// An error as the API answers it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub details: Value,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            details: Value::Null,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let (status, details) = match &e {
            Error::InvalidInput { field, .. } => (StatusCode::BAD_REQUEST, json!({"field": field})),
            Error::Unsupported { field, .. } => {
                (StatusCode::NOT_IMPLEMENTED, json!({"field": field}))
            }
            Error::NotFound { what, id } => {
                (StatusCode::NOT_FOUND, json!({"kind": what, "id": id}))
            }
            Error::Conflict(_) => (StatusCode::CONFLICT, Value::Null),
            Error::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
            Error::Store(_) | Error::Io(_) => (StatusCode::SERVICE_UNAVAILABLE, Value::Null),
            Error::Integrity(_) | Error::Config(_) | Error::Remote { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, Value::Null)
            }
        };
        ApiError {
            status,
            code: e.code(),
            message: e.to_string(),
            details,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if !self.details.is_null() {
            body["error"]["details"] = self.details;
        }
        (self.status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// The request body limit (`server.max_body_bytes`), set on the router as
/// an extension so a refusal can name it.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

/// A JSON body parsed with field-naming errors (`tasks[2].priority`) and
/// unknown fields rejected; an unreadable or oversize body is a 4xx in the
/// API's error shape.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // A body must say it is JSON: a browser can send text/plain or a
        // typeless body to another site without a preflight, JSON it cannot.
        // `application/json`, with parameters (`; charset=utf-8`) or
        // not; not `application/jsonx` or `application/json-seq`.
        let json = req.headers().get(header::CONTENT_TYPE).map(|ct| {
            ct.to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("application/json")
        });
        let unsupported = || {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body with Content-Type: application/json",
            )
        };
        if json == Some(false) {
            return Err(unsupported());
        }
        let limit = req.extensions().get::<BodyLimit>().copied();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            let status = e.status();
            if status == StatusCode::PAYLOAD_TOO_LARGE {
                let message = match limit {
                    Some(BodyLimit(n)) => format!(
                        "the request body is too large: at most {n} bytes are accepted (server.max_body_bytes)"
                    ),
                    None => "the request body is too large".to_string(),
                };
                ApiError::new(status, "payload_too_large", message)
            } else {
                ApiError::new(
                    status,
                    "invalid_input",
                    format!("cannot read the body: {e}"),
                )
            }
        })?;
        if json.is_none() && !bytes.is_empty() {
            return Err(unsupported());
        }
        let v: Value = if bytes.is_empty() {
            json!({})
        } else {
            crate::model::json_strict(&bytes).map_err(|e| {
                ApiError::from(Error::invalid("body", format!("malformed JSON: {e}")))
            })?
        };
        // Every body is an object: serde would otherwise read an array as
        // the struct's fields in declaration order.
        if !v.is_object() {
            return Err(Error::invalid(
                "body",
                format!(
                    "expected a JSON object, got {}",
                    crate::model::json_kind(&v)
                ),
            )
            .into());
        }
        Ok(Body(from_value(v).map_err(ApiError::from)?))
    }
}

/// The body of an action that takes none: empty, or an empty JSON object.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoBody {}

/// Query parameters parsed with field-naming errors.
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        // Repeated keys (status=a&status=b) become lists.
        let mut map = serde_json::Map::new();
        for (k, v) in form_pairs(query) {
            match map.get_mut(&k) {
                Some(Value::Array(a)) => a.push(Value::String(v)),
                Some(other) => {
                    let first = other.take();
                    *other = Value::Array(vec![first, Value::String(v)]);
                }
                None => {
                    map.insert(k, Value::String(v));
                }
            }
        }
        let map = Value::Object(map);
        from_value(map.clone()).map(Q).map_err(|e| match e {
            // `limit=1&limit=2`: say so, not "invalid type: sequence".
            Error::InvalidInput { field, .. } if map[field.as_str()].is_array() => ApiError::from(
                Error::invalid(field, "is given more than once; it takes one value"),
            ),
            e => ApiError::from(e),
        })
    }
}

fn form_pairs(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'+' {
            out.push(b' ');
        } else if b == b'%'
            && i + 2 < bytes.len()
            && let Some(v) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 2;
        } else {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A number from a query string value (query values arrive as text).
fn num<T: std::str::FromStr>(field: &str, v: &Option<String>) -> ApiResult<Option<T>> {
    match v {
        None => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            ApiError::from(Error::invalid(
                field,
                format!("must be a number, got {s:?}"),
            ))
        }),
    }
}

/// Counts every request by method, matched route and status.
async fn track(State(st): State<ApiState>, req: Request, next: axum::middleware::Next) -> Response {
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let t = Instant::now();
    // Streams and long polls run as long as they need; the rest is bounded
    // by server.request_timeout.
    let bounded = route != "/api/v1/events";
    let limit = st.queue.config().server.request_timeout.0;
    let resp = if bounded {
        match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            Err(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                format!(
                    "the request took longer than server.request_timeout ({})",
                    crate::model::Dur(limit)
                ),
            )
            .into_response(),
        }
    } else {
        next.run(req).await
    };
    let resp = in_error_shape(resp).await;
    st.metrics
        .request(&method, &route, resp.status().as_u16(), t.elapsed());
    resp
}

/// The routes under `/api/v1`, `/health` and `/metrics`.
pub fn router(state: ApiState) -> Router {
    let api = Router::new()
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/batch", post(create_batch))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/logs", get(task_logs))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/tasks/{id}/approve", post(approve_task))
        .route("/tasks/{id}/reject", post(reject_task))
        .route("/tasks/{id}/heartbeat", post(heartbeat))
        .route("/tasks/{id}/complete", post(complete))
        .route("/tasks/{id}/fail", post(fail))
        .route("/workers/claim", post(claim))
        .route("/workflows", post(create_workflow).get(list_workflows))
        .route("/workflows/{id}", get(get_workflow))
        .route("/workflows/{id}/graph", get(workflow_graph))
        .route("/workflows/{id}/cancel", post(cancel_workflow))
        .route("/search", get(search))
        .route("/recommendations", get(recommendations))
        .route("/stats", get(stats))
        .route("/events", get(events))
        .route("/openapi.json", get(openapi_doc))
        .fallback(not_found);
    Router::new()
        .nest("/api/v1", api)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), track))
        .with_state(state)
}

/// A refusal (4xx, and 5xx with `server_errors`) whose body is not JSON:
/// its status, head and text, for rewriting in an error shape; anything
/// else comes back as it was.
pub(crate) async fn plain_refusal(
    resp: Response,
    server_errors: bool,
) -> Result<(StatusCode, axum::http::response::Parts, String), Response> {
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if json || !(status.is_client_error() || server_errors && status.is_server_error()) {
        return Err(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    Ok((
        status,
        parts,
        String::from_utf8_lossy(&bytes).trim().to_string(),
    ))
}

/// Puts the plain-text refusals of the HTTP layer (a path segment that is
/// not UTF-8, a method the route does not take) into the API's error shape.
async fn in_error_shape(resp: Response) -> Response {
    let (status, parts, text) = match plain_refusal(resp, true).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "invalid_input",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        _ => "http_error",
    };
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    // axum names the parameter in backquotes: "Invalid UTF-8 in `id`".
    let field = (status == StatusCode::BAD_REQUEST)
        .then(|| message.split('`').nth(1).map(str::to_string))
        .flatten();
    let mut err = ApiError::new(status, code, message);
    if let Some(f) = field {
        err.details = json!({ "field": f });
    }
    let mut out = err.into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; GET /api/v1/openapi.json lists them",
    )
}

fn created<T: serde::Serialize>(location: String, body: &T) -> Response {
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Puts the `Idempotency-Key` header, if any, into the body's
/// `idempotency_key` (the two must agree when both are sent).
fn header_key(headers: &HeaderMap, key: &mut Option<String>) -> ApiResult<()> {
    let Some(k) = headers.get("idempotency-key") else {
        return Ok(());
    };
    let k = k
        .to_str()
        .map_err(|_| ApiError::from(Error::invalid("Idempotency-Key", "must be visible ASCII")))?;
    crate::model::check_text("Idempotency-Key", k, 256)?;
    match key {
        Some(existing) if existing != k => Err(Error::invalid(
            "idempotency_key",
            "differs from the Idempotency-Key header; send one of them",
        )
        .into()),
        _ => {
            *key = Some(k.to_string());
            Ok(())
        }
    }
}

async fn create_task(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Body(mut spec): Body<TaskSpec>,
) -> ApiResult<Response> {
    header_key(&headers, &mut spec.idempotency_key)?;
    let s = st.queue.submit(spec).await?;
    if s.created {
        st.metrics.submitted(1);
    }
    if s.created {
        Ok(created(format!("/api/v1/tasks/{}", s.id), &s))
    } else {
        Ok((StatusCode::OK, Json(s)).into_response())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody {
    tasks: Vec<TaskSpec>,
}

async fn create_batch(State(st): State<ApiState>, Body(b): Body<BatchBody>) -> ApiResult<Response> {
    let out = st.queue.submit_batch(b.tasks).await?;
    st.metrics
        .submitted(out.iter().filter(|s| s.created).count());
    Ok((StatusCode::CREATED, Json(json!({ "tasks": out }))).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    #[serde(default)]
    status: OneOrMany,
    project: Option<String>,
    workflow_id: Option<String>,
    tag: Option<String>,
    name: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

/// A query value given once or repeated.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values, comma-separated ones split, empty ones dropped.
    fn items(self) -> Vec<String> {
        let items: Vec<String> = match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
            OneOrMany::Many(v) => v
                .iter()
                .flat_map(|s| s.split(','))
                .map(str::to_string)
                .collect(),
        };
        items.into_iter().filter(|s| !s.is_empty()).collect()
    }

    fn statuses(self) -> ApiResult<Vec<TaskStatus>> {
        self.items()
            .into_iter()
            .map(|s| {
                s.parse::<TaskStatus>()
                    .map_err(|e| ApiError::from(Error::invalid("status", e)))
            })
            .collect()
    }
}

async fn list_tasks(State(st): State<ApiState>, Q(q): Q<ListQuery>) -> ApiResult<Response> {
    let page = st
        .queue
        .list(ListOptions {
            statuses: q.status.statuses()?,
            project: q.project,
            workflow_id: q.workflow_id,
            tag: q.tag,
            name: q.name,
            limit: num("limit", &q.limit)?,
            cursor: q.cursor,
        })
        .await?;
    Ok(Json(page).into_response())
}

async fn get_task(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    let (task, attempts) = st.queue.get_with_attempts(&id).await?;
    Ok(Json(json!({"task": task, "attempts": attempts})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    attempt: Option<String>,
    stream: Option<String>,
    tail: Option<String>,
    offset: Option<String>,
    limit: Option<String>,
}

async fn task_logs(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Q(q): Q<LogsQuery>,
) -> ApiResult<Response> {
    let out = logs_slice(
        &st.queue,
        &id,
        num("attempt", &q.attempt)?,
        q.stream,
        num("tail", &q.tail)?,
        num("offset", &q.offset)?,
        num("limit", &q.limit)?,
    )
    .await?;
    Ok(Json(out).into_response())
}

/// Slices of a task's captured output (shared with the MCP tool).
pub async fn logs_slice(
    queue: &TaskQueue,
    id: &str,
    attempt: Option<u32>,
    stream: Option<String>,
    tail: Option<usize>,
    offset: Option<usize>,
    limit: Option<usize>,
) -> Result<LogsOut, Error> {
    let limit = limit.unwrap_or(64 * 1024);
    if limit == 0 || limit > 1 << 20 {
        return Err(Error::invalid(
            "limit",
            format!("must be between 1 and 1048576 bytes, got {limit}"),
        ));
    }
    if let Some(s) = &stream
        && s != "stdout"
        && s != "stderr"
    {
        return Err(Error::invalid(
            "stream",
            format!("must be stdout or stderr, got {s:?}"),
        ));
    }
    if tail.is_some() && offset.is_some() {
        return Err(Error::invalid("tail", "give tail or offset, not both"));
    }
    if attempt == Some(0) {
        return Err(Error::invalid("attempt", "attempts count from 1, got 0"));
    }
    for (field, v) in [("tail", tail), ("offset", offset)] {
        if let Some(n) = v
            && n > u32::MAX as usize
        {
            return Err(Error::invalid(
                field,
                format!("must be at most {} bytes, got {n}", u32::MAX),
            ));
        }
    }
    let chunks = queue.logs(id, attempt).await?;
    let mut logs = Vec::new();
    for c in chunks {
        if stream.as_deref().is_some_and(|s| s != c.stream) {
            continue;
        }
        let total = c.text.len();
        let start = match (tail, offset) {
            (Some(t), _) => total.saturating_sub(t.min(limit)),
            (None, Some(o)) => o.min(total),
            (None, None) => 0,
        };
        let start = floor_char(&c.text, start);
        let mut end = floor_char(&c.text, (start + limit).min(total));
        // A limit smaller than the character at `start` still moves on by
        // that character: a reader following `next_offset` always advances.
        if end == start && start < total {
            end = c.text[start..]
                .chars()
                .next()
                .map_or(total, |ch| start + ch.len_utf8());
        }
        logs.push(LogSlice {
            attempt: c.attempt,
            stream: c.stream,
            offset: start,
            text: c.text[start..end].to_string(),
            total_bytes: total,
            next_offset: (end < total).then_some(end),
            dropped_bytes: c.dropped_bytes,
        });
    }
    Ok(LogsOut {
        task_id: crate::service::canonical_id(id),
        logs,
    })
}

fn floor_char(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

async fn cancel_task(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(NoBody {}): Body<NoBody>,
) -> ApiResult<Response> {
    Ok(Json(json!({"task": st.queue.cancel(&id).await?})).into_response())
}

async fn retry_task(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(NoBody {}): Body<NoBody>,
) -> ApiResult<Response> {
    Ok(Json(json!({"task": st.queue.retry(&id).await?})).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    comment: Option<String>,
    by: Option<String>,
}

async fn approve_task(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(b): Body<DecisionBody>,
) -> ApiResult<Response> {
    let t = st.queue.approve(&id, true, b.comment, b.by).await?;
    Ok(Json(json!({ "task": t })).into_response())
}

async fn reject_task(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(b): Body<DecisionBody>,
) -> ApiResult<Response> {
    let t = st.queue.approve(&id, false, b.comment, b.by).await?;
    Ok(Json(json!({ "task": t })).into_response())
}

/// Bodies of the worker endpoints reuse the MCP argument types minus the id
/// (the id is in the path).
fn with_id(id: &str, mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.insert("id".into(), Value::String(id.to_string()));
    }
    v
}

async fn heartbeat(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(v): Body<Value>,
) -> ApiResult<Response> {
    let a: HeartbeatArgs = from_value(with_id(&id, v))?;
    let until = st
        .queue
        .heartbeat(
            &a.id,
            &a.worker_id,
            Duration::from_secs(a.lease_seconds.unwrap_or(300)),
        )
        .await?;
    let task_id = crate::service::canonical_id(&a.id);
    Ok(Json(json!({"task_id": task_id, "lease_expires_at": until})).into_response())
}

async fn complete(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(v): Body<Value>,
) -> ApiResult<Response> {
    let a: CompleteArgs = from_value(with_id(&id, v))?;
    let t = st.queue.complete(&a.id, &a.worker_id, a.output).await?;
    Ok(Json(json!({ "task": t })).into_response())
}

async fn fail(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(v): Body<Value>,
) -> ApiResult<Response> {
    let a: FailArgs = from_value(with_id(&id, v))?;
    let t = st
        .queue
        .fail(&a.id, &a.worker_id, a.error, a.retryable.unwrap_or(true))
        .await?;
    Ok(Json(json!({ "task": t })).into_response())
}

async fn claim(State(st): State<ApiState>, Body(a): Body<ClaimArgs>) -> ApiResult<Response> {
    let tasks = st
        .queue
        .claim(
            &a.worker_id,
            ClaimFilter {
                names: a.names,
                project: a.project,
                tags: a.tags,
            },
            Duration::from_secs(a.lease_seconds.unwrap_or(300)),
            a.limit.unwrap_or(1),
        )
        .await?;
    Ok(Json(json!({ "tasks": tasks })).into_response())
}

async fn create_workflow(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Body(mut w): Body<WorkflowSpec>,
) -> ApiResult<Response> {
    header_key(&headers, &mut w.idempotency_key)?;
    let out = st.queue.submit_workflow(w).await?;
    st.metrics
        .submitted(out.tasks.iter().filter(|s| s.created).count());
    // Submitted again (its key, or every task's, named an existing
    // workflow): that workflow, as a repeated `POST /tasks` answers its
    // first task.
    if !out.created {
        return Ok((StatusCode::OK, Json(&out)).into_response());
    }
    Ok(created(
        format!("/api/v1/workflows/{}", out.workflow_id),
        &out,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowListQuery {
    #[serde(default)]
    status: OneOrMany,
    project: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_workflows(
    State(st): State<ApiState>,
    Q(q): Q<WorkflowListQuery>,
) -> ApiResult<Response> {
    let statuses = match q.status {
        OneOrMany::None => Vec::new(),
        OneOrMany::One(s) => s.split(',').map(str::to_string).collect(),
        OneOrMany::Many(v) => v,
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .map(|s| {
        s.parse()
            .map_err(|e: String| ApiError::from(Error::invalid("status", e)))
    })
    .collect::<ApiResult<Vec<_>>>()?;
    let page = st
        .queue
        .list_workflows(statuses, q.project, num("limit", &q.limit)?, q.cursor)
        .await?;
    Ok(Json(page).into_response())
}

async fn get_workflow(State(st): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(st.queue.get_workflow(&id).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GraphQuery {
    format: Option<String>,
}

async fn workflow_graph(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Q(q): Q<GraphQuery>,
) -> ApiResult<Response> {
    let format = q.format.unwrap_or_else(|| "mermaid".into());
    let text = st.queue.workflow_graph(&id, &format).await?;
    let ct = if format == "dot" {
        "text/vnd.graphviz; charset=utf-8"
    } else {
        "text/plain; charset=utf-8"
    };
    Ok(([(header::CONTENT_TYPE, ct)], text).into_response())
}

async fn cancel_workflow(
    State(st): State<ApiState>,
    Path(id): Path<String>,
    Body(NoBody {}): Body<NoBody>,
) -> ApiResult<Response> {
    Ok(Json(st.queue.cancel_workflow(&id).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SearchQuery {
    q: Option<String>,
    project: Option<String>,
    #[serde(default)]
    status: OneOrMany,
    #[serde(default)]
    tag: OneOrMany,
    since: Option<String>,
    until: Option<String>,
    limit: Option<String>,
}

fn time_param(field: &str, v: Option<String>) -> ApiResult<Option<crate::model::Timestamp>> {
    v.map(|s| {
        serde_json::from_value(serde_json::Value::String(s.clone())).map_err(|_| {
            ApiError::from(Error::invalid(
                field,
                format!("must be an RFC 3339 time such as 2026-01-31T12:00:00Z, got {s:?}"),
            ))
        })
    })
    .transpose()
}

async fn search(State(st): State<ApiState>, Q(q): Q<SearchQuery>) -> ApiResult<Response> {
    let Some(query) = q.q else {
        return Err(Error::invalid("q", "is required: the words to look for").into());
    };
    let req = crate::search::SearchRequest {
        query,
        project: q.project,
        statuses: q.status.statuses()?,
        tags: q.tag.items(),
        since: time_param("since", q.since)?,
        until: time_param("until", q.until)?,
        limit: num("limit", &q.limit)?.unwrap_or(10),
        prefer_project: None,
    };
    // The words are the `q` parameter here.
    let found = st.queue.search(req).await.map_err(|e| match e {
        Error::InvalidInput { field, message } if field == "query" => Error::InvalidInput {
            field: "q".into(),
            message,
        },
        e => e,
    })?;
    Ok(Json(found).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecommendQuery {
    name: Option<String>,
    command: Option<String>,
    description: Option<String>,
    project: Option<String>,
}

async fn recommendations(
    State(st): State<ApiState>,
    Q(q): Q<RecommendQuery>,
) -> ApiResult<Response> {
    let req = crate::search::recommend::RecommendRequest {
        name: q.name,
        command: q.command,
        description: q.description,
        project: q.project,
    };
    Ok(Json(st.queue.recommend(req).await?).into_response())
}

async fn stats(State(st): State<ApiState>) -> ApiResult<Response> {
    Ok(Json(st.queue.stats().await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    workflow_id: Option<String>,
    project: Option<String>,
    /// Start after this sequence number (like `Last-Event-ID`); default: now.
    after: Option<String>,
}

/// Server-Sent Events of task and workflow state changes, in commit order,
/// each with `id:` = its audit sequence number so a client resumes with
/// `Last-Event-ID`.
async fn events(
    State(st): State<ApiState>,
    headers: HeaderMap,
    Q(q): Q<EventsQuery>,
) -> ApiResult<Response> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|s| {
            s.trim().parse::<i64>().map_err(|_| {
                ApiError::from(Error::invalid(
                    "Last-Event-ID",
                    "must be an event id (a number)",
                ))
            })
        })
        .transpose()?;
    let after = match (resume, num::<i64>("after", &q.after)?) {
        (Some(r), _) => r,
        (None, Some(a)) => a,
        (None, None) => st.queue.last_event_seq().await?,
    };
    if let Some(w) = &q.workflow_id
        && uuid::Uuid::parse_str(w).is_err()
    {
        return Err(Error::invalid(
            "workflow_id",
            format!("{w:?} is not a workflow id (a UUID)"),
        )
        .into());
    }
    let queue = st.queue.clone();
    let shutdown = st.shutdown.clone();
    let wake = queue.subscribe();
    let wake_wf = queue.subscribe_workflows();
    let filter = (q.workflow_id, q.project);
    struct Cursor {
        last: i64,
        buf: Vec<crate::store::StreamEvent>,
        wake: tokio::sync::broadcast::Receiver<crate::model::TaskEvent>,
        wake_wf: tokio::sync::broadcast::Receiver<crate::model::WorkflowEvent>,
    }
    let start = Cursor {
        last: after,
        buf: Vec::new(),
        wake,
        wake_wf,
    };
    let stream = futures::stream::unfold(start, move |mut c| {
        let queue = queue.clone();
        let shutdown = shutdown.clone();
        let (workflow_id, project) = filter.clone();
        async move {
            loop {
                if shutdown.is_cancelled() {
                    return None;
                }
                if let Some(e) = c.buf.pop() {
                    let data = serde_json::to_string(&e).unwrap_or_default();
                    let ev = Event::default()
                        .id(e.seq.to_string())
                        .event(e.object.clone())
                        .data(data);
                    return Some((Ok::<_, Infallible>(ev), c));
                }
                match queue
                    .events_after(c.last, workflow_id.as_deref(), project.as_deref(), 500)
                    .await
                {
                    Ok(mut v) if !v.is_empty() => {
                        c.last = v.last().map(|e| e.seq).unwrap_or(c.last);
                        v.reverse();
                        c.buf = v;
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "event stream read failed"),
                }
                // Commits in this process wake the stream at once; the poll
                // covers other processes.
                tokio::select! {
                    _ = c.wake.recv() => {}
                    _ = c.wake_wf.recv() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = shutdown.cancelled() => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

async fn openapi_doc() -> Response {
    Json(openapi::document()).into_response()
}

async fn health(State(st): State<ApiState>) -> Response {
    let t = Instant::now();
    let store = st.queue.stats().await;
    let store_ms = t.elapsed().as_secs_f64() * 1000.0;
    let scheduler = st.queue.engine_status();
    let store_ok = store.is_ok();
    let ok = store_ok && scheduler.healthy;
    // The outbox never makes the server unhealthy: records wait in it.
    let outbox = match st.queue.vectorizer_state().await {
        Ok(None) => json!({"ok": true, "configured": false}),
        Ok(Some(v)) => {
            let last_error = v.last_error.or(v.outbox.last_error);
            json!({
                "ok": last_error.is_none(),
                "configured": true,
                "endpoint": v.endpoint,
                "pending": v.outbox.pending,
                "oldest_finished_at": v.outbox.oldest_finished_at,
                "max_attempts": v.outbox.max_attempts,
                "last_error": last_error,
            })
        }
        Err(e) => json!({"ok": false, "configured": true, "error": e.to_string()}),
    };
    let body = json!({
        "status": if ok { "ok" } else { "unavailable" },
        "uptime_s": st.started.elapsed().as_secs(),
        "version": env!("CARGO_PKG_VERSION"),
        "checks": {
            "store": match &store {
                Ok(_) => json!({"ok": true, "latency_ms": (store_ms * 1000.0).round() / 1000.0}),
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            },
            "scheduler": {
                "ok": scheduler.healthy,
                "running": scheduler.running,
                "last_tick_ms_ago": scheduler.last_tick_ms_ago,
            },
            "executor": {
                "ok": true,
                "running_attempts": scheduler.running_attempts,
                "services": scheduler.services,
            },
            "outbox": outbox,
        },
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics_text(State(st): State<ApiState>) -> Response {
    if !st.queue.config().monitoring.metrics {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "metrics are off (monitoring.metrics: false)",
        )
        .into_response();
    }
    let stats = st.queue.stats().await.ok();
    let text = st.metrics.render(stats.as_ref(), &st.queue.engine_status());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
