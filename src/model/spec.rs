//! The task spec (SPEC §2): what a user submits, its validation and builder.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::units::{ByteSize, Dur, Timestamp};
use crate::error::{Error, Result};

/// Largest accepted spec, serialized as JSON.
pub const MAX_SPEC_BYTES: usize = 1 << 20;
/// Linux takes one argument or environment string of at most 128 KiB,
/// its terminating NUL included (`MAX_ARG_STRLEN`): a longer one makes the
/// command fail to start (E2BIG).
const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
const MAX_COMMAND_BYTES: usize = MAX_ARG_BYTES;
const MAX_PARAMETERS_BYTES: usize = 256 * 1024;
/// Parameters of a command task travel as `TASK_QUEUE_PARAMS=<json>`, one
/// environment string.
const MAX_COMMAND_PARAMETERS_BYTES: usize = MAX_ARG_BYTES - "TASK_QUEUE_PARAMS=".len();
const MAX_ENV_VARS: usize = 256;
const MAX_TAGS: usize = 32;
const MAX_ARTIFACTS: usize = 256;
const MAX_DEPENDENCIES: usize = 1000;

/// How a task is carried out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Runs `command` with `/bin/sh -c`, or `argv` directly.
    Command,
    /// Sends an HTTP request; 2xx is success.
    Http,
    /// Done outside the server by a worker or agent that claims it, or by an
    /// in-process handler registered under the task's name (library mode).
    External,
}

impl TaskKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Command => "command",
            TaskKind::Http => "http",
            TaskKind::External => "external",
        }
    }
}

/// A condition on a dependency's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The dependency succeeded (default).
    #[default]
    Success,
    /// The dependency failed or timed out.
    Failure,
    /// The dependency reached any terminal state.
    Completion,
    /// The dependency succeeded and its result output validates against this JSON Schema.
    Schema(Value),
}

/// A dependency: a task name in the same submission or an existing task id.
#[derive(Debug, Clone, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum Dependency {
    /// Shorthand for `{task: NAME, condition: success}`.
    Name(String),
    /// A dependency with an explicit condition.
    #[schemars(extend("additionalProperties" = false))]
    Detailed {
        task: String,
        #[serde(default)]
        condition: Condition,
    },
}

const DEPENDENCY_SHAPE: &str = "expected a task name or id, or {task: NAME_OR_ID, condition: success | failure | completion | {schema: <JSON Schema>}}";

impl<'de> Deserialize<'de> for Dependency {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::Error as _;
        let v = Value::deserialize(d)?;
        match v {
            Value::String(s) => Ok(Dependency::Name(s)),
            Value::Object(mut map) => {
                let task = match map.remove("task") {
                    Some(Value::String(t)) => t,
                    Some(_) => return Err(D::Error::custom("`task` must be a task name or id")),
                    None => {
                        return Err(D::Error::custom(format!(
                            "missing `task`; {DEPENDENCY_SHAPE}"
                        )));
                    }
                };
                let condition = match map.remove("condition") {
                    None => Condition::Success,
                    Some(c) => serde_json::from_value::<Condition>(c.clone()).map_err(|_| {
                        D::Error::custom(format!(
                            "condition {c} is not one of success, failure, completion or {{schema: <JSON Schema>}}"
                        ))
                    })?,
                };
                if let Some(k) = map.keys().next() {
                    return Err(D::Error::custom(format!(
                        "unknown field `{k}` in a dependency; {DEPENDENCY_SHAPE}"
                    )));
                }
                Ok(Dependency::Detailed { task, condition })
            }
            other => Err(D::Error::custom(format!("got {other}; {DEPENDENCY_SHAPE}"))),
        }
    }
}

