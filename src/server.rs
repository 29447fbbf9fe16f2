//! `task-queue serve`: one HTTP server on the queue — the REST API under
//! `/api/v1`, `/health`, `/metrics`, MCP over streamable HTTP at `/mcp`
//! and the legacy SSE transport at `/sse` + `/messages` — with the engine
//! running in the same process.

use std::net::SocketAddr;
use std::time::Duration;

use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::mcp::McpServer;
use crate::service::TaskQueue;

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
    axum::Router::new()
        .nest_service("/mcp", mcp)
        .merge(crate::mcp::sse::router(queue, hosts))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
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
