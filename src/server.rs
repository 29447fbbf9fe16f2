//! `task-queue serve`: one HTTP server on the queue — the REST API under
//! `/api/v1`, `/health`, `/metrics`, MCP over streamable HTTP at `/mcp`
//! and the legacy SSE transport at `/sse` + `/messages` — with the engine
//! running in the same process.

use std::net::SocketAddr;
use std::time::Duration;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Result};
use crate::mcp::McpServer;
use crate::service::TaskQueue;
use crate::store::Role;

/// Who made an HTTP request, when auth is on: `authorize` puts it in the
/// request's extensions, and the MCP tools read it to check their role.
/// Absent when the server is open (no token, auth off).
#[derive(Debug, Clone)]
pub struct Caller {
    pub role: Role,
    pub name: String,
}

/// The Host names and Origins a server answers, and whether auth is forced
/// on by where it listens.
#[derive(Debug, Clone)]
struct Exposure {
    /// Host header names accepted (any port); empty: any host.
    hosts: Vec<String>,
    /// `server.cors_origins`: cross-origin browsers allowed to POST.
    origins: Vec<String>,
    /// Listening off loopback without `--insecure`: auth stays required
    /// even if every token is revoked later.
    auth_by_bind: bool,
}

impl Exposure {
    fn new(queue: &TaskQueue, local: Option<SocketAddr>) -> Exposure {
        let server = &queue.config().server;
        let mut hosts: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if let Some(ip) = local.map(|l| l.ip()).filter(|ip| !ip.is_loopback()) {
            hosts.push(ip.to_string());
        }
        hosts.extend(server.allowed_hosts.iter().cloned());
        if server.allowed_hosts.iter().any(|h| h == "*") {
            hosts.clear();
        }
        Exposure {
            hosts,
            origins: server.cors_origins.clone(),
            auth_by_bind: local.is_some_and(|l| !l.ip().is_loopback()) && !server.insecure,
        }
    }

    fn host_allowed(&self, host: &str) -> bool {
        if self.hosts.is_empty() {
            return true;
        }
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(""),
            None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
        };
        self.hosts.iter().any(|a| a.eq_ignore_ascii_case(name))
    }

    /// A state-changing request from a browser page is accepted from the
    /// server's own origin and from `server.cors_origins` only.
    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if self
            .origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        {
            return true;
        }
        let authority = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
        host.is_some_and(|h| !authority.is_empty() && authority.eq_ignore_ascii_case(h))
    }
}