impl Dependency {
    /// The name or task id depended on.
    pub fn target(&self) -> &str {
        match self {
            Dependency::Name(s) => s,
            Dependency::Detailed { task, .. } => task,
        }
    }
    /// The condition (default `success`).
    pub fn condition(&self) -> &Condition {
        static SUCCESS: Condition = Condition::Success;
        match self {
            Dependency::Name(_) => &SUCCESS,
            Dependency::Detailed { condition, .. } => condition,
        }
    }
    fn validate(&self) -> Result<()> {
        let target = self.target();
        if uuid::Uuid::parse_str(target).is_err() {
            validate_name(target).map_err(|e| {
                Error::invalid(
                    "task",
                    format!(
                        "must be a task name in this submission or an existing task id: {}",
                        e.message()
                    ),
                )
            })?;
        }
        if let Condition::Schema(schema) = self.condition()
            && let Err(e) = jsonschema::validator_for(schema)
        {
            return Err(Error::invalid(
                "condition.schema",
                format!("is not a valid JSON Schema: {e}"),
            ));
        }
        Ok(())
    }
}

impl Condition {
    /// Short label: `success`, `failure`, `completion` or `schema`.
    pub fn label(&self) -> &'static str {
        match self {
            Condition::Success => "success",
            Condition::Failure => "failure",
            Condition::Completion => "completion",
            Condition::Schema(_) => "schema",
        }
    }
}

/// When a task runs: once at a time, or on a cron schedule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// One-off run at this RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Timestamp>,
    /// Cron expression (seconds field allowed), e.g. `"0 */5 * * * *"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<String>,
    /// IANA time zone for `cron`, default UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// A health check that makes a command a long-running service task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Dur>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
}

impl HealthCheck {
    /// Time between probes (default 1s).
    pub fn interval(&self) -> Duration {
        self.interval.map(|d| d.0).unwrap_or(Duration::from_secs(1))
    }
    /// Time allowed from start to the first 2xx answer (default 60s).
    pub fn timeout(&self) -> Duration {
        self.timeout.map(|d| d.0).unwrap_or(Duration::from_secs(60))
    }
    fn validate(&self) -> Result<()> {
        let ok = self.url.starts_with("http://") || self.url.starts_with("https://");
        if !ok || self.url.len() > 2048 {
            return Err(Error::invalid(
                "url",
                format!("must be an http:// or https:// URL, got {:?}", self.url),
            ));
        }
        if let Some(i) = self.interval
            && (i.0 < Duration::from_millis(50) || i.0 > Duration::from_secs(3600))
        {
            return Err(Error::invalid(
                "interval",
                format!("must be between 50ms and 1h, got {i}"),
            ));
        }
        if let Some(t) = self.timeout
            && (t.0 < Duration::from_millis(100) || t.0 > Duration::from_secs(86400))
        {
            return Err(Error::invalid(
                "timeout",
                format!("must be between 100ms and 24h, got {t}"),
            ));
        }
        Ok(())
    }
}

/// The request of an HTTP task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    pub url: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Value>,
}

/// Retry policy: exponential backoff with jitter. Unset fields take the
/// configured defaults (`execution.default_retry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Total attempts including the first, 1..=100 (1 = no retries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_attempts: Option<u32>,
    /// Delay before the second attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_delay: Option<Dur>,
    /// Upper bound of any delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Dur>,
    /// Growth factor between attempts, 1.0..=10.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: Option<f64>,
    /// Random spread as a fraction of the delay, 0.0..=1.0 (0.2 = ±20 %).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: Option<f64>,
}

impl RetryPolicy {
    /// The built-in defaults: 3 attempts, 1s doubling up to 5m, ±20 % jitter.
    pub fn standard() -> Self {
        RetryPolicy {
            max_attempts: Some(3),
            initial_delay: Some(Dur::from_secs(1)),
            max_delay: Some(Dur::from_secs(300)),
            multiplier: Some(2.0),
            jitter: Some(0.2),
        }
    }

