//! Carrying out one attempt of a claimed task: a command (child process)
//! or an in-process handler, then the result file, validation and artifacts.
//!
//! The executor decides how an attempt ended and whether that failure is
//! worth retrying; the scheduler turns that into the task's next state.

pub mod http;
pub mod process;
pub mod reaper;
pub mod service;
pub mod spawn;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::model::{Artifact, AttemptStatus, TaskResult, TaskSpec};
use crate::store::StreamLog;
pub use process::StopReason;
use process::{Ending, ProcessRequest};
use reaper::Reaper;

/// Bytes of each stream kept in `result.stdout_tail` / `stderr_tail`.
const TAIL_BYTES: usize = 4096;
/// Largest accepted `$TASK_QUEUE_RESULT` file.
pub(crate) const MAX_RESULT_BYTES: u64 = 4 << 20;

/// What an in-process handler receives.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: String,
    pub name: String,
    /// 1-based.
    pub attempt: u32,
    pub spec: Arc<TaskSpec>,
}

impl TaskContext {
    /// The task's `parameters` (JSON null when unset).
    pub fn parameters(&self) -> &Value {
        self.spec.parameters.as_ref().unwrap_or(&Value::Null)
    }
}

/// How a handler reports failure.
#[derive(Debug, Clone)]
pub enum HandlerError {
    /// Worth another attempt, per the task's retry policy.
    Retryable(String),
    /// Retrying will not help.
    Fatal(String),
}

/// An in-process handler for external tasks of one name.
pub type Handler =
    Arc<dyn Fn(TaskContext) -> BoxFuture<'static, Result<Value, HandlerError>> + Send + Sync>;

/// The handlers registered on a queue, by task name or `prefix*` pattern.
pub type Handlers = HashMap<String, Handler>;

/// The handler for a task name: an exact registration, else the longest
/// matching `prefix*` pattern.
pub fn find_handler(handlers: &Handlers, name: &str) -> Option<Handler> {
    if let Some(h) = handlers.get(name) {
        return Some(h.clone());
    }
    handlers
        .iter()
        .filter_map(|(k, h)| {
            let prefix = k.strip_suffix('*')?;
            name.starts_with(prefix).then_some((prefix.len(), h))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, h)| h.clone())
}

/// How an attempt ended, before the scheduler applies the retry policy.
#[derive(Debug)]
pub struct AttemptReport {
    pub status: AttemptStatus,
    pub error: Option<String>,
    /// Whether another attempt could succeed.
    pub retryable: bool,
    pub result: TaskResult,
    pub logs: Vec<StreamLog>,
}

impl AttemptReport {
    pub(crate) fn fatal(attempt: u32, started: Instant, error: String) -> Self {
        AttemptReport {
            status: AttemptStatus::Failed,
            error: Some(error),
            retryable: false,
            result: TaskResult {
                attempt,
                duration_ms: started.elapsed().as_millis() as u64,
                ..TaskResult::default()
            },
            logs: Vec::new(),
        }
    }
}

/// Settings the executor needs from the configuration.
#[derive(Debug, Clone)]
pub struct ExecSettings {
    pub env_allowlist: Vec<String>,
    pub kill_grace: Duration,
    /// Where result files are created.
    pub scratch_dir: PathBuf,
}