/// The HTTP routes of a queue listening on `local` (None: not bound, as in
/// tests and benchmarks; treated as loopback).
pub fn router(queue: TaskQueue, local: Option<SocketAddr>, ct: &CancellationToken) -> axum::Router {
    let exposure = std::sync::Arc::new(Exposure::new(&queue, local));
    let body_limit = queue_body_limit(&queue);
    // Host and Origin are checked for every route by `guard`.
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(ct.child_token())
        .disable_allowed_hosts();
    config.max_request_body_bytes = body_limit;
    let q = queue.clone();
    let sessions = std::sync::Arc::new(LocalSessionManager::default());
    let mcp = StreamableHttpService::new(
        move || Ok(McpServer::new(q.clone())),
        sessions.clone(),
        config,
    );
    let api = crate::rest::router(crate::rest::ApiState {
        queue: queue.clone(),
        metrics: Default::default(),
        started: std::time::Instant::now(),
        shutdown: ct.clone(),
    });
    let auth_queue = queue.clone();
    let auth_exposure = exposure.clone();
    let origins = std::sync::Arc::new(queue.config().server.cors_origins.clone());
    let mcp_routes = axum::Router::new()
        .nest_service("/mcp", mcp)
        .layer(axum::middleware::from_fn(move |req, next| {
            checked_mcp_body(body_limit, req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            ended_sessions(sessions.clone(), req, next)
        }))
        .merge(crate::mcp::sse::router(queue))
        .layer(axum::middleware::from_fn(jsonrpc_refusals));
    axum::Router::new()
        .merge(mcp_routes)
        .merge(api)
        .layer(axum::middleware::from_fn(move |req, next| {
            authorize(auth_queue.clone(), auth_exposure.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            cors(origins.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            guard(exposure.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(close_after_unread_body))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .layer(axum::Extension(crate::rest::BodyLimit(body_limit)))
}

/// A request refused for its body's size or type may leave that body
/// unread on the connection, which the server then closes: the answer says
/// so (`Connection: close`), so that a client does not send its next
/// request on a connection that is going away.
async fn close_after_unread_body(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let mut resp = next.run(req).await;
    if matches!(
        resp.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNSUPPORTED_MEDIA_TYPE
    ) {
        resp.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// Refuses requests a browser could be tricked into sending: a Host the
/// server does not go by (DNS rebinding) on any route, and a state-changing
/// request from another site's page (`Origin` neither the server's own nor
/// in `server.cors_origins`).
async fn guard(exposure: std::sync::Arc<Exposure>, req: Request, next: Next) -> Response {
    use axum::http::{Method, header};
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    // `/health` answers any Host: probes address the server by whatever
    // IP they see, and it discloses nothing a page could use.
    if let Some(h) = host.as_deref()
        && req.uri().path() != "/health"
        && !exposure.host_allowed(h)
    {
        return deny(
            StatusCode::FORBIDDEN,
            "forbidden_host",
            format!(
                "Host {h:?} is not served here; add its name to server.allowed_hosts \
                 (for a reverse proxy) or use one of: {}",
                exposure.hosts.join(", ")
            ),
        );
    }
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe && let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("null");
        if !exposure.origin_allowed(origin, host.as_deref()) {
            return deny(
                StatusCode::FORBIDDEN,
                "forbidden_origin",
                format!(
                    "cross-origin {} from {origin:?} refused; list the origin in \
                     server.cors_origins to allow a browser application",
                    req.method()
                ),
            );
        }
    }
    next.run(req).await
}

/// CORS for `server.cors_origins` (empty: no CORS headers at all): allowed
/// origins get `Access-Control-Allow-*` headers, and preflights are answered
/// before auth.
async fn cors(origins: std::sync::Arc<Vec<String>>, req: Request, next: Next) -> Response {
    use axum::http::{HeaderValue, Method, header};
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|o| o.to_str().ok())
        .map(str::to_string);
    let allowed = origin.as_ref().is_some_and(|o| {
        origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(o))
    });
    if !allowed {
        return next.run(req).await;
    }
    let origin = origin.unwrap_or_default();
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut resp = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type, idempotency-key, last-event-id"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
    }
    resp
}

/// Puts the MCP transports' plain-text refusals into JSON-RPC errors (`id`
/// null, as for a message that could not be read): a body that is not a
/// JSON-RPC message is a parse error (`-32700`, HTTP 400, as over stdio);
/// an unknown session and the like keep their status, as an invalid
/// request (`-32600`) with the transport's reason.
/// A `POST /mcp` whose JSON-RPC request the MCP library would take the
/// wrong way (a tool call without a name, arguments with a key given twice
/// or an integer wider than 64 bits, an `id` without a method) is answered
/// here, with the request's `id`, as over stdio (`mcp::stdio::refusal`).
async fn checked_mcp_body(
    limit: usize,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return jsonrpc_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                -32600,
                format!("the request body is over the limit of {limit} bytes"),
            );
        }
    };
    if let Some(answer) = crate::mcp::stdio::refusal(&bytes) {
        return axum::Json(answer).into_response();
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// A `DELETE /mcp` of a session that does not exist (never did, or has
/// ended) is answered `404` like any other request of such a session; the
/// MCP library would accept it (`202`) as if it had ended one.
async fn ended_sessions(
    sessions: std::sync::Arc<LocalSessionManager>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use rmcp::transport::streamable_http_server::SessionManager;
    if req.method() == axum::http::Method::DELETE
        && let Some(id) = req
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
        && !sessions
            .has_session(&std::sync::Arc::from(id))
            .await
            .unwrap_or(true)
    {
        return jsonrpc_error(
            StatusCode::NOT_FOUND,
            -32600,
            format!("no session {id}: it never existed or has ended"),
        );
    }
    next.run(req).await
}

/// A JSON-RPC error answer to a request whose id is unknown (`id: null`).
fn jsonrpc_error(status: StatusCode, code: i64, message: String) -> Response {
    (
        status,
        axum::Json(serde_json::json!({
            "jsonrpc": "2.0",
            "id": null,
            "error": {"code": code, "message": message},
        })),
    )
        .into_response()
}

async fn jsonrpc_refusals(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let (status, parts, text) = match crate::rest::plain_refusal(next.run(req).await, false).await {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let (status, code, message) = match text.strip_prefix("fail to deserialize request body") {
        Some(why) => (
            StatusCode::BAD_REQUEST,
            -32700,
            format!("Parse error: {}", why.trim()),
        ),
        None => (
            status,
            -32600,
            if text.is_empty() {
                status.canonical_reason().unwrap_or("error").to_string()
            } else {
                text
            },
        ),
    };
    let mut out = jsonrpc_error(status, code, message);
    for h in [header::ALLOW, header::WWW_AUTHENTICATE] {
        if let Some(v) = parts.headers.get(&h) {
            out.headers_mut().insert(h, v.clone());
        }
    }
    out
}

/// The least role a request needs (SPEC §7).
fn required_role(method: &axum::http::Method, path: &str) -> Role {
    if path.starts_with("/mcp") || path.starts_with("/sse") || path.starts_with("/messages") {
        // Any valid token opens MCP; each tool checks its own role.
        return Role::Viewer;
    }
    if method == axum::http::Method::GET || method == axum::http::Method::HEAD {
        return Role::Viewer;
    }
    let worker_op = path == "/api/v1/workers/claim"
        || path.ends_with("/heartbeat")
        || path.ends_with("/complete")
        || path.ends_with("/fail");
    if worker_op {
        Role::Worker
    } else {
        Role::Operator
    }
}

fn deny(status: StatusCode, code: &str, message: String) -> Response {
    let mut r = (
        status,
        axum::Json(serde_json::json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

/// Once any token exists (or `auth.enabled`), every request but `/health`
/// needs a valid bearer token with a role that covers it.
async fn authorize(
    queue: TaskQueue,
    exposure: std::sync::Arc<Exposure>,
    mut req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let required = match queue.tokens_exist().await {
        Ok(any) => any || queue.config().auth.enabled || exposure.auth_by_bind,
        Err(e) => {
            return deny(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                format!("cannot check credentials: {e}"),
            );
        }
    };
    if !required {
        return next.run(req).await;
    }
    let secret = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(secret) = secret else {
        return deny(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a bearer token is required: send `Authorization: Bearer <token>` (create one with `task-queue token create --role operator`)".into(),
        );
    };
    let token = match queue.authenticate(secret).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return deny(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the token is not valid (unknown or revoked)".into(),
            );
        }
        Err(e) => {
            return deny(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage",
                format!("cannot check credentials: {e}"),
            );
        }
    };
    let need = required_role(req.method(), req.uri().path());
    if token.role < need {
        return deny(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "token {:?} has role {}; {} {} needs {} or above",
                token.name,
                token.role.as_str(),
                req.method(),
                req.uri().path(),
                need.as_str()
            ),
        );
    }
    req.extensions_mut().insert(Caller {
        role: token.role,
        name: token.name,
    });
    next.run(req).await
}

fn queue_body_limit(queue: &TaskQueue) -> usize {
    queue.config().server.max_body_bytes.0 as usize
}

/// Binds `addr`, prints the address on stderr, serves until `shutdown`
/// resolves, then stops the engine (running tasks get `grace` to finish).
/// With `run_engine` false the server only takes and answers requests;
/// `task-queue worker` processes on the same database run the tasks.
pub async fn serve(
    queue: TaskQueue,
    addr: SocketAddr,
    grace: Duration,
    run_engine: bool,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    let ct = CancellationToken::new();
    let app = router(queue.clone(), Some(local), &ct);
    let engine = run_engine.then(|| queue.start());
    eprintln!(
        "task-queue listening on http://{local} (REST: /api/v1, MCP: /mcp, legacy SSE: /sse){}",
        if run_engine {
            ""
        } else {
            "; no engine here: tasks run in `task-queue worker` processes"
        }
    );
    tracing::info!(%local, "serving");
    // Connections are served here rather than by `axum::serve`, whose
    // HTTP/1 has no timer: a client that never finished its request
    // headers held a connection (and a task) for ever. Headers must now
    // arrive within `server.request_timeout`, as the rest of a request.
    let header_timeout = queue.config().server.request_timeout.0;
    let mut http =
        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let stop = ct.clone();
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, go on.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
            _ = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service =
            hyper_util::service::TowerToHyperService::new(tower::ServiceExt::map_request(
                app.clone(),
                |req: axum::http::Request<hyper::body::Incoming>| req.map(axum::body::Body::new),
            ));
        let conn = http
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    stop.cancel();
    // Open connections get the grace period to finish, then are cut.
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period were closed");
    }
    match engine {
        Some(e) => e.shutdown(grace).await,
        None => Ok(()),
    }
}
