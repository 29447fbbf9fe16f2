//! HTTP tasks: one request per attempt through a shared client; a 2xx
//! answer is success and a JSON response body becomes the result output.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use serde_json::Value;
use tokio::sync::watch;

use super::process::wait_stop;
use super::{AttemptReport, StopReason, TaskContext, finish_success, stopped, tail};
use crate::error::{Error, Result};
use crate::model::{AttemptStatus, Dur, HttpSpec, TaskResult};
use crate::store::StreamLog;

/// Accepted request methods (matched case-insensitively).
const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
const MAX_HEADERS: usize = 64;
const MAX_REDIRECTS: usize = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Characters of a failed answer's body quoted in the error.
const ERROR_BODY_CHARS: usize = 200;
/// Header names the server sets itself on every request.
const RESERVED_PREFIX: &str = "x-task-queue-";
const TASK_ID_HEADER: &str = "x-task-queue-task-id";
const ATTEMPT_HEADER: &str = "x-task-queue-attempt";
const IDEMPOTENCY_HEADER: &str = "idempotency-key";

impl HttpSpec {
    /// Checks the method, URL, headers and body. Errors name the field
    /// relative to the `http` object (`url`, `method`, `headers.NAME`).
    pub fn validate(&self) -> Result<()> {
        self.parsed_method()?;
        let url = Url::parse(&self.url)
            .map_err(|e| Error::invalid("url", format!("is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::invalid(
                "url",
                format!("must use http or https, got {:?}", url.scheme()),
            ));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(Error::invalid("url", "must name a host"));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(Error::invalid(
                "headers",
                format!("at most {MAX_HEADERS} headers, got {}", self.headers.len()),
            ));
        }
        for (name, value) in &self.headers {
            let field = format!("headers.{name}");
            if HeaderName::from_bytes(name.as_bytes()).is_err() {
                return Err(Error::invalid(
                    field,
                    "is not a valid header name (letters, digits and !#$%&'*+-.^_`|~ only)",
                ));
            }
            if name.to_ascii_lowercase().starts_with(RESERVED_PREFIX) {
                return Err(Error::invalid(
                    field,
                    "names starting with x-task-queue- are set by the server",
                ));
            }
            if HeaderValue::from_str(value).is_err() {
                return Err(Error::invalid(
                    field,
                    "is not a valid header value (no control characters or line breaks)",
                ));
            }
        }
        Ok(())
    }

    /// The method, upper-cased; GET when unset.
    fn parsed_method(&self) -> Result<Method> {
        let m = self.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        if !METHODS.contains(&m.as_str()) {
            return Err(Error::invalid(
                "method",
                format!(
                    "must be one of {}, got {:?}",
                    METHODS.join(", "),
                    self.method.as_deref().unwrap_or_default()
                ),
            ));
        }
        Method::from_bytes(m.as_bytes()).map_err(|e| Error::invalid("method", e))
    }
}

/// The process-wide HTTP client (rustls with the ring provider, at most 5
/// redirects, 10 s connect timeout), built on first use.
pub fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        // Fails only when a provider is already installed, which is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::builder()
            .tls_backend_rustls()
            .user_agent(concat!("task-queue/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .expect("the HTTP client configuration is fixed and valid")
    })
}

/// What arrived before the exchange ended (or was cut off).
#[derive(Default)]
struct Received {
    status: Option<StatusCode>,
    body: Vec<u8>,
    dropped_bytes: u64,
}

enum Ending {
    Done,
    Failed(reqwest::Error),
    TimedOut,
    Stopped(StopReason),
}