/// The process to start for a command task's attempt, and its result file.
pub(crate) fn command_request(
    ctx: &TaskContext,
    settings: &ExecSettings,
) -> Result<(ProcessRequest, PathBuf), String> {
    let spec = &ctx.spec;
    let argv = match (&spec.command, &spec.argv) {
        (Some(c), _) => vec!["/bin/sh".to_string(), "-c".to_string(), c.clone()],
        (None, Some(a)) => a.clone(),
        (None, None) => return Err("the task has no command or argv".into()),
    };
    let result_path = settings
        .scratch_dir
        .join(format!("{}-{}.result.json", ctx.id, ctx.attempt));
    let _ = std::fs::remove_file(&result_path);
    let mut env: Vec<(String, String)> = settings
        .env_allowlist
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.clone(), v)))
        .collect();
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.push(("TASK_QUEUE_TASK_ID".into(), ctx.id.clone()));
    env.push(("TASK_QUEUE_TASK_NAME".into(), ctx.name.clone()));
    env.push(("TASK_QUEUE_ATTEMPT".into(), ctx.attempt.to_string()));
    env.push((
        "TASK_QUEUE_RESULT".into(),
        result_path.to_string_lossy().into_owned(),
    ));
    env.push((
        "TASK_QUEUE_PARAMS".into(),
        spec.parameters
            .as_ref()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "null".into()),
    ));
    let req = ProcessRequest {
        argv,
        cwd: spec.cwd.as_ref().map(PathBuf::from),
        env,
        limits: spec.limits.clone().unwrap_or_default(),
        timeout: spec
            .timeout
            .map(|t| t.0)
            .unwrap_or(Duration::from_secs(3600)),
        kill_grace: settings.kill_grace,
    };
    Ok((req, result_path))
}

/// Why a command could not be started, in words.
pub(crate) fn spawn_error(spec: &TaskSpec, req: &ProcessRequest, e: &std::io::Error) -> String {
    match (&spec.cwd, e.kind()) {
        (Some(cwd), std::io::ErrorKind::NotFound) if !Path::new(cwd).is_dir() => {
            format!("cannot start the command: working directory {cwd:?} does not exist")
        }
        (_, std::io::ErrorKind::NotFound) => {
            format!(
                "cannot start the command: program {:?} not found",
                req.argv[0]
            )
        }
        // EPERM (not EACCES, a command that may not be run) from setrlimit.
        _ if e.raw_os_error() == Some(libc::EPERM) => {
            let over = spawn::RawLimits::from(&req.limits).over_hard_limits();
            if over.is_empty() {
                return format!("cannot start the command: {e}");
            }
            let what: Vec<String> = over
                .iter()
                .map(|(field, asked, hard)| {
                    format!("{field} asks for {asked}, over this worker's hard limit of {hard}")
                })
                .collect();
            format!(
                "cannot start the command: {} (only a process with CAP_SYS_RESOURCE may raise a hard limit; \
                 lower the limit or raise the worker's, e.g. with ulimit -H or systemd's Limit*=)",
                what.join("; ")
            )
        }
        _ => format!("cannot start the command: {e}"),
    }
}

/// Runs a command task's attempt.
pub async fn run_command(
    ctx: &TaskContext,
    settings: &ExecSettings,
    reaper: Option<&Reaper>,
    stop: watch::Receiver<Option<StopReason>>,
) -> AttemptReport {
    let started = Instant::now();
    let spec = &ctx.spec;
    let (req, result_path) = match command_request(ctx, settings) {
        Ok(r) => r,
        Err(e) => return AttemptReport::fatal(ctx.attempt, started, e),
    };
    let outcome = match process::run(&req, reaper, stop).await {
        Ok(o) => o,
        Err(e) => {
            return AttemptReport::fatal(ctx.attempt, started, spawn_error(spec, &req, &e));
        }
    };
    let exit_msg = exit_error(&outcome, &req);
    let result = TaskResult {
        output: None,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        duration_ms: outcome.duration.as_millis() as u64,
        attempt: ctx.attempt,
        stdout_tail: tail(&outcome.stdout.last_bytes(TAIL_BYTES)),
        stderr_tail: tail(&outcome.stderr.last_bytes(TAIL_BYTES)),
        artifacts: Vec::new(),
    };
    let logs = vec![
        StreamLog {
            stream: "stdout",
            data: outcome.stdout.data,
            dropped_bytes: outcome.stdout.dropped_bytes,
        },
        StreamLog {
            stream: "stderr",
            data: outcome.stderr.data,
            dropped_bytes: outcome.stderr.dropped_bytes,
        },
    ];
    let output = read_result_file(&result_path);
    let _ = std::fs::remove_file(&result_path);
    let (status, error, retryable) = match outcome.ending {
        Ending::TimedOut => (
            AttemptStatus::TimedOut,
            Some(format!(
                "timed out after {}; the process group was stopped",
                crate::model::Dur(req.timeout)
            )),
            true,
        ),
        Ending::Stopped(reason) => stopped(reason),
        Ending::Exited if outcome.exit_code == Some(0) => (AttemptStatus::Succeeded, None, false),
        Ending::Exited => (AttemptStatus::Failed, Some(exit_msg), true),
    };
    let mut report = AttemptReport {
        status,
        error,
        retryable,
        result,
        logs,
    };
    if report.status == AttemptStatus::Succeeded {
        match output {
            Ok(out) => report.result.output = out,
            Err(e) => return report.into_fatal(e),
        }
        if let Err(e) = finish_success(spec, &mut report.result).await {
            return report.into_fatal(e);
        }
    } else if let Ok(out) = output {
        report.result.output = out;
    }
    report
}

