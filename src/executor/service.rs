//! Service tasks: a command with a `health_check`. The attempt succeeds
//! when the URL first answers 2xx while the process runs; the process then
//! keeps running (its dependents talk to it) until its workflow finishes,
//! the task is cancelled, or the engine stops.

use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::process::{self, ProcessOutcome};
use super::{
    AttemptReport, ExecSettings, StopReason, TaskContext, command_request, exit_error, spawn_error,
    tail,
};
use crate::model::{AttemptStatus, Dur, HealthCheck, TaskResult};
use crate::store::StreamLog;

/// A service process that passed its health check and keeps running.
pub struct RunningService {
    stop: watch::Sender<Option<StopReason>>,
    handle: JoinHandle<std::io::Result<ProcessOutcome>>,
}

impl RunningService {
    /// Whether the process has exited on its own.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Stops the process group (TERM, grace, KILL) and returns its output.
    pub async fn stop(self, reason: StopReason) -> Vec<StreamLog> {
        let _ = self.stop.send(Some(reason));
        self.wait().await
    }

    /// Waits for the process to end and returns its output.
    pub async fn wait(self) -> Vec<StreamLog> {
        match self.handle.await {
            Ok(Ok(o)) => logs_of(o),
            _ => Vec::new(),
        }
    }
}

fn logs_of(o: ProcessOutcome) -> Vec<StreamLog> {
    vec![
        StreamLog {
            stream: "stdout",
            data: o.stdout.data,
            dropped_bytes: o.stdout.dropped_bytes,
        },
        StreamLog {
            stream: "stderr",
            data: o.stderr.data,
            dropped_bytes: o.stderr.dropped_bytes,
        },
    ]
}

/// Runs a service task's attempt until it is healthy (→ the running
/// service is returned with a succeeded report) or fails first.
pub async fn run_service(
    ctx: &TaskContext,
    settings: &ExecSettings,
    reaper: Option<std::sync::Arc<super::reaper::Reaper>>,
    mut stop: watch::Receiver<Option<StopReason>>,
    health: &HealthCheck,
) -> (AttemptReport, Option<RunningService>) {
    let started = Instant::now();
    let (mut req, _result_path) = match command_request(ctx, settings) {
        Ok(r) => r,
        Err(e) => return (AttemptReport::fatal(ctx.attempt, started, e), None),
    };
    // Once healthy the service runs until stopped; only the health deadline limits it.
    req.timeout = Duration::from_secs(10 * 365 * 86400);
    let (inner_tx, inner_rx) = watch::channel(None);
    let spec = ctx.spec.clone();
    let req_for_task = req.clone();
    let handle =
        tokio::spawn(async move { process::run(&req_for_task, reaper.as_deref(), inner_rx).await });
    let mut handle = Some(handle);
    let client = super::http::client();
    let deadline = started + health.timeout();
    let interval = health.interval();
    let probe_timeout = interval.clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut last_probe = String::from("no answer yet");
    loop {
        // Did the process end before it became healthy?
        if handle.as_ref().is_some_and(|h| h.is_finished()) {
            let outcome = handle.take().expect("checked").await;
            let report = match outcome {
                Ok(Ok(o)) => {
                    let msg = format!(
                        "the service {} before its health check passed (last check: {last_probe})",
                        exit_error(&o, &req)
                    );
                    failed_report(ctx, started, o, AttemptStatus::Failed, msg, true)
                }
                Ok(Err(e)) => {
                    AttemptReport::fatal(ctx.attempt, started, spawn_error(&spec, &req, &e))
                }
                Err(e) => AttemptReport::fatal(
                    ctx.attempt,
                    started,
                    format!("the service runner failed: {e}"),
                ),
            };
            return (report, None);
        }
        match client.get(&health.url).timeout(probe_timeout).send().await {
            Ok(r) if r.status().is_success() => {
                let report = AttemptReport {
                    status: AttemptStatus::Succeeded,
                    error: None,
                    retryable: false,
                    result: TaskResult {
                        output: Some(serde_json::json!({
                            "healthy": true,
                            "url": health.url,
                            "status": r.status().as_u16(),
                        })),
                        attempt: ctx.attempt,
                        duration_ms: started.elapsed().as_millis() as u64,
                        ..TaskResult::default()
                    },
                    logs: Vec::new(),
                };
                let svc = RunningService {
                    stop: inner_tx,
                    handle: handle.take().expect("still running"),
                };
                return (report, Some(svc));
            }
            Ok(r) => last_probe = format!("HTTP {}", r.status()),
            Err(e) => last_probe = short_error(&e),
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = inner_tx.send(Some(StopReason::Cancelled));
            let o = handle.take().expect("still running").await;
            let msg = format!(
                "the health check at {} did not pass within {} (last check: {last_probe}); the service was stopped",
                health.url,
                Dur(health.timeout())
            );
            let report = match o {
                Ok(Ok(o)) => failed_report(ctx, started, o, AttemptStatus::TimedOut, msg, true),
                _ => AttemptReport::fatal(ctx.attempt, started, msg),
            };
            return (report, None);
        }
        let wait = interval.min(deadline - now);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = stop.changed() => {
                let reason = if r.is_ok() { *stop.borrow() } else { None };
                if let Some(reason) = reason {
                    let _ = inner_tx.send(Some(reason));
                    let o = handle.take().expect("still running").await;
                    let (status, msg, retryable) = super::stopped(reason);
                    let msg = msg.unwrap_or_default();
                    let report = match o {
                        Ok(Ok(o)) => failed_report(ctx, started, o, status, msg, retryable),
                        _ => AttemptReport::fatal(ctx.attempt, started, msg),
                    };
                    return (report, None);
                }
            }
        }
    }
}

fn short_error(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "connection refused".into()
    } else {
        e.to_string()
    }
}

fn failed_report(
    ctx: &TaskContext,
    started: Instant,
    o: ProcessOutcome,
    status: AttemptStatus,
    error: String,
    retryable: bool,
) -> AttemptReport {
    AttemptReport {
        status,
        error: Some(error),
        retryable,
        result: TaskResult {
            output: None,
            exit_code: o.exit_code,
            signal: o.signal,
            duration_ms: started.elapsed().as_millis() as u64,
            attempt: ctx.attempt,
            stdout_tail: tail(&o.stdout.last_bytes(super::TAIL_BYTES)),
            stderr_tail: tail(&o.stderr.last_bytes(super::TAIL_BYTES)),
            artifacts: Vec::new(),
        },
        logs: logs_of(o),
    }
}
