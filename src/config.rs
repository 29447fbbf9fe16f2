//! Configuration, in layers: built-in defaults, then a YAML file
//! (`--config`), then `TASK_QUEUE_<SECTION>__<KEY>` environment variables,
//! then command-line flags (`--db`, `--log-level`).
//!
//! Every section rejects unknown keys so a typo is a start-up error that
//! names the key, not a silently ignored setting. `docs/CONFIGURATION.md`
//! describes every key.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::{ByteSize, Dur, Limits, RetryPolicy};

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "TASK_QUEUE_";

/// Separator between the section and key parts of an override variable.
pub const ENV_SEPARATOR: &str = "__";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub execution: ExecutionConfig,
    pub monitoring: MonitoringConfig,
    pub vectorizer: VectorizerConfig,
    pub search: SearchConfig,
}

/// `server:` section: the HTTP listener of `task-queue serve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address and port to listen on.
    pub bind: SocketAddr,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: ByteSize,
    /// Longest time a request may take (long polls and event streams excepted).
    pub request_timeout: Dur,
    /// On shutdown, how long in-flight requests may finish before they are cut.
    pub shutdown_grace: Dur,
    /// Allow binding a non-loopback address with auth off. Dangerous: anyone
    /// who can reach the port can run commands as this user.
    pub insecure: bool,
    /// Origins allowed by CORS (`https://host[:port]`, or `*`); empty = CORS off.
    pub cors_origins: Vec<String>,
    /// Host header names answered besides the loopback names and the bound
    /// address (a reverse proxy's public name), or `*` for any.
    pub allowed_hosts: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 16080)),
            max_body_bytes: ByteSize(16 << 20),
            request_timeout: Dur::from_secs(60),
            shutdown_grace: Dur::from_secs(30),
            insecure: false,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }
}

/// `auth:` section. API tokens themselves live in the database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Require a bearer token on HTTP requests. Auth is also on, whatever
    /// this says, as soon as any API token exists.
    pub enabled: bool,
}

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// The WAL is synced before any write is answered: a submit that
    /// returned survives power loss.
    #[default]
    Durable,
    /// `synchronous=NORMAL`: survives a crash of the process, may lose the
    /// last commits on power loss.
    Fast,
}

/// `storage:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// SQLite database file.
    pub path: PathBuf,
    /// A database URL instead of `path`: `sqlite:PATH` (sets `path`), or
    /// `postgres://user:password@host:port/db` to share one queue between
    /// several nodes (see docs/SCALING.md).
    pub database_url: Option<String>,
    pub durability: Durability,
    /// Days finished tasks are kept.
    pub retention_days: u32,
    /// Readers in the read pool.
    pub read_connections: u32,
}

impl StorageConfig {
    /// The PostgreSQL URL, when `database_url` names one.
    pub fn postgres_url(&self) -> Option<&str> {
        self.database_url
            .as_deref()
            .filter(|u| crate::store::postgres::is_postgres_url(u))
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./data/task-queue.db"),
            database_url: None,
            durability: Durability::Durable,
            retention_days: 30,
            read_connections: 4,
        }
    }
}

/// `execution:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Tasks this process runs at once.
    pub max_concurrent_tasks: usize,
    /// Timeout of a task that sets none.
    pub default_timeout: Dur,
    /// Retry policy fields a task leaves unset.
    pub default_retry: RetryPolicy,
    /// Limits a task leaves unset.
    pub default_limits: Limits,
    /// How long a claim is valid without renewal; a crashed worker's tasks
    /// are re-run after this.
    pub lease_duration: Dur,
    /// Between SIGTERM and SIGKILL when stopping a task.
    pub kill_grace: Dur,
    /// How often an idle engine looks for work submitted by other processes.
    pub poll_interval: Dur,
    /// Server environment variables passed to tasks.
    pub env_allowlist: Vec<String>,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            max_concurrent_tasks: 10,
            default_timeout: Dur::from_secs(3600),
            default_retry: RetryPolicy::standard(),
            default_limits: Limits {
                max_output_bytes: Some(ByteSize(10 << 20)),
                ..Limits::default()
            },
            lease_duration: Dur::from_secs(30),
            kill_grace: Dur::from_secs(5),
            poll_interval: Dur::from_millis(250),
            env_allowlist: ["PATH", "HOME", "LANG", "TERM"].map(String::from).to_vec(),
        }
    }
}

/// Format of log lines on stderr.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `monitoring:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitoringConfig {
    /// Serve Prometheus metrics at `GET /metrics`.
    pub metrics: bool,
    /// `text` or `json` log lines on stderr.
    pub log_format: LogFormat,
    /// Log filter (`warn`, `info`, `task_queue=debug,warn`); `--log-level` wins.
    pub log_level: String,
    /// `/health` reports the scheduler as stuck when it has not ticked for this long.
    pub health_stale_after: Dur,
}

impl Default for MonitoringConfig {
    fn default() -> Self {
        MonitoringConfig {
            metrics: true,
            log_format: LogFormat::Text,
            log_level: "warn".to_string(),
            health_stale_after: Dur::from_secs(30),
        }
    }
}

/// `vectorizer:` section: the optional HiveLLM Vectorizer mirror.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VectorizerConfig {
    /// Base URL of the Vectorizer REST API (e.g. `http://localhost:15002`);
    /// unset = no Vectorizer.
    pub endpoint: Option<String>,
    /// Collection interaction records are written to (created if missing).
    pub collection: String,
    /// Name of the environment variable holding the API key, if it needs one.
    pub api_key_env: Option<String>,
    /// Records sent per request by the outbox.
    pub batch_size: usize,
    /// Timeout of one request to the Vectorizer.
    pub timeout: Dur,
}