/// Runs an external task through its in-process handler.
pub async fn run_handler(
    ctx: TaskContext,
    handler: Handler,
    timeout: Duration,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> AttemptReport {
    let started = Instant::now();
    let attempt = ctx.attempt;
    let spec = ctx.spec.clone();
    let fut = handler(ctx);
    let outcome = tokio::select! {
        r = tokio::time::timeout(timeout, fut) => Some(r),
        _ = async {
            loop {
                if stop.borrow_and_update().is_some() { return; }
                if stop.changed().await.is_err() { std::future::pending::<()>().await; }
            }
        } => None,
    };
    let mut result = TaskResult {
        attempt,
        duration_ms: started.elapsed().as_millis() as u64,
        ..TaskResult::default()
    };
    let (status, error, retryable) = match outcome {
        None => (AttemptStatus::Cancelled, Some("stopped".to_string()), false),
        Some(Err(_)) => (
            AttemptStatus::TimedOut,
            Some(format!(
                "handler timed out after {}",
                crate::model::Dur(timeout)
            )),
            true,
        ),
        Some(Ok(Ok(v))) => {
            result.output = if v.is_null() { None } else { Some(v) };
            (AttemptStatus::Succeeded, None, false)
        }
        Some(Ok(Err(HandlerError::Retryable(e)))) => (AttemptStatus::Failed, Some(e), true),
        Some(Ok(Err(HandlerError::Fatal(e)))) => (AttemptStatus::Failed, Some(e), false),
    };
    let mut report = AttemptReport {
        status,
        error,
        retryable,
        result,
        logs: Vec::new(),
    };
    if report.status == AttemptStatus::Succeeded
        && let Err(e) = finish_success(&spec, &mut report.result).await
    {
        return report.into_fatal(e);
    }
    report
}

/// Status, error and retryability of an attempt stopped from outside.
pub(crate) fn stopped(reason: StopReason) -> (AttemptStatus, Option<String>, bool) {
    match reason {
        StopReason::Cancelled => (AttemptStatus::Cancelled, Some("cancelled".into()), false),
        StopReason::LeaseLost => (
            AttemptStatus::Lost,
            Some("stopped: this worker lost the task's lease".into()),
            true,
        ),
        StopReason::Shutdown => (
            AttemptStatus::Lost,
            Some("stopped: the engine shut down".into()),
            true,
        ),
    }
}

impl AttemptReport {
    fn into_fatal(mut self, error: String) -> Self {
        self.status = AttemptStatus::Failed;
        self.error = Some(error);
        self.retryable = false;
        self
    }
}

/// Validation and artifacts, after a successful exit.
pub(crate) async fn finish_success(spec: &TaskSpec, result: &mut TaskResult) -> Result<(), String> {
    if let Some(schema) = &spec.validation {
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| format!("validation schema is invalid: {e}"))?;
        let instance = result.output.clone().unwrap_or(Value::Null);
        let errors: Vec<String> = validator
            .iter_errors(&instance)
            .take(5)
            .map(|e| {
                let path = e.instance_path().to_string();
                if path.is_empty() {
                    e.to_string()
                } else {
                    format!("{path}: {e}")
                }
            })
            .collect();
        if !errors.is_empty() {
            return Err(format!(
                "the result output does not satisfy the task's validation schema: {}",
                errors.join("; ")
            ));
        }
    }
    for path in &spec.artifacts {
        let full = match &spec.cwd {
            Some(cwd) if !Path::new(path).is_absolute() => Path::new(cwd).join(path),
            _ => PathBuf::from(path),
        };
        // A large artifact takes a while to hash: not on a runtime thread.
        let artifact = tokio::task::spawn_blocking(move || hash_file(&full))
            .await
            .map_err(|e| format!("artifact {path:?} could not be hashed: {e}"))?
            .map_err(|e| format!("artifact {path:?} was not produced: {e}"))?;
        result.artifacts.push(Artifact {
            path: path.clone(),
            size: artifact.0,
            sha256: artifact.1,
        });
    }
    Ok(())
}