    /// Fills unset fields from `defaults`.
    pub fn merged_over(&self, defaults: &RetryPolicy) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.max_attempts.or(defaults.max_attempts),
            initial_delay: self.initial_delay.or(defaults.initial_delay),
            max_delay: self.max_delay.or(defaults.max_delay),
            multiplier: self.multiplier.or(defaults.multiplier),
            jitter: self.jitter.or(defaults.jitter),
        }
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts.unwrap_or(3)
    }

    /// Backoff before the attempt after `attempt` (1-based) failed:
    /// `initial * multiplier^(attempt-1)`, capped, then spread by jitter.
    pub fn delay_after(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let initial = self
            .initial_delay
            .unwrap_or(Dur::from_secs(1))
            .0
            .as_secs_f64();
        let max = self
            .max_delay
            .unwrap_or(Dur::from_secs(300))
            .0
            .as_secs_f64();
        let mult = self.multiplier.unwrap_or(2.0);
        let jitter = self.jitter.unwrap_or(0.0).clamp(0.0, 1.0);
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let base = (initial * mult.powi(exp)).min(max);
        let spread = if jitter > 0.0 {
            rng.random_range(-jitter..=jitter)
        } else {
            0.0
        };
        Duration::from_secs_f64((base * (1.0 + spread)).clamp(0.0, max.max(0.0)))
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if let Some(n) = self.max_attempts
            && !(1..=100).contains(&n)
        {
            return Err(Error::invalid(
                "max_attempts",
                format!("must be between 1 and 100, got {n}"),
            ));
        }
        if let Some(m) = self.multiplier
            && !(1.0..=10.0).contains(&m)
        {
            return Err(Error::invalid(
                "multiplier",
                format!("must be between 1.0 and 10.0, got {m}"),
            ));
        }
        if let Some(j) = self.jitter
            && !(0.0..=1.0).contains(&j)
        {
            return Err(Error::invalid(
                "jitter",
                format!("must be a fraction between 0.0 and 1.0, got {j}"),
            ));
        }
        if let (Some(i), Some(m)) = (self.initial_delay, self.max_delay)
            && i > m
        {
            return Err(Error::invalid(
                "initial_delay",
                format!("must not exceed max_delay ({m}), got {i}"),
            ));
        }
        for (field, d) in [
            ("initial_delay", self.initial_delay),
            ("max_delay", self.max_delay),
        ] {
            if let Some(d) = d
                && d.0 > Duration::from_secs(7 * 86400)
            {
                return Err(Error::invalid(
                    field,
                    format!("must be at most 7 days, got {d}"),
                ));
            }
        }
        Ok(())
    }
}

/// Resource limits applied to a command's processes through rlimits.
/// Unset fields take the configured defaults (`execution.default_limits`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// CPU time per process (RLIMIT_CPU); the process gets SIGXCPU, then SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<u64>,
    /// Address-space size per process (RLIMIT_AS); allocations beyond it fail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<ByteSize>,
    /// Bytes of stdout and of stderr kept; the rest is dropped and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<ByteSize>,
    /// Processes of the task's user (RLIMIT_NPROC; not enforced for root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
}

impl Limits {
    pub fn merged_over(&self, d: &Limits) -> Limits {
        Limits {
            cpu_seconds: self.cpu_seconds.or(d.cpu_seconds),
            memory_bytes: self.memory_bytes.or(d.memory_bytes),
            max_output_bytes: self.max_output_bytes.or(d.max_output_bytes),
            max_processes: self.max_processes.or(d.max_processes),
        }
    }

    fn validate(&self) -> Result<()> {
        if self.cpu_seconds == Some(0) {
            return Err(Error::invalid("cpu_seconds", "must be at least 1"));
        }
        if let Some(m) = self.memory_bytes
            && m.0 < (1 << 20)
        {
            return Err(Error::invalid(
                "memory_bytes",
                format!("must be at least 1MiB, got {} bytes", m.0),
            ));
        }
        if let Some(m) = self.max_output_bytes
            && !(1024..=(1 << 30)).contains(&m.0)
        {
            return Err(Error::invalid(
                "max_output_bytes",
                format!("must be between 1KiB and 1GiB, got {} bytes", m.0),
            ));
        }
        if self.max_processes == Some(0) {
            return Err(Error::invalid("max_processes", "must be at least 1"));
        }
        Ok(())
    }
}