/// Runs an HTTP task's attempt: sends `ctx.spec.http`, bounded as a whole
/// (connect to the last body byte) by `timeout`, keeping at most
/// `max_output_bytes` of the response body.
pub async fn run_http(
    ctx: &TaskContext,
    timeout: Duration,
    max_output_bytes: u64,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> AttemptReport {
    let started = Instant::now();
    let Some(http) = ctx.spec.http.as_ref() else {
        return AttemptReport::fatal(ctx.attempt, started, "the task has no http request".into());
    };
    let request = match build_request(ctx, http) {
        Ok(r) => r,
        Err(e) => return AttemptReport::fatal(ctx.attempt, started, e),
    };
    let target = format!("{} {}", request.method(), shown_url(request.url()));
    let cap = usize::try_from(max_output_bytes).unwrap_or(usize::MAX);
    let mut got = Received::default();
    let ending = {
        let exchange = exchange(request, cap, &mut got);
        tokio::select! {
            r = tokio::time::timeout(timeout, exchange) => match r {
                Ok(Ok(())) => Ending::Done,
                Ok(Err(e)) => Ending::Failed(e),
                Err(_) => Ending::TimedOut,
            },
            reason = wait_stop(&mut stop) => Ending::Stopped(reason),
        }
    };
    let answer = got
        .status
        .map(|s| format!("HTTP {} from {target}", status_text(s)));
    let (status, error, retryable) = match &ending {
        Ending::Stopped(reason) => stopped(*reason),
        Ending::TimedOut => {
            let waiting = match &answer {
                Some(a) => format!("{a} arrived but its body did not finish"),
                None => format!("no answer from {target}"),
            };
            (
                AttemptStatus::TimedOut,
                Some(format!("timed out after {}; {waiting}", Dur(timeout))),
                true,
            )
        }
        Ending::Failed(e) => {
            let (what, retryable) = describe_failure(e, &target, answer.as_deref());
            (AttemptStatus::Failed, Some(what), retryable)
        }
        Ending::Done => {
            let code = got.status.unwrap_or(StatusCode::OK);
            if code.is_success() {
                (AttemptStatus::Succeeded, None, false)
            } else {
                let retryable = retry_worthy(code);
                let mut msg = answer.clone().unwrap_or_default();
                let snippet = body_snippet(&got.body);
                if !snippet.is_empty() {
                    msg.push_str(": ");
                    msg.push_str(&snippet);
                }
                if code.is_client_error() && !retryable {
                    msg.push_str("; not retried: a 4xx answer will not change on retry");
                } else if !retryable {
                    msg.push_str("; not retried");
                }
                (AttemptStatus::Failed, Some(msg), retryable)
            }
        }
    };
    let output = match ending {
        Ending::Done if got.dropped_bytes == 0 => serde_json::from_slice::<Value>(&got.body)
            .ok()
            .filter(|v| !v.is_null()),
        _ => None,
    };
    let mut summary = answer.or_else(|| error.clone()).unwrap_or_default();
    summary.push('\n');
    let result = TaskResult {
        output,
        exit_code: None,
        signal: None,
        duration_ms: started.elapsed().as_millis() as u64,
        attempt: ctx.attempt,
        stdout_tail: tail(&got.body),
        stderr_tail: tail(summary.as_bytes()),
        artifacts: Vec::new(),
    };
    let logs = vec![
        StreamLog {
            stream: "stdout",
            data: got.body,
            dropped_bytes: got.dropped_bytes,
        },
        StreamLog {
            stream: "stderr",
            data: summary.into_bytes(),
            dropped_bytes: 0,
        },
    ];
    let mut report = AttemptReport {
        status,
        error,
        retryable,
        result,
        logs,
    };
    if report.status == AttemptStatus::Succeeded
        && let Err(e) = finish_success(&ctx.spec, &mut report.result).await
    {
        return report.into_fatal(e);
    }
    report
}

/// The request for `http`, with the task id, attempt and idempotency headers.
fn build_request(ctx: &TaskContext, http: &HttpSpec) -> Result<reqwest::Request, String> {
    http.validate()
        .map_err(|e| format!("cannot send the request: {}", e.in_field("http")))?;
    let method = http.parsed_method().map_err(|e| e.to_string())?;
    let url = Url::parse(&http.url).map_err(|e| e.to_string())?;
    let mut headers = HeaderMap::new();
    for (name, value) in &http.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
        let value = HeaderValue::from_str(value).map_err(|e| e.to_string())?;
        headers.append(name, value);
    }
    let id = HeaderValue::from_str(&ctx.id)
        .map_err(|_| format!("the task id {:?} cannot be sent in a header", ctx.id))?;
    headers.insert(TASK_ID_HEADER, id.clone());
    headers.insert(ATTEMPT_HEADER, HeaderValue::from(ctx.attempt));
    // The same key on every attempt, so the remote side can dedupe retries.
    if !headers.contains_key(IDEMPOTENCY_HEADER) {
        headers.insert(IDEMPOTENCY_HEADER, id);
    }
    let body = match &http.body {
        None => None,
        Some(Value::String(text)) => Some(text.clone().into_bytes()),
        Some(v) => {
            if !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            Some(serde_json::to_vec(v).map_err(|e| e.to_string())?)
        }
    };
    let mut builder = client().request(method, url).headers(headers);
    if let Some(body) = body {
        builder = builder.body(body);
    }
    builder
        .build()
        .map_err(|e| format!("cannot build the request: {}", error_chain(&e)))
}

