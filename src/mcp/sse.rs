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
use axum::extract::{Extension, Query, State};
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
use crate::server::Caller;
use crate::service::TaskQueue;
use crate::store::Role;

type Sessions = Arc<Mutex<HashMap<String, Session>>>;

/// An open SSE session: where its messages go, and the role of the token
/// that opened it (None on an open server).
#[derive(Clone)]
struct Session {
    tx: mpsc::Sender<ClientJsonRpcMessage>,
    /// The session's stream, for answers given before the library sees a
    /// message (see [`crate::mcp::stdio::refusal`]).
    out: mpsc::Sender<ServerJsonRpcMessage>,
    role: Option<Role>,
}

#[derive(Clone)]
struct SseState {
    sessions: Sessions,
    queue: TaskQueue,
}

/// `GET /sse` and `POST /messages`. Host, Origin and tokens are checked by
/// the server's middleware before these handlers run.
pub fn router(queue: TaskQueue) -> Router {
    let state = SseState {
        sessions: Arc::default(),
        queue,
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

async fn open(State(st): State<SseState>, caller: Option<Extension<Caller>>) -> Response {
    let role = caller.map(|Extension(c)| c.role);
    // The session id is the only credential of POST /messages: unguessable.
    let id = uuid::Uuid::new_v4().simple().to_string();
    let (in_tx, in_rx) = mpsc::channel::<ClientJsonRpcMessage>(64);
    let (out_tx, out_rx) = mpsc::channel::<ServerJsonRpcMessage>(64);
    st.sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Session {
                tx: in_tx,
                out: out_tx.clone(),
                role,
            },
        );
    let server = McpServer::for_role(st.queue.clone(), role);
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
    caller: Option<Extension<Caller>>,
    Query(q): Query<SessionQuery>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        )
            .into_response();
    }
    let msg = match crate::mcp::stdio::refusal(&body) {
        Some(answer) => Err(answer),
        None => match serde_json::from_slice::<ClientJsonRpcMessage>(&body) {
            Ok(m) => Ok(m),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("fail to deserialize request body: {e}"),
                )
                    .into_response();
            }
        },
    };
    let session = st
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&q.session_id)
        .cloned();
    // A session opened with a token is driven with a token of at least
    // the same role.
    let tx = match session {
        Some(Session {
            role: Some(need), ..
        }) if caller.as_ref().is_none_or(|Extension(c)| c.role < need) => {
            return (
                StatusCode::FORBIDDEN,
                format!(
                    "this session was opened with a {} token; send one of that role or above",
                    need.as_str()
                ),
            )
                .into_response();
        }
        s => s,
    };
    let Some(session) = tx else {
        return (
            StatusCode::NOT_FOUND,
            "unknown sessionId: open GET /sse first and use the endpoint it announces",
        )
            .into_response();
    };
    let sent = match msg {
        Ok(msg) => session.tx.clone().send(msg).await.is_ok(),
        // Answered on the session's stream, where its answers go.
        Err(answer) => match serde_json::from_value::<ServerJsonRpcMessage>(answer) {
            Ok(answer) => session.out.clone().send(answer).await.is_ok(),
            Err(_) => false,
        },
    };
    if sent {
        StatusCode::ACCEPTED.into_response()
    } else {
        (StatusCode::GONE, "the session has closed").into_response()
    }
}