/// A task as submitted (SPEC §2). Field names are snake_case in JSON and YAML;
/// unknown fields are rejected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    /// 1–128 characters of `[A-Za-z0-9_.:-]`; unique inside a workflow.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub name: String,
    /// `command` (default when `command` or `argv` is given), `http` or `external`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<TaskKind>,
    /// Shell command, run with `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub command: Option<String>,
    /// Program and arguments, run without a shell. Exclusive with `command`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub argv: Option<Vec<String>>,
    /// Working directory (default: the server's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub cwd: Option<String>,
    /// Extra environment variables for the command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The request of a `kind: http` task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpSpec>,
    /// Free-form project name (1–128 characters), used for filtering and search.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    pub project: Option<String>,
    /// Free-form labels: at most 32, each 1–64 characters.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(min = 1, max = 64)))]
    pub tags: Vec<String>,
    /// What the task does, for people and search (at most 16 KiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16384))]
    pub description: Option<String>,
    /// JSON passed to the command as `TASK_QUEUE_PARAMS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Tasks that must reach a condition first (at most 1000).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1000))]
    pub depends_on: Vec<Dependency>,
    /// −100..100, default 0; higher runs first among ready tasks.
    #[serde(default)]
    #[schemars(range(min = -100, max = 100))]
    pub priority: i64,
    /// Longest an attempt may run (default `execution.default_timeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Dur>,
    /// Retry policy; unset fields take the configured defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetryPolicy>,
    /// Run once at a time, or on a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// Wait in `awaiting_approval` until approved or rejected.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub requires_approval: bool,
    /// Makes the task a service that succeeds when the URL answers 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// JSON Schema the result output must satisfy, else the task fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Value>,
    /// Paths (relative to `cwd`) recorded with size and SHA-256 after success.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(length(min = 1)))]
    pub artifacts: Vec<String>,
    /// A second submit with the same key returns the first task (1–256 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub idempotency_key: Option<String>,
    /// Resource limits; unset fields take the configured defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
}

fn too_long(field: &str, max: usize, got: usize) -> Error {
    Error::invalid(field, format!("must be at most {max} bytes, got {got}"))
}