/// Sends the request and reads the body into `got`, keeping `cap` bytes.
async fn exchange(req: reqwest::Request, cap: usize, got: &mut Received) -> reqwest::Result<()> {
    let mut resp = client().execute(req).await?;
    got.status = Some(resp.status());
    while let Some(chunk) = resp.chunk().await? {
        let room = cap.saturating_sub(got.body.len());
        let keep = chunk.len().min(room);
        got.body.extend_from_slice(&chunk[..keep]);
        got.dropped_bytes += (chunk.len() - keep) as u64;
    }
    Ok(())
}

/// Answers that may differ on a later attempt.
fn retry_worthy(code: StatusCode) -> bool {
    code.is_server_error()
        || matches!(
            code,
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_EARLY | StatusCode::TOO_MANY_REQUESTS
        )
}

/// The error and retryability of an exchange that failed without an answer
/// (or while reading the body of one).
fn describe_failure(e: &reqwest::Error, target: &str, answer: Option<&str>) -> (String, bool) {
    let cause = error_chain(e);
    if let Some(a) = answer {
        return (format!("{a}, but reading the body failed: {cause}"), true);
    }
    if e.is_redirect() {
        return (
            format!("{target} failed: {cause}; not retried: the redirects would repeat"),
            false,
        );
    }
    if e.is_builder() {
        return (format!("cannot send {target}: {cause}"), false);
    }
    if e.is_connect() {
        return (format!("cannot connect for {target}: {cause}"), true);
    }
    (format!("{target} failed: {cause}"), true)
}

/// An error and its sources, joined with ": " (repeats left out).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// `503 Service Unavailable`, or just the code when it has no known reason.
fn status_text(code: StatusCode) -> String {
    match code.canonical_reason() {
        Some(r) => format!("{} {r}", code.as_u16()),
        None => code.as_u16().to_string(),
    }
}

/// The URL with any password replaced, for messages and logs.
fn shown_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

