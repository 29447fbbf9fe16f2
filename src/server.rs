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
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::{Error, Result};
use crate::mcp::McpServer;
use crate::service::TaskQueue;
use crate::store::Role;

/// The HTTP routes of a queue. `allowed_hosts`: the Host header names
/// accepted (default: the loopback names), on every route.
pub fn router(
    queue: TaskQueue,
    allowed_hosts: Option<Vec<String>>,
    ct: &CancellationToken,
) -> axum::Router {
    let hosts = allowed_hosts.unwrap_or_else(|| {
        vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ]
    });
    let config = StreamableHttpServerConfig::default()
        .with_cancellation_token(ct.child_token())
        .with_allowed_hosts(hosts.clone());
    let body_limit = queue_body_limit(&queue);
    let q = queue.clone();
    let mcp = StreamableHttpService::new(
        move || Ok(McpServer::new(q.clone())),
        LocalSessionManager::default().into(),
        config,
    );
    let api = crate::rest::router(crate::rest::ApiState {
        queue: queue.clone(),
        metrics: Default::default(),
        started: std::time::Instant::now(),
        shutdown: ct.clone(),
    });
    let auth_queue = queue.clone();
    let origins = std::sync::Arc::new(queue.config().server.cors_origins.clone());
    axum::Router::new()
        .nest_service("/mcp", mcp)
        .merge(crate::mcp::sse::router(queue, hosts))
        .merge(api)
        .layer(axum::middleware::from_fn(move |req, next| {
            authorize(auth_queue.clone(), req, next)
        }))
        .layer(axum::middleware::from_fn(move |req, next| {
            cors(origins.clone(), req, next)
        }))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
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

/// The least role a request needs (SPEC §7).
fn required_role(method: &axum::http::Method, path: &str) -> Role {
    if path.starts_with("/mcp") || path.starts_with("/sse") || path.starts_with("/messages") {
        // MCP tools span every role; MCP over HTTP needs an operator token.
        return Role::Operator;
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
async fn authorize(queue: TaskQueue, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let required = match queue.tokens_exist().await {
        Ok(any) => any || queue.config().auth.enabled,
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
    next.run(req).await
}

fn queue_body_limit(queue: &TaskQueue) -> usize {
    queue.config().server.max_body_bytes.0 as usize
}

/// Binds `addr`, prints the address on stderr, serves until `shutdown`
/// resolves, then stops the engine (running tasks get `grace` to finish).
pub async fn serve(
    queue: TaskQueue,
    addr: SocketAddr,
    grace: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr()?;
    let hosts = if local.ip().is_loopback() {
        None
    } else {
        Some(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
            local.ip().to_string(),
        ])
    };
    let ct = CancellationToken::new();
    let app = router(queue.clone(), hosts, &ct);
    let engine = queue.start();
    eprintln!(
        "task-queue listening on http://{local} (REST: /api/v1, MCP: /mcp, legacy SSE: /sse)"
    );
    tracing::info!(%local, "serving");
    let stop = ct.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        stop.cancel();
    });
    // Open connections get the grace period to finish, then are cut.
    let cut = ct.clone();
    tokio::select! {
        r = server => r.map_err(Error::from)?,
        _ = async {
            cut.cancelled().await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!("connections still open after the grace period were closed"),
    }
    engine.shutdown(grace).await
}