impl Default for VectorizerConfig {
    fn default() -> Self {
        VectorizerConfig {
            endpoint: None,
            collection: "task-interactions".to_string(),
            api_key_env: None,
            batch_size: 64,
            timeout: Dur::from_secs(10),
        }
    }
}

impl VectorizerConfig {
    /// The API key, read from the variable named by `api_key_env` (if set
    /// and present in the environment).
    pub fn api_key(&self) -> Option<String> {
        self.api_key_env
            .as_deref()
            .and_then(|name| std::env::var(name).ok())
    }
}

/// Which embedding tier `search_tasks` adds to the built-in full-text search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Embedder {
    /// Full-text (FTS5 + trigram + synonyms) only; no model, no network.
    #[default]
    None,
    /// A local embedding model loaded from `search.model_dir`.
    Local,
    /// An OpenAI-compatible `/v1/embeddings` endpoint at `search.openai_url`.
    Openai,
}

/// `search:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchConfig {
    /// `none`, `local` or `openai`.
    pub embedder: Embedder,
    /// Directory of the local embedding model (required for `local`;
    /// nothing is downloaded at run time).
    pub model_dir: Option<PathBuf>,
    /// Base URL of an OpenAI-compatible API (required for `openai`).
    pub openai_url: Option<String>,
    /// Embedding model name sent to that API (required for `openai`).
    pub openai_model: Option<String>,
    /// Age in days at which a past task's ranking weight is halved.
    pub recency_half_life_days: u32,
}

impl Default for SearchConfig {
    fn default() -> Self {
        SearchConfig {
            embedder: Embedder::None,
            model_dir: None,
            openai_url: None,
            openai_model: None,
            recency_half_life_days: 30,
        }
    }
}

/// Command-line flags that override the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--db PATH|URL`: a path sets `storage.path`; a URL sets
    /// `storage.database_url`.
    pub db: Option<PathBuf>,
    /// `--log-level`: sets `monitoring.log_level`.
    pub log_level: Option<String>,
}

impl Config {
    /// Loads a YAML file; unknown keys and bad values name the key.
    /// Environment variables are not applied (see [`Config::load_layered`]).
    pub fn load(path: &Path) -> Result<Config> {
        Self::load_layered(Some(path), std::iter::empty())
    }

    /// Parses configuration text (YAML or JSON), without environment overrides.
    pub fn from_yaml(text: &str) -> Result<Config> {
        let cfg = deserialize(with_defaults(parse_text(text)?))?.resolved();
        cfg.validate()?;
        Ok(cfg)
    }

    /// Defaults, then `file` (if any), then the `TASK_QUEUE_<SECTION>__<KEY>`
    /// variables found in `env` (pass `std::env::vars()`); validated.
    ///
    /// Errors name the key and where the bad value came from (the file or
    /// the variable).
    pub fn load_layered(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<Config> {
        Self::load_with(file, env, &Overrides::default())
    }

    /// [`Config::load_layered`], then command-line flags on top, then
    /// validation: defaults < file < environment < flags.
    pub fn load_with(
        file: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Config> {
        let base = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
                parse_text(&text).map_err(|e| from_source(e, &path.display().to_string()))?
            }
            None => Value::Object(serde_json::Map::new()),
        };
        let base = with_defaults(base);
        let mut env = env_overrides(env)?;
        let mut config = loop {
            let mut v = base.clone();
            for o in &env {
                set_path(&mut v, &o.path, o.value.clone());
            }
            let err = match deserialize(v) {
                Ok(c) => break c,
                Err(err) => err,
            };
            let Error::InvalidInput { field, .. } = &err else {
                return Err(err);
            };
            let field = field.clone();
            let Some(o) = env
                .iter_mut()
                .filter(|o| o.covers(&field))
                .max_by_key(|o| o.path.len())
            else {
                return Err(match file {
                    Some(path) => from_source(err, &path.display().to_string()),
                    None => err,
                });
            };
            // `2024` or `true` given for a string key: try the text as written.
            if o.first_error.is_none() && field == o.dotted() && !o.value.is_string() {
                o.value = Value::String(o.raw.clone());
                o.first_error = Some(err);
                continue;
            }
            let err = o.first_error.take().unwrap_or(err);
            return Err(from_source(err, &o.var));
        };
        if let Some(db) = &flags.db {
            let s = db.to_string_lossy();
            if s.contains("://") || s.starts_with("sqlite:") {
                config.storage.database_url = Some(s.into_owned());
            } else {
                config.storage.path = db.clone();
                config.storage.database_url = None;
            }
        }
        if let Some(level) = &flags.log_level {
            config.monitoring.log_level = level.clone();
        }
        let config = config.resolved();
        config.validate().map_err(|err| {
            let field = match &err {
                Error::InvalidInput { field, .. } | Error::Unsupported { field, .. } => field,
                _ => return err,
            };
            let source = if flags.db.is_some() && field.starts_with("storage.") {
                Some("--db".to_string())
            } else if flags.log_level.is_some() && field == "monitoring.log_level" {
                Some("--log-level".to_string())
            } else if let Some(o) = env
                .iter()
                .filter(|o| o.covers(field))
                .max_by_key(|o| o.path.len())
            {
                Some(o.var.clone())
            } else {
                file.map(|p| p.display().to_string())
            };
            match source {
                Some(s) => from_source(err, &s),
                None => err,
            }
        })?;
        Ok(config)
    }

    /// Derived settings: a `sqlite:` `storage.database_url` sets `storage.path`.
    fn resolved(mut self) -> Config {
        if let Some(Ok(path)) = self.storage.database_url.as_deref().map(sqlite_path) {
            self.storage.path = path;
        }
        self
    }

