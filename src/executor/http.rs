//! HTTP tasks (`kind: http`): one request per attempt. 2xx succeeds; a JSON
//! response body becomes the result output; 5xx, 408, 425, 429 and
//! connection errors are worth a retry, other 4xx are not.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::Value;
use tokio::sync::watch;

use super::{AttemptReport, StopReason, TaskContext, finish_success, tail};
use crate::error::{Error, Result};
use crate::model::{AttemptStatus, Dur, HttpSpec, TaskResult};
use crate::store::StreamLog;

const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const MAX_HEADERS: usize = 64;
const MAX_URL_BYTES: usize = 8192;

impl HttpSpec {
    /// The method, upper-cased (default GET).
    pub fn method(&self) -> String {
        self.method.as_deref().unwrap_or("GET").to_ascii_uppercase()
    }

    /// Checks method, URL and headers. Fields are relative to `http`.
    pub fn validate(&self) -> Result<()> {
        let m = self.method();
        if !METHODS.contains(&m.as_str()) {
            return Err(Error::invalid(
                "method",
                format!("must be one of {}, got {:?}", METHODS.join(", "), m),
            ));
        }
        if self.url.len() > MAX_URL_BYTES {
            return Err(Error::invalid(
                "url",
                format!("must be at most {MAX_URL_BYTES} bytes"),
            ));
        }
        let url = Url::parse(&self.url)
            .map_err(|e| Error::invalid("url", format!("{:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(Error::invalid(
                "url",
                format!(
                    "must be an http:// or https:// URL with a host, got {:?}",
                    self.url
                ),
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(Error::invalid(
                "headers",
                format!("at most {MAX_HEADERS} headers, got {}", self.headers.len()),
            ));
        }
        for (k, v) in &self.headers {
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| {
                Error::invalid(format!("headers.{k}"), "is not a valid header name")
            })?;
            HeaderValue::from_str(v).map_err(|_| {
                Error::invalid(
                    format!("headers.{k}"),
                    "is not a valid header value (visible ASCII only, no line breaks)",
                )
            })?;
        }
        Ok(())
    }
}

/// The process-wide HTTP client (connection pool shared by every task).
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        // reqwest is built without a default crypto provider: use ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .tls_backend_rustls()
            .user_agent(concat!("task-queue/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(5))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new())
    })
}

/// Runs an HTTP task's attempt.
pub async fn run_http(
    ctx: &TaskContext,
    timeout: Duration,
    max_output_bytes: u64,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> AttemptReport {
    let started = Instant::now();
    let Some(spec) = ctx.spec.http.as_ref() else {
        return AttemptReport::fatal(
            ctx.attempt,
            started,
            "the task has no `http` request".into(),
        );
    };
    let method = Method::from_bytes(spec.method().as_bytes()).unwrap_or(Method::GET);
    let url = spec.url.clone();
    let mut req = client()
        .request(method.clone(), &url)
        .header("x-task-queue-task-id", &ctx.id)
        .header("x-task-queue-attempt", ctx.attempt.to_string())
        .header("idempotency-key", &ctx.id);
    let mut has_content_type = false;
    for (k, v) in &spec.headers {
        has_content_type |= k.eq_ignore_ascii_case("content-type");
        req = req.header(k.as_str(), v.as_str());
    }
    match &spec.body {
        None => {}
        Some(Value::String(s)) => req = req.body(s.clone()),
        Some(other) => {
            if !has_content_type {
                req = req.header("content-type", "application/json");
            }
            req = req.body(other.to_string());
        }
    }
    let cap = max_output_bytes as usize;
    let exchange = async {
        let mut resp = req.send().await?;
        let status = resp.status();
        let mut body = Vec::new();
        let mut dropped = 0u64;
        while let Some(chunk) = resp.chunk().await? {
            let room = cap.saturating_sub(body.len());
            body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            dropped += chunk.len().saturating_sub(room) as u64;
        }
        Ok::<_, reqwest::Error>((status, body, dropped))
    };
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, exchange) => Some(r),
        reason = wait_stop(&mut stop) => {
            let (status, msg, retryable) = match reason {
                StopReason::Cancelled => (AttemptStatus::Cancelled, "cancelled".to_string(), false),
                StopReason::LeaseLost => (AttemptStatus::Lost, "stopped: this worker lost the task's lease".to_string(), true),
                StopReason::Shutdown => (AttemptStatus::Lost, "stopped: the engine shut down".to_string(), true),
            };
            let mut r = AttemptReport::fatal(ctx.attempt, started, msg);
            r.status = status;
            r.retryable = retryable;
            return r;
        }
    };
    let result = |code_body: Option<(&[u8], u64)>| {
        let mut r = TaskResult {
            attempt: ctx.attempt,
            duration_ms: started.elapsed().as_millis() as u64,
            ..TaskResult::default()
        };
        if let Some((b, _)) = code_body {
            r.stdout_tail = tail(b);
        }
        r
    };
    match outcome {
        Some(Err(_)) => AttemptReport {
            status: AttemptStatus::TimedOut,
            error: Some(format!(
                "timed out after {}: no complete answer from {method} {url}",
                Dur(timeout)
            )),
            retryable: true,
            result: result(None),
            logs: Vec::new(),
        },
        Some(Ok(Err(e))) => {
            let why = if e.is_connect() {
                "cannot connect"
            } else if e.is_timeout() {
                "timed out"
            } else {
                "request failed"
            };
            AttemptReport {
                status: AttemptStatus::Failed,
                error: Some(format!("{why}: {method} {url}: {e}")),
                retryable: true,
                result: result(None),
                logs: vec![StreamLog {
                    stream: "stderr",
                    data: format!("{why}: {method} {url}: {e}\n").into_bytes(),
                    dropped_bytes: 0,
                }],
            }
        }
        Some(Ok(Ok((status, body, dropped)))) => {
            let summary = format!(
                "HTTP {} {} from {method} {url}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            );
            let logs = vec![
                StreamLog {
                    stream: "stdout",
                    data: body.clone(),
                    dropped_bytes: dropped,
                },
                StreamLog {
                    stream: "stderr",
                    data: format!("{summary}\n").into_bytes(),
                    dropped_bytes: 0,
                },
            ];
            let mut r = result(Some((&body, dropped)));
            r.stderr_tail = summary.clone();
            if status.is_success() {
                r.output = if dropped == 0 {
                    serde_json::from_slice::<Value>(&body).ok()
                } else {
                    None
                };
                let mut report = AttemptReport {
                    status: AttemptStatus::Succeeded,
                    error: None,
                    retryable: false,
                    result: r,
                    logs,
                };
                if let Err(e) = finish_success(&ctx.spec, &mut report.result) {
                    report.status = AttemptStatus::Failed;
                    report.error = Some(e);
                }
                return report;
            }
            let code = status.as_u16();
            let retryable = status.is_server_error() || matches!(code, 408 | 425 | 429);
            let snippet: String = String::from_utf8_lossy(&body).chars().take(200).collect();
            let mut error = summary;
            if !snippet.trim().is_empty() {
                error.push_str(&format!(": {}", snippet.trim()));
            }
            if !retryable {
                error.push_str(" (not retried: a 4xx answer will not change on retry)");
            }
            AttemptReport {
                status: AttemptStatus::Failed,
                error: Some(error),
                retryable,
                result: r,
                logs,
            }
        }
        None => unreachable!("the stop branch returns"),
    }
}

async fn wait_stop(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(r) = *stop.borrow_and_update() {
            return r;
        }
        if stop.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