/// Opens a file a task left behind, refusing anything but a regular file:
/// a FIFO would block the open (and the runtime thread with it), and a
/// device such as `/dev/zero` never ends. Opened without blocking, so a
/// FIFO swapped in after the check cannot block it either.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Size and SHA-256 of an artifact. Blocking: run it off the runtime.
fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use std::io::Read;
    let mut f = open_regular(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, hex::encode(h.finalize())))
}

fn read_result_file(path: &Path) -> Result<Option<Value>, String> {
    use std::io::Read;
    let f = match open_regular(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the result file $TASK_QUEUE_RESULT: {e}"
            ));
        }
    };
    let mut text = String::new();
    f.take(MAX_RESULT_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read the result file $TASK_QUEUE_RESULT: {e}"))?;
    if text.len() as u64 > MAX_RESULT_BYTES {
        return Err(format!(
            "the result file $TASK_QUEUE_RESULT is over {MAX_RESULT_BYTES} bytes; at most {MAX_RESULT_BYTES} are read"
        ));
    }
    if text.trim().is_empty() {
        return Ok(None);
    }
    // As request bodies and task files: a key given twice is an error, not
    // a silent choice of the last one.
    let v: Value = crate::model::json_strict(text.as_bytes())
        .map_err(|e| format!("the result file $TASK_QUEUE_RESULT is not valid JSON: {e}"))?;
    if !v.is_object() {
        return Err("the result file $TASK_QUEUE_RESULT must hold a JSON object".into());
    }
    Ok(Some(v))
}

pub(crate) fn exit_error(o: &process::ProcessOutcome, req: &ProcessRequest) -> String {
    let mut msg = match (o.exit_code, o.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => format!("killed by signal {sig} ({})", signal_name(sig)),
        _ => "ended without an exit status".to_string(),
    };
    if o.signal == Some(libc::SIGXCPU)
        || (o.signal == Some(libc::SIGKILL) && req.limits.cpu_seconds.is_some())
    {
        msg.push_str(&format!(
            "; the CPU limit of {}s may have been reached",
            req.limits.cpu_seconds.unwrap_or_default()
        ));
    }
    if let Some(mem) = req.limits.memory_bytes {
        let stderr = String::from_utf8_lossy(&o.stderr.data).to_ascii_lowercase();
        if stderr.contains("memory") || stderr.contains("cannot allocate") {
            msg.push_str(&format!(
                "; the memory limit of {} bytes was likely reached",
                mem.0
            ));
        }
    }
    msg
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGINT => "SIGINT",
        libc::SIGPIPE => "SIGPIPE",
        _ => "signal",
    }
}

pub(crate) fn tail(data: &[u8]) -> String {
    let start = data.len().saturating_sub(TAIL_BYTES);
    String::from_utf8_lossy(&data[start..]).into_owned()
}
