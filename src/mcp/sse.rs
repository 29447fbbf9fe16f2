//! The legacy HTTP+SSE transport (protocol 2024-11-05) for older clients:
//! `GET /sse` opens an event stream whose first event (`endpoint`) names
//! `/messages?sessionId=ID`; the client POSTs each JSON-RPC message there
//! (answered 202) and reads the responses as `message` events. Each stream
//! is one MCP session served by its own server instance over a pair of
//! channels.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::channel::mpsc;
use futures::{SinkExt, StreamExt};
use rmcp::ServiceExt;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use serde::Deserialize;

use super::McpServer;
use crate::service::TaskQueue;

type Sessions = Arc<Mutex<HashMap<String, mpsc::Sender<ClientJsonRpcMessage>>>>;

#[derive(Clone)]
struct SseState {
    sessions: Sessions,
    queue: TaskQueue,
    /// Host header names accepted (without port), as `/mcp` does: a page
    /// on another site cannot reach a loopback server by DNS rebinding.
    allowed_hosts: Arc<Vec<String>>,
}

/// `GET /sse` and `POST /messages`, answering requests whose Host header
/// names one of `allowed_hosts` (any port).
pub fn router(queue: TaskQueue, allowed_hosts: Vec<String>) -> Router {
    let state = SseState {
        sessions: Arc::default(),
        queue,
        allowed_hosts: Arc::new(allowed_hosts),
    };
    Router::new()
        .route("/sse", get(open))
        .route("/messages", post(message))
        .with_state(state)
}

/// Forgets the session when its event stream is dropped (client gone);
/// dropping the inbound sender ends the server instance.
struct SessionGuard(Sessions, String);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.1);
    }
}

fn host_allowed(st: &SseState, headers: &axum::http::HeaderMap) -> bool {
    let Some(host) = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host),
    };
    st.allowed_hosts
        .iter()
        .any(|a| a.eq_ignore_ascii_case(name))
}

fn forbidden() -> Response {
    (
        StatusCode::FORBIDDEN,
        "Forbidden: Host header is not allowed",
    )
        .into_response()
}

async fn open(State(st): State<SseState>, headers: axum::http::HeaderMap) -> Response {
    if !host_allowed(&st, &headers) {
        return forbidden();
    }
    // The session id is the only credential of POST /messages: unguessable.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (in_tx, in_rx) = mpsc::channel::<ClientJsonRpcMessage>(64);
    let (out_tx, out_rx) = mpsc::channel::<ServerJsonRpcMessage>(64);
    st.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), in_tx);
    let server = McpServer::new(st.queue.clone());
    tokio::spawn(async move {
        // `serve` waits for `initialize`, so it runs beside the stream.
        match server.serve((out_tx, in_rx)).await {
            Ok(running) => {
                let _ = running.waiting().await;
            }
            Err(e) => tracing::debug!(error = %e, "an SSE session ended before initialize"),
        }
    });
    let guard = SessionGuard(st.sessions.clone(), id.clone());
    let endpoint = Event::default()
        .event("endpoint")
        .data(format!("/messages?sessionId={id}"));
    let stream = futures::stream::once(async move { Ok::<_, Infallible>(endpoint) }).chain(
        out_rx.map(move |msg| {
            let _keep = &guard;
            let data = serde_json::to_string(&msg).unwrap_or_default();
            Ok::<_, Infallible>(Event::default().event("message").data(data))
        }),
    );
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}

#[derive(Deserialize)]
struct SessionQuery {
    #[serde(rename = "sessionId")]
    session_id: String,
}

async fn message(
    State(st): State<SseState>,
    headers: axum::http::HeaderMap,
    Query(q): Query<SessionQuery>,
    axum::Json(msg): axum::Json<ClientJsonRpcMessage>,
) -> Response {
    if !host_allowed(&st, &headers) {
        return forbidden();
    }
    let tx = st
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&q.session_id)
        .cloned();
    match tx {
        None => (
            StatusCode::NOT_FOUND,
            "unknown sessionId: open GET /sse first and use the endpoint it announces",
        )
            .into_response(),
        Some(mut tx) => match tx.send(msg).await {
            Ok(()) => StatusCode::ACCEPTED.into_response(),
            Err(_) => (StatusCode::GONE, "the session has closed").into_response(),
        },
    }
}