/// The first characters of a body on one line, for error messages.
fn body_snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let mut out: String = text
        .chars()
        .take(ERROR_BODY_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().count() > ERROR_BODY_CHARS {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::model::{TaskKind, TaskSpec};

    /// Starts a tiny HTTP/1.1 server on 127.0.0.1 and returns its base URL.
    async fn serve() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(handle(sock));
            }
        });
        format!("http://{addr}")
    }

    async fn handle(mut sock: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let mut request_line = lines.next().unwrap_or_default().split(' ');
        let method = request_line.next().unwrap_or_default().to_string();
        let path = request_line.next().unwrap_or_default().to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            match sock.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).into_owned();
        let (status, ctype, text) = match path.as_str() {
            "/json" => (
                "200 OK",
                "application/json",
                json!({
                    "method": method,
                    "task_id": header("x-task-queue-task-id"),
                    "attempt": header("x-task-queue-attempt"),
                    "idempotency_key": header("idempotency-key"),
                    "content_type": header("content-type"),
                    "user_agent": header("user-agent"),
                    "custom": header("x-custom"),
                    "body": body,
                })
                .to_string(),
            ),
            "/text" => ("200 OK", "text/plain", "hello, plain world\n".to_string()),
            "/status/503" => (
                "503 Service Unavailable",
                "text/plain",
                "upstream is down\n".to_string(),
            ),
            "/status/404" => ("404 Not Found", "text/plain", "no such thing\n".to_string()),
            "/slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                ("200 OK", "text/plain", "finally\n".to_string())
            }
            _ => ("404 Not Found", "text/plain", String::new()),
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
            text.len()
        );
        let _ = sock.write_all(resp.as_bytes()).await;
        let _ = sock.shutdown().await;
    }

    fn http_spec(method: &str, url: &str) -> HttpSpec {
        HttpSpec {
            method: Some(method.to_string()),
            url: url.to_string(),
            headers: Default::default(),
            body: None,
        }
    }

    fn ctx_for(http: HttpSpec, validation: Option<Value>) -> TaskContext {
        let mut spec = TaskSpec::new("call").with_kind(TaskKind::Http);
        spec.http = Some(http);
        spec.validation = validation;
        TaskContext {
            id: "task-123".into(),
            name: "call".into(),
            attempt: 2,
            spec: Arc::new(spec),
        }
    }

    async fn run(ctx: &TaskContext) -> AttemptReport {
        let (_tx, rx) = watch::channel(None);
        run_http(ctx, Duration::from_secs(5), 1 << 20, rx).await
    }

    fn stderr_log(r: &AttemptReport) -> String {
        String::from_utf8_lossy(&r.logs[1].data).into_owned()
    }

    #[tokio::test]
    async fn get_json_succeeds_with_output() {
        let base = serve().await;
        let mut http = http_spec("get", &format!("{base}/json"));
        http.headers.insert("X-Custom".into(), "yes".into());
        let r = run(&ctx_for(http, None)).await;
        assert_eq!(r.status, AttemptStatus::Succeeded, "{:?}", r.error);
        assert!(r.error.is_none());
        let out = r.result.output.as_ref().unwrap();
        assert_eq!(out["method"], "GET");
        assert_eq!(out["task_id"], "task-123");
        assert_eq!(out["attempt"], "2");
        assert_eq!(out["idempotency_key"], "task-123");
        assert_eq!(out["custom"], "yes");
        assert_eq!(
            out["user_agent"],
            concat!("task-queue/", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(r.result.attempt, 2);
        assert_eq!(r.result.exit_code, None);
        assert_eq!(r.result.signal, None);
        assert_eq!(r.logs[0].stream, "stdout");
        assert_eq!(
            serde_json::from_slice::<Value>(&r.logs[0].data).unwrap(),
            *out
        );
        assert_eq!(r.result.stdout_tail.as_bytes(), &r.logs[0].data[..]);
        assert_eq!(
            stderr_log(&r).trim(),
            format!("HTTP 200 OK from GET {base}/json")
        );
        assert_eq!(r.result.stderr_tail, stderr_log(&r));
    }

    #[tokio::test]
    async fn post_sends_json_body() {
        let base = serve().await;
        let mut http = http_spec("POST", &format!("{base}/json"));
        http.body = Some(json!({"a": 1, "b": [true]}));
        let r = run(&ctx_for(http, None)).await;
        assert_eq!(r.status, AttemptStatus::Succeeded, "{:?}", r.error);
        let out = r.result.output.unwrap();
        assert_eq!(out["method"], "POST");
        assert_eq!(out["content_type"], "application/json");
        let sent: Value = serde_json::from_str(out["body"].as_str().unwrap()).unwrap();
        assert_eq!(sent, json!({"a": 1, "b": [true]}));
    }

    #[tokio::test]
    async fn string_body_is_sent_raw_and_content_type_kept() {
        let base = serve().await;
        let mut http = http_spec("PUT", &format!("{base}/json"));
        http.body = Some(json!("a=1&b=2"));
        http.headers.insert(
            "Content-Type".into(),
            "application/x-www-form-urlencoded".into(),
        );
        let r = run(&ctx_for(http, None)).await;
        let out = r.result.output.unwrap();
        assert_eq!(out["body"], "a=1&b=2");
        assert_eq!(out["content_type"], "application/x-www-form-urlencoded");
    }

    #[tokio::test]
    async fn text_body_has_no_output_but_is_logged() {
        let base = serve().await;
        let r = run(&ctx_for(http_spec("GET", &format!("{base}/text")), None)).await;
        assert_eq!(r.status, AttemptStatus::Succeeded);
        assert!(r.result.output.is_none());
        assert_eq!(r.logs[0].data, b"hello, plain world\n");
        assert_eq!(r.result.stdout_tail, "hello, plain world\n");
    }

    #[tokio::test]
    async fn server_error_is_retryable() {
        let base = serve().await;
        let r = run(&ctx_for(
            http_spec("POST", &format!("{base}/status/503")),
            None,
        ))
        .await;
        assert_eq!(r.status, AttemptStatus::Failed);
        assert!(r.retryable);
        let e = r.error.clone().unwrap();
        assert_eq!(
            e,
            format!("HTTP 503 Service Unavailable from POST {base}/status/503: upstream is down")
        );
        assert!(stderr_log(&r).starts_with("HTTP 503 Service Unavailable from POST"));
    }

    #[tokio::test]
    async fn client_error_is_not_retryable() {
        let base = serve().await;
        let r = run(&ctx_for(
            http_spec("GET", &format!("{base}/status/404")),
            None,
        ))
        .await;
        assert_eq!(r.status, AttemptStatus::Failed);
        assert!(!r.retryable);
        let e = r.error.clone().unwrap();
        assert!(e.starts_with("HTTP 404 Not Found from GET"), "{e}");
        assert!(e.contains("no such thing"), "{e}");
        assert!(
            e.ends_with("not retried: a 4xx answer will not change on retry"),
            "{e}"
        );
    }

    #[test]
    fn retry_worthy_codes() {
        for c in [500, 502, 503, 408, 425, 429] {
            assert!(retry_worthy(StatusCode::from_u16(c).unwrap()), "{c}");
        }
        for c in [400, 401, 403, 404, 409, 422] {
            assert!(!retry_worthy(StatusCode::from_u16(c).unwrap()), "{c}");
        }
    }

    #[tokio::test]
    async fn connection_refused_is_retryable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let r = run(&ctx_for(http_spec("GET", &format!("http://{addr}/")), None)).await;
        assert_eq!(r.status, AttemptStatus::Failed);
        assert!(r.retryable);
        let e = r.error.clone().unwrap();
        assert!(e.starts_with("cannot connect for GET"), "{e}");
        assert!(stderr_log(&r).starts_with("cannot connect"));
    }

    #[tokio::test]
    async fn timeout_bounds_the_exchange() {
        let base = serve().await;
        let ctx = ctx_for(http_spec("GET", &format!("{base}/slow")), None);
        let (_tx, rx) = watch::channel(None);
        let t = Instant::now();
        let r = run_http(&ctx, Duration::from_millis(300), 1 << 20, rx).await;
        assert!(t.elapsed() < Duration::from_secs(3));
        assert_eq!(r.status, AttemptStatus::TimedOut);
        assert!(r.retryable);
        let e = r.error.clone().unwrap();
        assert!(e.starts_with("timed out after 300ms"), "{e}");
        assert!(e.contains(&format!("GET {base}/slow")), "{e}");
        assert!(r.result.duration_ms >= 300);
    }

    #[tokio::test]
    async fn stop_signal_aborts_the_request() {
        let base = serve().await;
        let ctx = ctx_for(http_spec("GET", &format!("{base}/slow")), None);
        for (reason, status, retryable) in [
            (StopReason::Cancelled, AttemptStatus::Cancelled, false),
            (StopReason::LeaseLost, AttemptStatus::Lost, true),
            (StopReason::Shutdown, AttemptStatus::Lost, true),
        ] {
            let (tx, rx) = watch::channel(None);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let _ = tx.send(Some(reason));
                // Keep the sender alive until the attempt has seen it.
                tokio::time::sleep(Duration::from_secs(10)).await;
            });
            let t = Instant::now();
            let r = run_http(&ctx, Duration::from_secs(30), 1 << 20, rx).await;
            assert!(t.elapsed() < Duration::from_secs(3));
            assert_eq!(r.status, status, "{reason:?}");
            assert_eq!(r.retryable, retryable, "{reason:?}");
            assert_eq!(r.error, stopped(reason).1);
        }
    }

    #[tokio::test]
    async fn validation_schema_failure_is_fatal() {
        let base = serve().await;
        let schema = json!({"type": "object", "required": ["missing"]});
        let r = run(&ctx_for(
            http_spec("GET", &format!("{base}/json")),
            Some(schema),
        ))
        .await;
        assert_eq!(r.status, AttemptStatus::Failed);
        assert!(!r.retryable);
        let e = r.error.clone().unwrap();
        assert!(e.contains("validation schema"), "{e}");
        assert!(e.contains("missing"), "{e}");

        let ok = json!({"type": "object", "required": ["method"]});
        let r = run(&ctx_for(
            http_spec("GET", &format!("{base}/json")),
            Some(ok),
        ))
        .await;
        assert_eq!(r.status, AttemptStatus::Succeeded, "{:?}", r.error);
    }

    #[tokio::test]
    async fn output_is_capped_and_dropped_bytes_counted() {
        let base = serve().await;
        let ctx = ctx_for(http_spec("GET", &format!("{base}/json")), None);
        let (_tx, rx) = watch::channel(None);
        let r = run_http(&ctx, Duration::from_secs(5), 10, rx).await;
        assert_eq!(r.status, AttemptStatus::Succeeded);
        assert_eq!(r.logs[0].data.len(), 10);
        assert!(r.logs[0].dropped_bytes > 0);
        // A cut-off body is not parsed as output.
        assert!(r.result.output.is_none());
    }

    #[tokio::test]
    async fn missing_http_request_is_fatal() {
        let mut spec = TaskSpec::new("call").with_kind(TaskKind::Http);
        spec.http = None;
        let ctx = TaskContext {
            id: "t".into(),
            name: "call".into(),
            attempt: 1,
            spec: Arc::new(spec),
        };
        let r = run(&ctx).await;
        assert_eq!(r.status, AttemptStatus::Failed);
        assert!(!r.retryable);
    }

    fn field_of(e: Error) -> String {
        match e {
            Error::InvalidInput { field, .. } => field,
            other => panic!("unexpected error {other}"),
        }
    }

    #[test]
    fn validate_accepts_good_specs() {
        let mut h = http_spec("patch", "https://example.com/x?y=1");
        h.headers
            .insert("Authorization".into(), "Bearer abc".into());
        h.body = Some(json!({"k": "v"}));
        h.validate().unwrap();
        HttpSpec {
            method: None,
            url: "http://127.0.0.1:8080".into(),
            headers: Default::default(),
            body: Some(json!("raw")),
        }
        .validate()
        .unwrap();
    }

    #[test]
    fn validate_rejects_bad_specs() {
        let e = http_spec("GET", "ftp://example.com/file")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("http or https"), "{e}");
        assert_eq!(field_of(e), "url");

        let e = http_spec("GET", "not a url").validate().unwrap_err();
        assert_eq!(field_of(e), "url");

        let e = http_spec("FETCH", "https://example.com")
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("\"FETCH\""), "{e}");
        assert_eq!(field_of(e), "method");

        let mut h = http_spec("GET", "https://example.com");
        h.headers.insert("bad header".into(), "x".into());
        assert_eq!(field_of(h.validate().unwrap_err()), "headers.bad header");

        let mut h = http_spec("GET", "https://example.com");
        h.headers.insert("X-Ok".into(), "line\nbreak".into());
        assert_eq!(field_of(h.validate().unwrap_err()), "headers.X-Ok");

        let mut h = http_spec("GET", "https://example.com");
        h.headers
            .insert("X-Task-Queue-Task-Id".into(), "spoof".into());
        assert_eq!(
            field_of(h.validate().unwrap_err()),
            "headers.X-Task-Queue-Task-Id"
        );

        let mut h = http_spec("GET", "https://example.com");
        for i in 0..=MAX_HEADERS {
            h.headers.insert(format!("x-h{i}"), "v".into());
        }
        assert_eq!(field_of(h.validate().unwrap_err()), "headers");
    }

    #[test]
    fn client_builds_and_passwords_are_hidden() {
        let _ = client();
        let u = Url::parse("https://user:secret@example.com/p").unwrap();
        assert_eq!(shown_url(&u), "https://user:***@example.com/p");
    }
}