    /// Refuses to serve a non-loopback `server.bind` with auth off, unless
    /// `server.insecure` is set. `tokens_exist`: whether any API token is
    /// stored (auth is on as soon as one exists). For `task-queue serve` at
    /// start, after `--bind` is applied.
    pub fn check_exposure(&self, tokens_exist: bool) -> Result<()> {
        let bind = self.server.bind;
        if bind.ip().is_loopback() || self.auth.enabled || tokens_exist || self.server.insecure {
            return Ok(());
        }
        Err(Error::Config(format!(
            "server.bind: refusing to listen on {bind} without auth: anyone who can reach it \
             could run commands as this user. Create an API token (`task-queue token create \
             --role admin`), bind 127.0.0.1 for local use, or pass --insecure \
             (server.insecure: true) to accept the risk"
        )))
    }

    /// Checks ranges the types cannot express. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        self.validate_server()?;
        self.validate_storage()?;
        self.validate_execution()?;
        self.validate_monitoring()?;
        self.validate_vectorizer()?;
        self.validate_search()?;
        Ok(())
    }

    fn validate_server(&self) -> Result<()> {
        let s = &self.server;
        if s.max_body_bytes.0 < 1024 {
            return Err(Error::invalid(
                "server.max_body_bytes",
                format!("must be at least 1KiB, got {}", s.max_body_bytes),
            ));
        }
        positive("server.request_timeout", s.request_timeout)?;
        for (i, origin) in s.cors_origins.iter().enumerate() {
            if origin != "*" && !is_origin(origin) {
                return Err(Error::invalid(
                    format!("server.cors_origins[{i}]"),
                    format!(
                        "must be \"*\" or an origin such as https://app.example.com \
                         (scheme, host, optional port; no path), got {origin:?}"
                    ),
                ));
            }
        }
        for (i, host) in s.allowed_hosts.iter().enumerate() {
            let ok = host == "*"
                || (!host.is_empty()
                    && host
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':')));
            if !ok {
                return Err(Error::invalid(
                    format!("server.allowed_hosts[{i}]"),
                    format!(
                        "must be \"*\" or a host name or IP address without scheme or port \
                         (api.example.com, 10.0.0.5), got {host:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_storage(&self) -> Result<()> {
        let s = &self.storage;
        if let Some(url) = s.postgres_url() {
            url.parse::<sqlx::postgres::PgConnectOptions>().map_err(|e| {
                Error::invalid(
                    "storage.database_url",
                    format!("is not a valid PostgreSQL URL ({e}); expected postgres://user:password@host:port/database"),
                )
            })?;
        } else if let Some(url) = &s.database_url {
            sqlite_path(url).map_err(|m| Error::invalid("storage.database_url", m))?;
        }
        if s.path.as_os_str().is_empty() {
            return Err(Error::invalid("storage.path", "must not be empty"));
        }
        if s.read_connections == 0 {
            return Err(Error::invalid(
                "storage.read_connections",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    fn validate_execution(&self) -> Result<()> {
        let e = &self.execution;
        if e.max_concurrent_tasks == 0 || e.max_concurrent_tasks > 100_000 {
            return Err(Error::invalid(
                "execution.max_concurrent_tasks",
                format!(
                    "must be between 1 and 100000, got {}",
                    e.max_concurrent_tasks
                ),
            ));
        }
        if e.lease_duration.0 < std::time::Duration::from_millis(500) {
            return Err(Error::invalid(
                "execution.lease_duration",
                "must be at least 500ms",
            ));
        }
        positive("execution.poll_interval", e.poll_interval)?;
        let probe = crate::model::TaskSpec::new("config-check")
            .with_command("true")
            .with_retry(e.default_retry.clone())
            .with_limits(e.default_limits.clone());
        probe.validate().map_err(|err| match err {
            Error::InvalidInput { field, message } => Error::invalid(
                format!(
                    "execution.{}",
                    field
                        .replace("retry.", "default_retry.")
                        .replace("limits.", "default_limits.")
                ),
                message,
            ),
            other => other,
        })?;
        Ok(())
    }

    fn validate_monitoring(&self) -> Result<()> {
        let m = &self.monitoring;
        if m.log_level.trim().is_empty() {
            return Err(Error::invalid(
                "monitoring.log_level",
                "must not be empty; use e.g. warn, info or task_queue=debug",
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&m.log_level).map_err(|e| {
            Error::invalid(
                "monitoring.log_level",
                format!(
                    "{e} in {:?}; use e.g. warn, info or task_queue=debug,warn",
                    m.log_level
                ),
            )
        })?;
        positive("monitoring.health_stale_after", m.health_stale_after)
    }

    fn validate_vectorizer(&self) -> Result<()> {
        let v = &self.vectorizer;
        if let Some(endpoint) = &v.endpoint {
            http_url("vectorizer.endpoint", endpoint)?;
        }
        let c = &v.collection;
        if c.is_empty()
            || c.len() > 255
            || !c
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
        {
            return Err(Error::invalid(
                "vectorizer.collection",
                format!("must be 1-255 characters of A-Z a-z 0-9 - _ . , got {c:?}"),
            ));
        }
        if let Some(name) = &v.api_key_env {
            let mut chars = name.chars();
            let ok = chars
                .next()
                .is_some_and(|ch| ch.is_ascii_alphabetic() || ch == '_')
                && chars.all(|ch| ch.is_ascii_alphanumeric() || ch == '_');
            if !ok {
                return Err(Error::invalid(
                    "vectorizer.api_key_env",
                    format!(
                        "must be the name of an environment variable (e.g. VECTORIZER_API_KEY), \
                         not the key itself; got {} characters that are not a variable name",
                        name.len()
                    ),
                ));
            }
        }
        if v.batch_size == 0 || v.batch_size > 10_000 {
            return Err(Error::invalid(
                "vectorizer.batch_size",
                format!("must be between 1 and 10000, got {}", v.batch_size),
            ));
        }
        positive("vectorizer.timeout", v.timeout)
    }

    fn validate_search(&self) -> Result<()> {
        let s = &self.search;
        if let Some(url) = &s.openai_url {
            http_url("search.openai_url", url)?;
        }
        match s.embedder {
            Embedder::None => {}
            Embedder::Local => match &s.model_dir {
                None => {
                    return Err(Error::invalid(
                        "search.model_dir",
                        "is required when search.embedder is local: the directory holding the model",
                    ));
                }
                Some(d) if d.as_os_str().is_empty() => {
                    return Err(Error::invalid("search.model_dir", "must not be empty"));
                }
                Some(_) => {}
            },
            Embedder::Openai => {
                if s.openai_url.is_none() {
                    return Err(Error::invalid(
                        "search.openai_url",
                        "is required when search.embedder is openai, e.g. https://api.openai.com/v1",
                    ));
                }
                if s.openai_model
                    .as_deref()
                    .is_none_or(|m| m.trim().is_empty())
                {
                    return Err(Error::invalid(
                        "search.openai_model",
                        "is required when search.embedder is openai, e.g. text-embedding-3-small",
                    ));
                }
            }
        }
        if s.recency_half_life_days == 0 {
            return Err(Error::invalid(
                "search.recency_half_life_days",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Reads the file's text into the document the layers are merged on.
fn parse_text(text: &str) -> Result<Value> {
    if text.trim().is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    match crate::model::parse_document(text)? {
        Value::Null => Ok(Value::Object(serde_json::Map::new())),
        v @ Value::Object(_) => Ok(v),
        _ => Err(Error::invalid(
            "file",
            "expected a mapping of sections (server:, storage:, execution:, ...)",
        )),
    }
}

/// The built-in defaults with `file` merged over them key by key, so a
/// nested mapping that sets one key (`default_retry: {max_attempts: 5}`)
/// keeps the defaults of the others.
fn with_defaults(file: Value) -> Value {
    let mut v = serde_json::to_value(Config::default()).unwrap_or(Value::Null);
    merge(&mut v, file);
    v
}

/// Merges `over` into `base`: mappings key by key, anything else replaces;
/// `null` over a mapping (an empty `section:`) leaves it as it is.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (Value::Object(_), Value::Null) => {}
        (b, o) => *b = o,
    }
}

/// Deserializes the merged document; errors name the key.
fn deserialize(v: Value) -> Result<Config> {
    crate::model::from_value(v).map_err(|err| match err {
        // `from_value` names an unknown key twice (`server.bindd.bindd`).
        Error::InvalidInput { field, message } => {
            let name = message
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next());
            let field = match name {
                Some(n) if field == format!("{n}.{n}") => n.to_string(),
                Some(n) => field
                    .strip_suffix(&format!(".{n}.{n}"))
                    .map(|p| format!("{p}.{n}"))
                    .unwrap_or(field),
                None => field,
            };
            Error::InvalidInput { field, message }
        }
        other => other,
    })
}

/// Names where a bad value came from: `SOURCE: key: message`.
fn from_source(err: Error, source: &str) -> Error {
    match err {
        Error::InvalidInput { field, message } | Error::Unsupported { field, message } => {
            match message.strip_prefix("unknown field `") {
                Some(rest) => {
                    let expected = rest.split_once("`, ").map(|(_, e)| e).unwrap_or("");
                    Error::Config(format!("{source}: unknown key \"{field}\"; {expected}"))
                }
                None => Error::Config(format!("{source}: {field}: {message}")),
            }
        }
        other => other,
    }
}

/// One `TASK_QUEUE_<SECTION>__<KEY>` variable.
#[derive(Debug)]
struct EnvOverride {
    var: String,
    /// Lowercased key path, e.g. `["execution", "default_retry", "max_attempts"]`.
    path: Vec<String>,
    raw: String,
    value: Value,
    /// The error of the parsed value, kept while the raw text is tried.
    first_error: Option<Error>,
}

impl EnvOverride {
    fn dotted(&self) -> String {
        self.path.join(".")
    }

    /// Whether an error about `field` concerns the value this variable set.
    fn covers(&self, field: &str) -> bool {
        let p = self.dotted();
        field
            .strip_prefix(&p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
    }
}

/// The overrides among `env`, parents before children. Variables without
/// `__` (`TASK_QUEUE_DB`, `TASK_QUEUE_LOG`, ...) are not overrides.
fn env_overrides(env: impl Iterator<Item = (String, String)>) -> Result<Vec<EnvOverride>> {
    let sections: BTreeSet<String> = match serde_json::to_value(Config::default()) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => BTreeSet::new(),
    };
    let mut out = Vec::new();
    for (var, raw) in env {
        let Some(rest) = var.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if !rest.contains(ENV_SEPARATOR) {
            continue;
        }
        let path: Vec<String> = rest
            .split(ENV_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::Config(format!(
                "{var}: malformed name; use {ENV_PREFIX}<SECTION>{ENV_SEPARATOR}<KEY>, \
                 e.g. TASK_QUEUE_SERVER__BIND"
            )));
        }
        if !sections.contains(&path[0]) {
            let known: Vec<&str> = sections.iter().map(String::as_str).collect();
            return Err(Error::Config(format!(
                "{var}: unknown section \"{}\"; sections are {}",
                path[0],
                known.join(", ")
            )));
        }
        let value = parse_env_value(&raw);
        out.push(EnvOverride {
            var,
            path,
            raw,
            value,
            first_error: None,
        });
    }
    out.sort_by(|a, b| (a.path.len(), &a.path, &a.var).cmp(&(b.path.len(), &b.path, &b.var)));
    if let Some(w) = out.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(Error::Config(format!(
            "{} and {} both set {}; keep one",
            w[0].var,
            w[1].var,
            w[0].dotted()
        )));
    }
    Ok(out)
}

/// An override's value as a YAML scalar or flow collection: `20`, `true`,
/// `[PATH, HOME]`, `{max_attempts: 5}`; empty = null (unsets an optional
/// key); anything that is not valid YAML is taken as the text itself.
fn parse_env_value(raw: &str) -> Value {
    let t = raw.trim();
    if t.is_empty() {
        return Value::Null;
    }
    match serde_norway::from_str::<Value>(raw) {
        Ok(Value::Object(_)) if !t.starts_with('{') => Value::String(raw.to_string()),
        Ok(v) => v,
        Err(_) => Value::String(raw.to_string()),
    }
}

/// Merges `value` in at `path`, creating (or replacing non-mapping) parents.
fn set_path(root: &mut Value, path: &[String], value: Value) {
    let mut cur = root;
    for key in path {
        if !cur.is_object() {
            *cur = Value::Object(serde_json::Map::new());
        }
        let Value::Object(map) = cur else {
            unreachable!("made a mapping above")
        };
        cur = map.entry(key.clone()).or_insert(Value::Null);
    }
    merge(cur, value);
}

/// The file a `sqlite:` URL names, or why the URL is not accepted.
fn sqlite_path(url: &str) -> std::result::Result<PathBuf, String> {
    let lower = url.to_ascii_lowercase();
    if lower.starts_with("postgres://") || lower.starts_with("postgresql://") {
        return Err("names a PostgreSQL database, not a SQLite file".to_string());
    }
    let Some(rest) = url.strip_prefix("sqlite:") else {
        let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or(url);
        return Err(format!(
            "unsupported database URL scheme {scheme:?}; use sqlite:PATH, postgres://..., or storage.path"
        ));
    };
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let rest = rest.split('?').next().unwrap_or_default();
    if rest.is_empty() {
        return Err("names no file; use sqlite:PATH or sqlite:///absolute/path".to_string());
    }
    if rest == ":memory:" {
        return Err("an in-memory database is not supported; give a file".to_string());
    }
    Ok(PathBuf::from(rest))
}

fn positive(field: &str, d: Dur) -> Result<()> {
    if d.0.is_zero() {
        return Err(Error::invalid(field, "must be positive"));
    }
    Ok(())
}

fn http_url(field: &str, s: &str) -> Result<()> {
    match reqwest::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
        Ok(u) => Err(Error::invalid(
            field,
            format!(
                "must be an http:// or https:// URL, got {:?} (scheme {:?})",
                s,
                u.scheme()
            ),
        )),
        Err(e) => Err(Error::invalid(
            field,
            format!("must be an http:// or https:// URL, got {s:?} ({e})"),
        )),
    }
}

fn is_origin(s: &str) -> bool {
    match reqwest::Url::parse(s) {
        Ok(u) => {
            matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.username().is_empty()
                && u.path() == "/"
                && u.query().is_none()
                && u.fragment().is_none()
                && !s.ends_with('/')
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn from_env(vars: &[(&str, &str)]) -> Result<Config> {
        Config::load_layered(None, env(vars))
    }

    fn temp_file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.execution.max_concurrent_tasks, 10);
        assert_eq!(c.storage.durability, Durability::Durable);
        assert_eq!(c.server.bind, "127.0.0.1:16080".parse().unwrap());
        assert_eq!(c.server.max_body_bytes, ByteSize(16 << 20));
        assert!(!c.auth.enabled);
        assert!(c.monitoring.metrics);
        assert_eq!(c.monitoring.log_level, "warn");
        assert_eq!(c.vectorizer.endpoint, None);
        assert_eq!(c.search.embedder, Embedder::None);
        let no_file = Config::load_layered(None, std::iter::empty()).unwrap();
        assert_eq!(
            serde_json::to_value(&no_file).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
    }

    #[test]
    fn the_example_config_is_valid_and_matches_the_defaults() {
        let c = Config::from_yaml(include_str!("../config.example.yml")).unwrap();
        let d = Config::default();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap()
        );
    }

    #[test]
    fn the_example_config_lists_every_key() {
        fn leaves(v: &Value, prefix: &str, out: &mut Vec<(String, bool)>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        let p = if prefix.is_empty() {
                            k.clone()
                        } else {
                            format!("{prefix}.{k}")
                        };
                        leaves(v, &p, out);
                    }
                }
                other => out.push((prefix.to_string(), other.is_null())),
            }
        }
        let text = include_str!("../config.example.yml");
        let example = crate::model::parse_document(text).unwrap();
        let mut keys = Vec::new();
        leaves(
            &serde_json::to_value(Config::default()).unwrap(),
            "",
            &mut keys,
        );
        for (path, optional) in keys {
            let found = path
                .split('.')
                .try_fold(&example, |v, k| v.get(k))
                .is_some();
            let last = path.rsplit('.').next().unwrap();
            if optional {
                // Unset by default: shown commented out.
                assert!(
                    text.contains(&format!("# {last}: ")),
                    "{path} is not shown in config.example.yml"
                );
            } else {
                assert!(found, "{path} is missing from config.example.yml");
            }
        }
    }

    #[test]
    fn nested_mappings_merge_over_the_defaults() {
        let c = Config::from_yaml(
            "server:
execution:
  default_retry: {max_attempts: 5}
  \
             default_limits: {cpu_seconds: 60}
",
        )
        .unwrap();
        assert_eq!(
            c.server.bind.port(),
            16080,
            "an empty section is the default"
        );
        assert_eq!(c.execution.default_retry.max_attempts, Some(5));
        assert_eq!(c.execution.default_retry.jitter, Some(0.2));
        assert_eq!(c.execution.default_limits.cpu_seconds, Some(60));
        assert_eq!(
            c.execution.default_limits.max_output_bytes,
            Some(ByteSize(10 << 20))
        );
        let c = Config::from_yaml(
            "execution:
  default_limits: {max_output_bytes: null}
",
        )
        .unwrap();
        assert_eq!(
            c.execution.default_limits.max_output_bytes, None,
            "null unsets"
        );
        let c = from_env(&[(
            "TASK_QUEUE_EXECUTION__DEFAULT_RETRY",
            "{max_attempts: 4, max_delay: 1m}",
        )])
        .unwrap();
        assert_eq!(c.execution.default_retry.max_attempts, Some(4));
        assert_eq!(
            c.execution.default_retry.max_delay,
            Some(Dur::from_secs(60))
        );
        assert_eq!(
            c.execution.default_retry.initial_delay,
            Some(Dur::from_secs(1))
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_yaml("execution:\n  max_concurent_tasks: 4\n").unwrap_err();
        assert!(err.to_string().contains("max_concurent_tasks"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::from_yaml("storage:\n  durability: sometimes\n").unwrap_err();
        assert!(err.to_string().contains("storage.durability"), "{err}");
        let err =
            Config::from_yaml("execution:\n  default_retry: {max_attempts: 0}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("execution.default_retry.max_attempts"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_a_scalar() {
        let c = from_env(&[
            ("TASK_QUEUE_SERVER__BIND", "0.0.0.0:8080"),
            ("TASK_QUEUE_EXECUTION__MAX_CONCURRENT_TASKS", "20"),
            ("TASK_QUEUE_STORAGE__DURABILITY", "fast"),
            ("TASK_QUEUE_SERVER__MAX_BODY_BYTES", "1MiB"),
            ("TASK_QUEUE_EXECUTION__KILL_GRACE", "2s"),
            ("TASK_QUEUE_VECTORIZER__ENDPOINT", "http://localhost:15002"),
        ])
        .unwrap();
        assert_eq!(c.server.bind, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(c.execution.max_concurrent_tasks, 20);
        assert_eq!(c.storage.durability, Durability::Fast);
        assert_eq!(c.server.max_body_bytes, ByteSize(1 << 20));
        assert_eq!(c.execution.kill_grace, Dur::from_secs(2));
        assert_eq!(
            c.vectorizer.endpoint.as_deref(),
            Some("http://localhost:15002")
        );
    }

    #[test]
    fn env_overrides_a_nested_key() {
        let c = from_env(&[("TASK_QUEUE_EXECUTION__DEFAULT_RETRY__MAX_ATTEMPTS", "5")]).unwrap();
        assert_eq!(c.execution.default_retry.max_attempts, Some(5));
        // The rest of the section keeps its defaults.
        assert_eq!(c.execution.default_retry.jitter, Some(0.2));
        let c =
            from_env(&[("TASK_QUEUE_EXECUTION__DEFAULT_LIMITS__MEMORY_BYTES", "4GiB")]).unwrap();
        assert_eq!(
            c.execution.default_limits.memory_bytes,
            Some(ByteSize(4 << 30))
        );
        let err = from_env(&[("TASK_QUEUE_EXECUTION__DEFAULT_RETRY__MAX_ATTEMPTS", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_EXECUTION__DEFAULT_RETRY__MAX_ATTEMPTS")
                && err.contains("execution.default_retry.max_attempts"),
            "{err}"
        );
    }

    #[test]
    fn env_overrides_a_list_and_a_bool() {
        let c = from_env(&[
            (
                "TASK_QUEUE_EXECUTION__ENV_ALLOWLIST",
                "[PATH, HOME, CARGO_HOME]",
            ),
            (
                "TASK_QUEUE_SERVER__CORS_ORIGINS",
                "[https://a.example.com, http://localhost:3000]",
            ),
            ("TASK_QUEUE_MONITORING__METRICS", "false"),
            ("TASK_QUEUE_AUTH__ENABLED", "true"),
            ("TASK_QUEUE_SERVER__ALLOWED_HOSTS", "[queue.example.com]"),
        ])
        .unwrap();
        assert_eq!(c.server.allowed_hosts, ["queue.example.com"]);
        assert_eq!(c.execution.env_allowlist, ["PATH", "HOME", "CARGO_HOME"]);
        assert_eq!(
            c.server.cors_origins,
            ["https://a.example.com", "http://localhost:3000"]
        );
        assert!(!c.monitoring.metrics);
        assert!(c.auth.enabled);
        let c = from_env(&[("TASK_QUEUE_EXECUTION__ENV_ALLOWLIST", "[]")]).unwrap();
        assert!(c.execution.env_allowlist.is_empty());
    }

    #[test]
    fn env_values_that_are_not_plain_yaml_are_taken_as_text() {
        let c = from_env(&[
            ("TASK_QUEUE_SERVER__BIND", "[::]:8080"),
            ("TASK_QUEUE_MONITORING__LOG_LEVEL", "task_queue=debug,warn"),
            ("TASK_QUEUE_STORAGE__PATH", "/data/a b#c.db"),
        ])
        .unwrap();
        assert_eq!(c.server.bind, "[::]:8080".parse().unwrap());
        assert_eq!(c.monitoring.log_level, "task_queue=debug,warn");
        assert_eq!(c.storage.path, PathBuf::from("/data/a b#c.db"));
    }

    #[test]
    fn two_variables_for_one_key_are_refused() {
        let err = from_env(&[
            ("TASK_QUEUE_SERVER__BIND", "127.0.0.1:1"),
            ("TASK_QUEUE_server__bind", "127.0.0.1:2"),
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("both set server.bind"), "{err}");
    }

    #[test]
    fn env_text_that_looks_like_a_number_is_kept_for_string_keys() {
        let c = from_env(&[
            ("TASK_QUEUE_VECTORIZER__COLLECTION", "2024"),
            ("TASK_QUEUE_SEARCH__OPENAI_MODEL", "1.5"),
        ])
        .unwrap();
        assert_eq!(c.vectorizer.collection, "2024");
        assert_eq!(c.search.openai_model.as_deref(), Some("1.5"));
    }

    #[test]
    fn empty_env_value_unsets_an_optional_key() {
        let (_dir, path) = temp_file("vectorizer:\n  endpoint: http://localhost:15002\n");
        let c = Config::load_layered(Some(&path), env(&[("TASK_QUEUE_VECTORIZER__ENDPOINT", "")]))
            .unwrap();
        assert_eq!(c.vectorizer.endpoint, None);
    }

    #[test]
    fn non_override_variables_are_ignored() {
        let c = from_env(&[
            ("TASK_QUEUE_DB", "/tmp/x.db"),
            ("TASK_QUEUE_CONFIG", "/nonexistent.yml"),
            ("TASK_QUEUE_LOG", "debug"),
            ("TASK_QUEUE_TOKEN", "secret"),
            ("TASK_QUEUE_BIND", "0.0.0.0:1"),
            ("TASK_QUEUE_SERVER", "http://localhost:16080"),
            ("HOME", "/root"),
            ("OTHER__THING", "1"),
        ])
        .unwrap();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(Config::default()).unwrap()
        );
    }

    #[test]
    fn unknown_env_section_or_key_names_the_variable() {
        let err = from_env(&[("TASK_QUEUE_SERVR__BIND", "0.0.0.0:1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_SERVR__BIND: unknown section \"servr\""),
            "{err}"
        );
        let err = from_env(&[("TASK_QUEUE_SERVER__BINDD", "0.0.0.0:1")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_SERVER__BINDD: unknown key \"server.bindd\""),
            "{err}"
        );
        assert!(err.contains("`bind`"), "lists the known keys: {err}");
        let err = from_env(&[("TASK_QUEUE_EXECUTION__DEFAULT_RETRY__TRIES", "2")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_EXECUTION__DEFAULT_RETRY__TRIES")
                && err.contains("execution.default_retry.tries"),
            "{err}"
        );
        let err = from_env(&[("TASK_QUEUE_SERVER__", "x")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("TASK_QUEUE_SERVER__: malformed"), "{err}");
    }

    #[test]
    fn bad_env_values_name_the_key_and_the_variable() {
        let err = from_env(&[("TASK_QUEUE_SERVER__BIND", "nope")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_SERVER__BIND") && err.contains("server.bind"),
            "{err}"
        );
        let err = from_env(&[("TASK_QUEUE_EXECUTION__MAX_CONCURRENT_TASKS", "many")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("execution.max_concurrent_tasks"), "{err}");
        let err = from_env(&[("TASK_QUEUE_EXECUTION__MAX_CONCURRENT_TASKS", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("TASK_QUEUE_EXECUTION__MAX_CONCURRENT_TASKS")
                && err.contains("between 1 and 100000"),
            "{err}"
        );
        let err = from_env(&[("TASK_QUEUE_MONITORING__METRICS", "maybe")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("monitoring.metrics"), "{err}");
    }

    #[test]
    fn env_wins_over_the_file_and_flags_win_over_both() {
        let (_dir, path) = temp_file(
            "server:\n  bind: 127.0.0.1:9000\n  request_timeout: 5s\n\
             storage:\n  path: /from/file.db\n\
             execution:\n  max_concurrent_tasks: 3\n",
        );
        let c = Config::load_layered(
            Some(&path),
            env(&[
                ("TASK_QUEUE_SERVER__BIND", "127.0.0.1:9001"),
                ("TASK_QUEUE_STORAGE__PATH", "/from/env.db"),
            ]),
        )
        .unwrap();
        assert_eq!(c.server.bind.port(), 9001, "env wins over the file");
        assert_eq!(c.server.request_timeout, Dur::from_secs(5), "file kept");
        assert_eq!(c.execution.max_concurrent_tasks, 3, "file kept");
        assert_eq!(c.storage.path, PathBuf::from("/from/env.db"));

        let flags = Overrides {
            db: Some(PathBuf::from("/from/flag.db")),
            log_level: Some("info".into()),
        };
        let c = Config::load_with(
            Some(&path),
            env(&[
                ("TASK_QUEUE_STORAGE__PATH", "/from/env.db"),
                ("TASK_QUEUE_MONITORING__LOG_LEVEL", "debug"),
            ]),
            &flags,
        )
        .unwrap();
        assert_eq!(c.storage.path, PathBuf::from("/from/flag.db"));
        assert_eq!(c.monitoring.log_level, "info");
    }

    #[test]
    fn file_errors_name_the_file_and_env_errors_the_variable() {
        let (_dir, path) = temp_file("server:\n  bind: nope\n");
        let err = Config::load_layered(Some(&path), std::iter::empty())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("server.bind"),
            "{err}"
        );
        // A good env value replaces the file's bad one.
        let c = Config::load_layered(
            Some(&path),
            env(&[("TASK_QUEUE_SERVER__BIND", "127.0.0.1:1")]),
        )
        .unwrap();
        assert_eq!(c.server.bind.port(), 1);
        let (_dir, path) = temp_file("- just\n- a list\n");
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(err.contains("mapping of sections"), "{err}");
    }

    #[test]
    fn postgres_urls_select_postgres() {
        let c = Config::from_yaml("storage:\n  database_url: postgres://u@db/tq\n").unwrap();
        assert_eq!(c.storage.postgres_url(), Some("postgres://u@db/tq"));
        let c = from_env(&[("TASK_QUEUE_STORAGE__DATABASE_URL", "postgresql://u@db/tq")]).unwrap();
        assert_eq!(c.storage.postgres_url(), Some("postgresql://u@db/tq"));
        let flags = Overrides {
            db: Some(PathBuf::from("postgres://u@db:5433/tq")),
            log_level: None,
        };
        let c = Config::load_with(None, std::iter::empty(), &flags).unwrap();
        assert_eq!(c.storage.postgres_url(), Some("postgres://u@db:5433/tq"));
        let err = Config::load_with(
            None,
            std::iter::empty(),
            &Overrides {
                db: Some(PathBuf::from("postgres://u@db:notaport/tq")),
                log_level: None,
            },
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("--db") && err.contains("not a valid PostgreSQL URL"),
            "{err}"
        );
        let err = Config::from_yaml("storage:\n  database_url: mysql://db/tq\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unsupported database URL scheme"), "{err}");
        let c = Config::from_yaml("storage:\n  path: ./x.db\n").unwrap();
        assert_eq!(c.storage.postgres_url(), None);
    }

    #[test]
    fn sqlite_urls_set_the_path() {
        let c = Config::from_yaml("storage:\n  database_url: sqlite:///var/lib/tq.db\n").unwrap();
        assert_eq!(c.storage.path, PathBuf::from("/var/lib/tq.db"));
        let flags = Overrides {
            db: Some(PathBuf::from("sqlite://./x.db?mode=rwc")),
            log_level: None,
        };
        let c = Config::load_with(None, std::iter::empty(), &flags).unwrap();
        assert_eq!(c.storage.path, PathBuf::from("./x.db"));
        // A plain --db path wins over a URL from the file.
        let (_dir, path) = temp_file("storage:\n  database_url: postgres://db/tq\n");
        let flags = Overrides {
            db: Some(PathBuf::from("/tmp/plain.db")),
            log_level: None,
        };
        let c = Config::load_with(Some(&path), std::iter::empty(), &flags).unwrap();
        assert_eq!(c.storage.path, PathBuf::from("/tmp/plain.db"));
        assert_eq!(c.storage.database_url, None);
    }

    #[test]
    fn new_sections_are_validated_by_key() {
        let cases = [
            ("vectorizer:\n  endpoint: ftp://x\n", "vectorizer.endpoint"),
            (
                "vectorizer:\n  endpoint: localhost:15002\n",
                "vectorizer.endpoint",
            ),
            ("vectorizer:\n  batch_size: 0\n", "vectorizer.batch_size"),
            (
                "vectorizer:\n  collection: 'a b'\n",
                "vectorizer.collection",
            ),
            (
                "vectorizer:\n  api_key_env: sk-123\n",
                "vectorizer.api_key_env",
            ),
            ("search:\n  embedder: local\n", "search.model_dir"),
            ("search:\n  embedder: openai\n", "search.openai_url"),
            (
                "search:\n  embedder: openai\n  openai_url: https://api.openai.com/v1\n",
                "search.openai_model",
            ),
            ("search:\n  embedder: remote\n", "search.embedder"),
            (
                "search:\n  recency_half_life_days: 0\n",
                "search.recency_half_life_days",
            ),
            ("server:\n  max_body_bytes: 10\n", "server.max_body_bytes"),
            ("server:\n  request_timeout: 0s\n", "server.request_timeout"),
            (
                "server:\n  cors_origins: [https://a.com/path]\n",
                "server.cors_origins[0]",
            ),
            ("monitoring:\n  log_format: xml\n", "monitoring.log_format"),
            (
                "monitoring:\n  log_level: 'task_queue=loud'\n",
                "monitoring.log_level",
            ),
            (
                "monitoring:\n  health_stale_after: 0s\n",
                "monitoring.health_stale_after",
            ),
            ("auth:\n  tokens_file: x\n", "tokens_file"),
        ];
        for (yaml, key) in cases {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml:?} should name {key}: {err}");
        }
        let ok = Config::from_yaml(
            "search:\n  embedder: local\n  model_dir: /models/minilm\n\
             monitoring:\n  log_format: json\n  log_level: task_queue=debug,warn\n\
             server:\n  cors_origins: ['*', 'http://localhost:5173']\n",
        )
        .unwrap();
        assert_eq!(ok.monitoring.log_format, LogFormat::Json);
    }

    #[test]
    fn exposure_check_needs_auth_or_insecure_off_loopback() {
        let mut c = Config::default();
        c.check_exposure(false).unwrap();
        c.server.bind = "0.0.0.0:16080".parse().unwrap();
        let err = c.check_exposure(false).unwrap_err().to_string();
        assert!(
            err.contains("server.bind") && err.contains("server.insecure"),
            "{err}"
        );
        c.check_exposure(true).unwrap();
        c.auth.enabled = true;
        c.check_exposure(false).unwrap();
        c.auth.enabled = false;
        c.server.insecure = true;
        c.check_exposure(false).unwrap();
        c.server.bind = "[::1]:16080".parse().unwrap();
        c.server.insecure = false;
        c.check_exposure(false).unwrap();
    }
}