fn check_no_nul(field: &str, s: &str) -> Result<()> {
    if s.contains('\0') {
        return Err(Error::invalid(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// A short text field (project, tag, idempotency key): 1 to `max`
/// characters, without NUL (PostgreSQL cannot store one in text).
pub(crate) fn check_text(field: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.chars().count() > max {
        return Err(Error::invalid(
            field,
            format!("must be 1 to {max} characters"),
        ));
    }
    check_no_nul(field, s)
}

/// A description: at most 16 KiB, without NUL.
pub(crate) fn check_description(d: &str) -> Result<()> {
    if d.len() > 16 * 1024 {
        return Err(too_long("description", 16 * 1024, d.len()));
    }
    check_no_nul("description", d)
}

/// Checks a task name: 1–128 characters of `[A-Za-z0-9_.:-]`.
pub fn validate_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 128 {
        return Err(Error::invalid(
            "name",
            format!("must be 1 to 128 characters, got {}", name.chars().count()),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-')))
    {
        return Err(Error::invalid(
            "name",
            format!(
                "may only contain letters, digits, '_', '.', ':' and '-'; found {c:?} in {name:?}"
            ),
        ));
    }
    Ok(())
}

impl TaskSpec {
    /// Starts a spec with only a name; add a command with [`TaskSpec::with_command`].
    pub fn new(name: impl Into<String>) -> Self {
        TaskSpec {
            name: name.into(),
            kind: None,
            command: None,
            argv: None,
            cwd: None,
            env: BTreeMap::new(),
            http: None,
            project: None,
            tags: Vec::new(),
            description: None,
            parameters: None,
            depends_on: Vec::new(),
            priority: 0,
            timeout: None,
            retry: None,
            schedule: None,
            requires_approval: false,
            health_check: None,
            validation: None,
            artifacts: Vec::new(),
            idempotency_key: None,
            limits: None,
        }
    }

    pub fn with_command(mut self, command: impl Into<String>) -> Self {
        self.command = Some(command.into());
        self
    }
    pub fn with_argv<I, S>(mut self, argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.argv = Some(argv.into_iter().map(Into::into).collect());
        self
    }
    pub fn with_kind(mut self, kind: TaskKind) -> Self {
        self.kind = Some(kind);
        self
    }
    pub fn with_cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }
    pub fn with_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }
    pub fn with_project(mut self, project: impl Into<String>) -> Self {
        self.project = Some(project.into());
        self
    }
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    pub fn with_description(mut self, d: impl Into<String>) -> Self {
        self.description = Some(d.into());
        self
    }
    pub fn with_parameters(mut self, p: Value) -> Self {
        self.parameters = Some(p);
        self
    }
    pub fn with_priority(mut self, p: i64) -> Self {
        self.priority = p;
        self
    }
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = Some(Dur(t));
        self
    }
    pub fn with_retry(mut self, r: RetryPolicy) -> Self {
        self.retry = Some(r);
        self
    }
    /// Shorthand for a retry policy with only `max_attempts` set.
    pub fn with_max_attempts(mut self, n: u32) -> Self {
        let mut r = self.retry.unwrap_or_default();
        r.max_attempts = Some(n);
        self.retry = Some(r);
        self
    }
    pub fn with_validation(mut self, schema: Value) -> Self {
        self.validation = Some(schema);
        self
    }
    pub fn with_artifact(mut self, path: impl Into<String>) -> Self {
        self.artifacts.push(path.into());
        self
    }
    /// The task waits in `awaiting_approval` until approved or rejected.
    pub fn requiring_approval(mut self) -> Self {
        self.requires_approval = true;
        self
    }
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = Some(limits);
        self
    }
    pub fn depends_on(mut self, task: impl Into<String>) -> Self {
        self.depends_on.push(Dependency::Name(task.into()));
        self
    }

    /// The effective kind: explicit, else `http` when `http` is given, else `command`.
    pub fn effective_kind(&self) -> TaskKind {
        match (self.kind, &self.http) {
            (Some(k), _) => k,
            (None, Some(_)) => TaskKind::Http,
            (None, None) => TaskKind::Command,
        }
    }

    /// Parses a spec from JSON, naming the failing field on error.
    pub fn from_value(v: Value) -> Result<Self> {
        crate::model::parse::from_value(v)
    }

    /// Checks every field. Errors name the field (relative to the task).
    pub fn validate(&self) -> Result<()> {
        validate_name(&self.name)?;
        let kind = self.effective_kind();
        match kind {
            TaskKind::Command => {
                match (&self.command, &self.argv) {
                    (Some(_), Some(_)) => {
                        return Err(Error::invalid(
                            "argv",
                            "give either command or argv, not both",
                        ));
                    }
                    (None, None) => {
                        return Err(Error::invalid(
                            "command",
                            "is required for a command task (or give argv, or set kind: external)",
                        ));
                    }
                    (Some(c), None) => {
                        if c.trim().is_empty() {
                            return Err(Error::invalid("command", "must not be empty"));
                        }
                        if c.len() > MAX_COMMAND_BYTES {
                            return Err(too_long("command", MAX_COMMAND_BYTES, c.len()));
                        }
                        check_no_nul("command", c)?;
                    }
                    (None, Some(a)) => {
                        if a.is_empty() || a[0].is_empty() {
                            return Err(Error::invalid(
                                "argv",
                                "must name a program in its first element",
                            ));
                        }
                        let total: usize = a.iter().map(|s| s.len()).sum();
                        if total > MAX_COMMAND_BYTES {
                            return Err(too_long("argv", MAX_COMMAND_BYTES, total));
                        }
                        for (i, s) in a.iter().enumerate() {
                            check_no_nul(&format!("argv[{i}]"), s)?;
                        }
                    }
                }
                if self.http.is_some() {
                    return Err(Error::invalid("http", "is only for kind: http"));
                }
            }
            TaskKind::Http => {
                if self.command.is_some() || self.argv.is_some() {
                    return Err(Error::invalid(
                        "command",
                        "an HTTP task sends the request in `http`; remove command/argv or use kind: command",
                    ));
                }
                let Some(h) = &self.http else {
                    return Err(Error::invalid(
                        "http",
                        "is required for kind: http, e.g. {method: POST, url: \"https://example.com/hook\"}",
                    ));
                };
                h.validate().map_err(|e| e.in_field("http"))?;
            }
            TaskKind::External => {
                if self.http.is_some() {
                    return Err(Error::invalid("http", "is only for kind: http"));
                }
                if self.command.is_some() || self.argv.is_some() {
                    return Err(Error::invalid(
                        "command",
                        "an external task is done by a worker, not run by the server; remove command/argv or use kind: command",
                    ));
                }
            }
        }
        if let Some(cwd) = &self.cwd {
            if cwd.is_empty() {
                return Err(Error::invalid("cwd", "must not be empty"));
            }
            check_no_nul("cwd", cwd)?;
        }
        if self.env.len() > MAX_ENV_VARS {
            return Err(Error::invalid(
                "env",
                format!("at most {MAX_ENV_VARS} variables, got {}", self.env.len()),
            ));
        }
        for (k, v) in &self.env {
            let valid = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(Error::invalid(
                    format!("env.{k}"),
                    "variable names must match [A-Za-z_][A-Za-z0-9_]*",
                ));
            }
            if k.starts_with("TASK_QUEUE_") {
                return Err(Error::invalid(
                    format!("env.{k}"),
                    "names starting with TASK_QUEUE_ are set by the server",
                ));
            }
            check_no_nul(&format!("env.{k}"), v)?;
            // The process gets it as one string, `NAME=value`.
            let n = k.len() + 1 + v.len();
            if n > MAX_ARG_BYTES {
                return Err(Error::invalid(
                    format!("env.{k}"),
                    format!(
                        "{k}=value must be at most {MAX_ARG_BYTES} bytes (the system's limit for one \
                         environment variable), got {n}"
                    ),
                ));
            }
        }
        if let Some(p) = &self.project {
            check_text("project", p, 128)?;
        }
        if self.tags.len() > MAX_TAGS {
            return Err(Error::invalid(
                "tags",
                format!("at most {MAX_TAGS} tags, got {}", self.tags.len()),
            ));
        }
        for (i, t) in self.tags.iter().enumerate() {
            check_text(&format!("tags[{i}]"), t, 64)?;
        }
        if let Some(d) = &self.description {
            check_description(d)?;
        }
        if let Some(p) = &self.parameters {
            let n = serde_json::to_string(p)
                .map(|s| s.len())
                .unwrap_or(usize::MAX);
            if n > MAX_PARAMETERS_BYTES {
                return Err(too_long("parameters", MAX_PARAMETERS_BYTES, n));
            }
            if kind == TaskKind::Command && n > MAX_COMMAND_PARAMETERS_BYTES {
                return Err(Error::invalid(
                    "parameters",
                    format!(
                        "must be at most {MAX_COMMAND_PARAMETERS_BYTES} bytes as JSON for a command task \
                         (they are passed in the environment variable TASK_QUEUE_PARAMS, and the system \
                         takes at most {MAX_ARG_BYTES} bytes for one), got {n}; external and HTTP tasks \
                         take up to {MAX_PARAMETERS_BYTES}"
                    ),
                ));
            }
        }
        if self.depends_on.len() > MAX_DEPENDENCIES {
            return Err(Error::invalid(
                "depends_on",
                format!(
                    "at most {MAX_DEPENDENCIES} dependencies, got {}",
                    self.depends_on.len()
                ),
            ));
        }
        for (i, d) in self.depends_on.iter().enumerate() {
            d.validate()
                .map_err(|e| e.in_field(&format!("depends_on[{i}]")))?;
        }
        if !(-100..=100).contains(&self.priority) {
            return Err(Error::invalid(
                "priority",
                format!(
                    "must be an integer between -100 and 100, got {}",
                    self.priority
                ),
            ));
        }
        if let Some(t) = self.timeout
            && (t.0 < Duration::from_millis(1) || t.0 > Duration::from_secs(7 * 86400))
        {
            return Err(Error::invalid(
                "timeout",
                format!("must be between 1ms and 7 days, got {t}"),
            ));
        }
        if let Some(r) = &self.retry {
            r.validate().map_err(|e| e.in_field("retry"))?;
        }
        if let Some(s) = &self.schedule {
            s.validate().map_err(|e| e.in_field("schedule"))?;
        }
        if let Some(h) = &self.health_check {
            if kind != TaskKind::Command {
                return Err(Error::invalid(
                    "health_check",
                    "only a command task can be a service with a health check",
                ));
            }
            h.validate().map_err(|e| e.in_field("health_check"))?;
        }
        if let Some(schema) = &self.validation
            && let Err(e) = jsonschema::validator_for(schema)
        {
            return Err(Error::invalid(
                "validation",
                format!("is not a valid JSON Schema: {e}"),
            ));
        }
        if self.artifacts.len() > MAX_ARTIFACTS {
            return Err(Error::invalid(
                "artifacts",
                format!("at most {MAX_ARTIFACTS} paths"),
            ));
        }
        for (i, a) in self.artifacts.iter().enumerate() {
            if a.is_empty() {
                return Err(Error::invalid(
                    format!("artifacts[{i}]"),
                    "must not be empty",
                ));
            }
            check_no_nul(&format!("artifacts[{i}]"), a)?;
        }
        if let Some(k) = &self.idempotency_key {
            check_text("idempotency_key", k, 256)?;
        }
        if let Some(l) = &self.limits {
            l.validate().map_err(|e| e.in_field("limits"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(v: serde_json::Value) -> Result<()> {
        crate::model::parse::from_value::<TaskSpec>(v)?.validate()
    }

    fn refused_at(v: serde_json::Value, field: &str) -> String {
        match check(v) {
            Err(Error::InvalidInput { field: f, message }) => {
                assert_eq!(f, field, "{message}");
                message
            }
            other => panic!("expected a refusal of {field}, got {other:?}"),
        }
    }

    /// What a command gets as one argument or environment string fits the
    /// system's limit of 128 KiB with its NUL; a longer one is refused at
    /// submit, naming the field, instead of failing to start (E2BIG).
    #[test]
    fn strings_a_process_gets_fit_one_argument() {
        let text = |n: usize| "x".repeat(n);
        assert!(check(json!({"name": "c", "command": text(131_071)})).is_ok());
        let m = refused_at(json!({"name": "c", "command": text(131_072)}), "command");
        assert!(m.contains("131071"), "{m}");
        refused_at(json!({"name": "a", "argv": [text(131_072)]}), "argv");
        // NAME=value
        assert!(
            check(json!({"name": "e", "command": "true", "env": {"V": text(131_069)}})).is_ok()
        );
        let m = refused_at(
            json!({"name": "e", "command": "true", "env": {"V": text(131_070)}}),
            "env.V",
        );
        assert!(m.contains("V=value"), "{m}");
        // TASK_QUEUE_PARAMS=<json>: a JSON string adds its two quotes.
        let params = |n: usize| json!({"name": "p", "command": "true", "parameters": text(n - 2)});
        assert!(check(params(131_053)).is_ok());
        let m = refused_at(params(131_054), "parameters");
        assert!(m.contains("TASK_QUEUE_PARAMS"), "{m}");
        // Tasks that are not processes keep the larger limit.
        assert!(
            check(json!({"name": "x", "kind": "external", "parameters": text(200_000)})).is_ok()
        );
        refused_at(
            json!({"name": "x", "kind": "external", "parameters": text(262_143)}),
            "parameters",
        );
    }
}
