//! The `task-queue` command line. Every command goes through [`TaskQueue`].

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::model::{Submission, TaskRecord, TaskStatus, parse_task_file};
use crate::service::{ListOptions, TaskQueue};

/// An MCP-first task orchestration server: durable queue, retries, timeouts, audit trail.
#[derive(Debug, Parser)]
#[command(name = "task-queue", version, about)]
pub struct Cli {
    /// SQLite database file (default: ./data/task-queue.db, or storage.path from --config), or a postgres://user:password@host:port/db URL to share one queue between nodes.
    #[arg(long, global = true, env = "TASK_QUEUE_DB")]
    pub db: Option<PathBuf>,
    /// Configuration file (YAML).
    #[arg(long, global = true, env = "TASK_QUEUE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter for stderr, e.g. `info`, `task_queue=debug`.
    #[arg(long, global = true, env = "TASK_QUEUE_LOG", default_value = "warn")]
    pub log_level: String,
    /// Log line format on stderr: text or json (one JSON object per line).
    #[arg(
        long,
        global = true,
        env = "TASK_QUEUE_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormatArg,
    /// Talk to a running `task-queue serve` at this URL instead of opening
    /// the database (submit, status, logs, cancel, approve, search,
    /// recommend, workflow show|graph|cancel). The API token is read from
    /// TASK_QUEUE_TOKEN. Without it, those commands use TASK_QUEUE_SERVER
    /// if it is set; the other commands ignore that variable.
    #[arg(long, global = true, value_name = "URL")]
    pub server: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormatArg {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Submit a task or workflow file and run it here until every task
    /// finishes; exit 0 only if none failed (skipped-by-design is fine).
    Run {
        /// YAML or JSON file: `{tasks: [...]}` or a workflow `{name, tasks: [...]}`.
        file: PathBuf,
        /// Print one JSON summary at the end instead of progress lines.
        #[arg(long)]
        json: bool,
    },
    /// Submit a task or workflow file for a worker to run; prints the new ids as JSON.
    Submit { file: PathBuf },
    /// Check a task or workflow file without submitting it; prints its graph.
    Check {
        file: PathBuf,
        /// Graph format: mermaid or dot.
        #[arg(long, default_value = "mermaid")]
        format: String,
    },
    /// Approve a task waiting in awaiting_approval, or reject it with --reject.
    Approve {
        id: String,
        /// Reject instead: the task fails and its `failure` dependents run.
        #[arg(long)]
        reject: bool,
        #[arg(long)]
        comment: Option<String>,
        /// Who decides (recorded in the audit trail).
        #[arg(long, env = "USER")]
        by: Option<String>,
    },
    /// Workflow commands.
    Workflow {
        #[command(subcommand)]
        command: WorkflowCommand,
    },
    /// Recurring schedule commands.
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Run the engine: claim and execute tasks until stopped. SIGINT or
    /// SIGTERM lets running tasks finish for up to 30 s; a second one stops
    /// them at once (they go back to the queue).
    Worker {
        /// Exit when no task is left that this worker could run now (tasks
        /// waiting for a later `schedule.at` or a schedule's next run are
        /// left for a later worker; retries in their backoff are waited for).
        #[arg(long)]
        until_idle: bool,
        /// Override execution.max_concurrent_tasks.
        #[arg(long)]
        concurrency: Option<usize>,
    },
    /// Show one task (with its attempts) or list recent tasks.
    Status {
        id: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Only tasks in this status (repeatable).
        #[arg(long = "status")]
        statuses: Vec<TaskStatus>,
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The next page of a listing: the `next_cursor` of the previous one.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a task; a running task's processes are stopped.
    Cancel { id: String },
    /// Show the captured output of a task.
    Logs {
        id: String,
        #[arg(long)]
        attempt: Option<u32>,
    },
    /// Audit trail commands.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Serve MCP over stdio (for Claude Desktop, Claude Code, Cursor), with
    /// the engine running in this process. Logs go to stderr.
    Mcp,
    /// Serve over HTTP: MCP (streamable HTTP at /mcp, legacy SSE at /sse),
    /// with the engine running in this process.
    Serve {
        /// Address to listen on (default: server.bind, 127.0.0.1:16080).
        #[arg(long, env = "TASK_QUEUE_BIND")]
        bind: Option<std::net::SocketAddr>,
        /// Allow a non-loopback address without auth. Anyone who can reach
        /// the port can then run commands as this user.
        #[arg(long)]
        insecure: bool,
        /// Serve the APIs only and run no tasks here; `task-queue worker`
        /// processes on the same database run them.
        #[arg(long)]
        no_engine: bool,
    },
    /// Print the MCP `tools/list` payload (the content of tools.schema).
    ToolsSchema,
    /// API tokens of the HTTP server.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Measure throughput and latency; prints one JSON object with --json.
    Bench(crate::bench::BenchArgs),
    /// Search the history of past tasks ("ship the backend", "ploy").
    Search {
        query: String,
        #[arg(long)]
        project: Option<String>,
        /// Only runs that ended so: succeeded, failed, timed_out, cancelled (repeatable).
        #[arg(long)]
        status: Vec<TaskStatus>,
        /// Only tasks with this tag (repeatable; all must match).
        #[arg(long)]
        tag: Vec<String>,
        /// Most hits, 1..=50.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Advice from similar past tasks (JSON): success rate, durations,
    /// timeout, retry policy, usual neighbours, failures and artifacts.
    Recommend {
        #[arg(long)]
        name: Option<String>,
        #[arg(long)]
        command: Option<String>,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        project: Option<String>,
    },
    /// Run the labelled search evaluation (eval/) in a scratch database and
    /// print MRR@10 and Recall@5 per split and tag.
    EvalSearch {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once (only its hash is stored). Once a
    /// token exists, every HTTP request needs one.
    Create {
        #[arg(long, value_enum)]
        role: crate::store::Role,
        #[arg(long, default_value = "token")]
        name: String,
    },
    /// List tokens (without secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum WorkflowCommand {
    /// List recent workflows.
    List {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show a workflow with its tasks.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Print a workflow's graph, nodes styled by status.
    Graph {
        id: String,
        /// mermaid or dot.
        #[arg(long, default_value = "mermaid")]
        format: String,
    },
    /// Cancel every unfinished task of a workflow.
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// List schedules as JSON.
    List,
    /// Stop a schedule firing (its upcoming run is cancelled).
    Pause { id: String },
    /// Start a paused schedule again.
    Resume { id: String },
    /// Delete a schedule (its upcoming run is cancelled).
    Remove { id: String },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Walk the hash chain; exit 1 and name the first broken link if a row was altered.
    Verify,
    /// Print the audit events of a task as JSON lines.
    Show {
        id: Option<String>,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
}

/// Global options shared by commands that open a queue.
#[derive(Debug, Clone, Args)]
pub struct Opened;

/// Sets up logging to stderr (stdout is for results).
pub fn init_tracing(cli: &Cli) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file or a pipe gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match cli.log_format {
        LogFormatArg::Text => builder.try_init(),
        LogFormatArg::Json => builder.json().try_init(),
    };
}

/// Builds the configuration: defaults, then `--config` (if any), then
/// `TASK_QUEUE_<SECTION>__<KEY>` variables, then `--db` and `--log-level`.
pub fn load_config(cli: &Cli) -> Result<Config> {
    // `--log-level` always has a value; only one other than the built-in
    // default overrides `monitoring.log_level`.
    let default_level = crate::config::MonitoringConfig::default().log_level;
    let flags = crate::config::Overrides {
        db: cli.db.clone(),
        log_level: (cli.log_level != default_level).then(|| cli.log_level.clone()),
    };
    // Variables whose name or value is not UTF-8 cannot be overrides; a
    // non-UTF-8 value is passed on lossily so its error names the variable.
    let env = std::env::vars_os().filter_map(|(k, v)| {
        let k = k.into_string().ok()?;
        Some((k, v.to_string_lossy().into_owned()))
    });
    Config::load_with(cli.config.as_deref(), env, &flags)
}

/// Runs a parsed command line; returns the process exit code.
pub async fn main(cli: Cli) -> ExitCode {
    match dispatch(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                Error::InvalidInput { .. } | Error::Unsupported { .. } | Error::Config(_) => {
                    ExitCode::from(2)
                }
                _ => ExitCode::from(1),
            }
        }
    }
}

impl Cli {
    /// Whether this command should die quietly when its output is closed
    /// early (`task-queue status | head`), as command-line tools do, instead
    /// of failing on the write. Not for the commands that run the engine
    /// or serve clients: there a closed pipe or socket is an error to
    /// handle, not a reason to stop.
    pub fn default_sigpipe(&self) -> bool {
        !matches!(
            self.command,
            Command::Run { .. }
                | Command::Worker { .. }
                | Command::Mcp
                | Command::Serve { .. }
                | Command::Bench(_)
        )
    }
}

/// Writes one line of a command's output (see `outln!`): a closed pipe
/// ends the output quietly; any other failure is reported on stderr.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n"))
        && e.kind() != std::io::ErrorKind::BrokenPipe
    {
        eprintln!("error: cannot write the output: {e}");
    }
}

/// The environment variable the client commands take the server's URL from.
pub const SERVER_ENV: &str = "TASK_QUEUE_SERVER";

/// Commands that only read or change what an existing queue holds.
fn reads_existing(c: &Command) -> bool {
    match c {
        Command::Status { .. }
        | Command::Logs { .. }
        | Command::Cancel { .. }
        | Command::Approve { .. }
        | Command::Audit { .. }
        | Command::Search { .. }
        | Command::Recommend { .. }
        | Command::Workflow { .. }
        | Command::Schedule { .. } => true,
        Command::Token { command } => !matches!(command, TokenCommand::Create { .. }),
        _ => false,
    }
}

/// Commands that can talk to a running server instead of the database.
fn runs_remotely(c: &Command) -> bool {
    match c {
        Command::Submit { .. }
        | Command::Status { .. }
        | Command::Logs { .. }
        | Command::Cancel { .. }
        | Command::Approve { .. }
        | Command::Search { .. }
        | Command::Recommend { .. } => true,
        Command::Workflow { command } => !matches!(command, WorkflowCommand::List { .. }),
        _ => false,
    }
}

async fn dispatch(mut cli: Cli) -> Result<ExitCode> {
    // `--server` on a command that cannot use it is an error (below);
    // the variable only applies to the commands that can.
    if cli.server.is_none() && runs_remotely(&cli.command) {
        cli.server = std::env::var(SERVER_ENV).ok().filter(|s| !s.is_empty());
    }
    if let Some(server) = cli.server.as_deref() {
        let token = std::env::var(crate::client::TOKEN_ENV).unwrap_or_default();
        let client = crate::client::Client::new(server)?.with_token(token);
        return remote(&client, cli.command).await;
    }
    let mut config = load_config(&cli)?;
    // A command about what a queue holds does not create an empty one where
    // a mistyped `--db` points (with its directories).
    if reads_existing(&cli.command)
        && config.storage.postgres_url().is_none()
        && !config.storage.path.exists()
    {
        return Err(Error::invalid(
            "--db",
            format!(
                "no database at {}; run, submit, worker and serve create one",
                config.storage.path.display()
            ),
        ));
    }
    match cli.command {
        Command::Bench(args) => crate::bench::run(args, config).await,
        Command::Search {
            query,
            project,
            status,
            tag,
            limit,
            json,
        } => {
            let queue = TaskQueue::open_with(config).await?;
            let r = queue
                .search(crate::search::SearchRequest {
                    query,
                    project,
                    statuses: status,
                    tags: tag,
                    limit,
                    ..Default::default()
                })
                .await?;
            print_search(&r, json);
            Ok(ExitCode::SUCCESS)
        }
        Command::Recommend {
            name,
            command,
            description,
            project,
        } => {
            let queue = TaskQueue::open_with(config).await?;
            let r = queue
                .recommend(crate::search::recommend::RecommendRequest {
                    name,
                    command,
                    description,
                    project,
                })
                .await?;
            print_json(&serde_json::to_value(&r).unwrap_or_default());
            Ok(ExitCode::SUCCESS)
        }
        Command::EvalSearch { json } => {
            let dir =
                std::env::temp_dir().join(format!("task-queue-eval-{}", uuid::Uuid::now_v7()));
            let mut c = config.clone();
            c.storage.path = dir.join("eval.db");
            c.storage.durability = crate::config::Durability::Fast;
            let c_has_embedder = c.search.embedder != crate::config::Embedder::None;
            let queue = TaskQueue::open_with(c).await?;
            let now = crate::model::Timestamp::now().0;
            let n = crate::search::eval::load_corpus(&queue, now).await?;
            if c_has_embedder {
                // Embed every record before the queries, as the background
                // backfill would in time.
                let started = std::time::Instant::now();
                let embedded = queue.backfill_vectors(64).await?;
                eprintln!(
                    "embedded {embedded} records in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            let report = crate::search::eval::evaluate(&queue, n).await?;
            let _ = std::fs::remove_dir_all(&dir);
            if json {
                print_json(&serde_json::to_value(&report).unwrap_or_default());
            } else {
                print!("{}", report.table());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { file, json } => {
            let sub = read_tasks(&file)?;
            let queue = TaskQueue::open_with(config).await?;
            run_file(&queue, &file, sub, json).await
        }
        Command::Submit { file } => {
            let sub = read_tasks(&file)?;
            let queue = TaskQueue::open_with(config).await?;
            let (workflow, tasks) = queue
                .submit_file(sub)
                .await
                .map_err(|e| in_file(&file, e))?;
            match workflow {
                Some(w) => print_json(&serde_json::to_value(&w).unwrap_or_default()),
                None => print_json(&json!({ "tasks": tasks })),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { file, format } => {
            let sub = read_tasks(&file)?;
            let text = crate::workflow::check_and_render(&sub, &format).map_err(|e| match e {
                // A bad --format is not about the file.
                Error::InvalidInput { ref field, .. } if field == "format" => e,
                e => in_file(&file, e),
            })?;
            outln!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Approve {
            id,
            reject,
            comment,
            by,
        } => {
            let queue = TaskQueue::open_with(config).await?;
            let t = queue.approve(&id, !reject, comment, by).await?;
            print_json(&summary(&t));
            Ok(ExitCode::SUCCESS)
        }
        Command::Mcp => {
            let queue = TaskQueue::open_with(config).await?;
            mcp_stdio(&queue).await
        }
        Command::Serve {
            bind,
            insecure,
            no_engine,
        } => {
            if let Some(b) = bind {
                config.server.bind = b;
            }
            config.server.insecure |= insecure;
            let bind = config.server.bind;
            let grace = config.server.shutdown_grace.0;
            let queue = TaskQueue::open_with(config).await?;
            let tokens = queue.tokens_exist().await?;
            queue.config().check_exposure(tokens)?;
            let config = queue.config();
            if !config.server.bind.ip().is_loopback() && !tokens && !config.auth.enabled {
                tracing::warn!(bind = %config.server.bind, "SERVING WITHOUT AUTH ON A NON-LOOPBACK ADDRESS (--insecure): anyone who can reach it can run commands as this user");
                eprintln!(
                    "warning: serving without auth on {} (--insecure)",
                    config.server.bind
                );
            }
            crate::server::serve(queue, bind, grace, !no_engine, async {
                let mut term = match signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { command } => {
            let queue = TaskQueue::open_with(config).await?;
            match command {
                TokenCommand::Create { role, name } => {
                    let (t, secret) = queue.create_token(&name, role).await?;
                    print_json(
                        &json!({"id": t.id, "name": t.name, "role": t.role, "token": secret}),
                    );
                    eprintln!("store the token now: it is not shown again");
                }
                TokenCommand::List => print_json(&json!({"tokens": queue.list_tokens().await?})),
                TokenCommand::Revoke { id } => {
                    queue.revoke_token(&id).await?;
                    print_json(&json!({"revoked": crate::service::canonical_id(&id)}));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::ToolsSchema => {
            outln!(
                "{}",
                serde_json::to_string_pretty(&crate::mcp::McpServer::tools_list())
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Workflow { command } => {
            let queue = TaskQueue::open_with(config).await?;
            workflow_command(&queue, command).await
        }
        Command::Schedule { command } => {
            let queue = TaskQueue::open_with(config).await?;
            match command {
                ScheduleCommand::List => {
                    print_json(&json!({ "schedules": queue.list_schedules().await? }))
                }
                ScheduleCommand::Pause { id } => print_json(
                    &serde_json::to_value(queue.pause_schedule(&id).await?).unwrap_or_default(),
                ),
                ScheduleCommand::Resume { id } => print_json(
                    &serde_json::to_value(queue.resume_schedule(&id).await?).unwrap_or_default(),
                ),
                ScheduleCommand::Remove { id } => {
                    queue.remove_schedule(&id).await?;
                    print_json(&json!({ "removed": crate::service::canonical_id(&id) }));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Worker {
            until_idle,
            concurrency,
        } => {
            if let Some(c) = concurrency {
                if !(1..=100_000).contains(&c) {
                    return Err(Error::invalid(
                        "--concurrency",
                        format!("must be between 1 and 100000, got {c}"),
                    ));
                }
                config.execution.max_concurrent_tasks = c;
            }
            let queue = TaskQueue::open_with(config).await?;
            worker(&queue, until_idle).await
        }
        Command::Status {
            id,
            json,
            statuses,
            project,
            limit,
            cursor,
        } => {
            let queue = TaskQueue::open_with(config).await?;
            let list = ListOptions {
                statuses,
                project,
                limit: Some(limit),
                cursor,
                ..ListOptions::default()
            };
            status(&queue, id, json, list).await
        }
        Command::Cancel { id } => {
            let queue = TaskQueue::open_with(config).await?;
            let t = queue.cancel(&id).await?;
            print_json(&summary(&t));
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { id, attempt } => {
            let queue = TaskQueue::open_with(config).await?;
            for chunk in queue.logs(&id, attempt).await? {
                print_log(
                    chunk.attempt,
                    &chunk.stream,
                    &chunk.text,
                    chunk.dropped_bytes,
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => {
            let queue = TaskQueue::open_with(config).await?;
            match command {
                AuditCommand::Verify => {
                    let report = queue.verify_audit().await?;
                    match &report.broken {
                        None => {
                            outln!("audit chain intact: {} events verified", report.events);
                            Ok(ExitCode::SUCCESS)
                        }
                        Some(b) => {
                            eprintln!(
                                "audit chain broken at event #{} (task {}): {}",
                                b.seq, b.task_id, b.reason
                            );
                            Ok(ExitCode::from(1))
                        }
                    }
                }
                AuditCommand::Show { id, limit } => {
                    for e in queue.audit_events(id.as_deref(), limit).await? {
                        outln!("{}", serde_json::to_string(&e).unwrap_or_default());
                    }
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
    }
}

fn read_tasks(file: &PathBuf) -> Result<Submission> {
    let meta = std::fs::metadata(file)
        .map_err(|e| Error::invalid("file", format!("cannot read {}: {e}", file.display())))?;
    if meta.len() > crate::model::MAX_FILE_BYTES as u64 {
        return Err(Error::invalid(
            "file",
            format!(
                "{} is {} bytes; the limit is 64 MiB",
                file.display(),
                meta.len()
            ),
        ));
    }
    let text = std::fs::read_to_string(file)
        .map_err(|e| Error::invalid("file", format!("cannot read {}: {e}", file.display())))?;
    parse_task_file(&text).map_err(|e| in_file(file, e))
}

/// A refusal of what a file holds names the file.
fn in_file(file: &std::path::Path, e: Error) -> Error {
    match e {
        Error::InvalidInput { field, message } => Error::InvalidInput {
            field: format!("{}: {field}", file.display()),
            message,
        },
        other => other,
    }
}

fn print_json(v: &serde_json::Value) {
    outln!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn summary(t: &TaskRecord) -> serde_json::Value {
    json!({
        "id": t.id,
        "name": t.name,
        "status": t.status,
        "attempts": t.attempts,
        "exit_code": t.result.as_ref().and_then(|r| r.exit_code),
        "duration_ms": t.result.as_ref().map(|r| r.duration_ms),
        "error": t.error,
    })
}

async fn run_file(
    queue: &TaskQueue,
    file: &std::path::Path,
    sub: Submission,
    json_out: bool,
) -> Result<ExitCode> {
    let mut events = queue.subscribe();
    // Dependencies that name no task of the file are ids of tasks outside it.
    let specs = match &sub {
        Submission::Tasks(t) => t.as_slice(),
        Submission::Workflow(w) => w.tasks.as_slice(),
    };
    let in_file_names: HashSet<&str> = specs.iter().map(|t| t.name.as_str()).collect();
    let outside: Vec<String> = specs
        .iter()
        .flat_map(|t| t.depends_on.iter().map(|d| d.target()))
        .filter(|d| !in_file_names.contains(d))
        .map(crate::service::canonical_id)
        .collect();
    let (workflow, submitted) = queue.submit_file(sub).await.map_err(|e| in_file(file, e))?;
    let workflow_id = workflow.as_ref().map(|w| w.workflow_id.clone());
    if let Some(w) = &workflow
        && !json_out
    {
        eprintln!(
            "workflow {} ({}): {} tasks",
            w.name,
            w.workflow_id,
            w.tasks.len()
        );
    }
    let ids: Vec<String> = submitted.iter().map(|s| s.id.clone()).collect();
    let names: HashMap<String, String> = submitted
        .iter()
        .map(|s| (s.id.clone(), s.name.clone()))
        .collect();
    let live = !json_out && std::io::stderr().is_terminal();
    let width = names.values().map(|n| n.len()).max().unwrap_or(8).min(40);
    // `run` runs the file's tasks and the unfinished tasks outside the
    // file that they depend on (by id), and no other task of the queue: a
    // `run` beside a worker must not take, and at its end stop, work that
    // is not its own.
    let mut scope = ids.clone();
    let mut seen: HashSet<String> = ids.iter().cloned().collect();
    let mut frontier: Vec<String> = outside
        .into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect();
    scope.extend(frontier.iter().cloned());
    // A task answered by an earlier one (its idempotency key) brings that
    // task's own dependencies.
    frontier.extend(
        submitted
            .iter()
            .filter(|s| !s.created)
            .map(|s| s.id.clone()),
    );
    while let Some(id) = frontier.pop() {
        // A finished task needs nothing more: its own dependencies are not
        // walked.
        let finished = queue
            .store()
            .get(&id)
            .await?
            .is_none_or(|t| t.status.is_terminal());
        if finished {
            continue;
        }
        for e in queue.store().dependencies(&id).await? {
            if e.task_id == id && seen.insert(e.dep_id.clone()) {
                scope.push(e.dep_id.clone());
                frontier.push(e.dep_id);
            }
        }
    }
    for t in queue.get_many(&scope).await? {
        let outside = !names.contains_key(&t.id);
        if outside && !t.status.is_terminal() && !json_out {
            eprintln!(
                "note: {} ({}) is outside the file; its tasks depend on it, so it runs here too",
                t.name, t.id
            );
        }
        // `run` executes commands and HTTP calls; external tasks wait for
        // a worker to claim them, which `run` does not do: say so up front.
        if t.kind == crate::model::TaskKind::External && !t.status.is_terminal() {
            eprintln!(
                "note: {} ({}) is an external task: it waits until a worker claims it \
                 (MCP claim_task, POST /api/v1/workers/claim)",
                t.name, t.id
            );
        }
    }
    let engine = queue.start_for(scope);
    let mut open: HashSet<String> = ids.iter().cloned().collect();
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut interrupted = false;
    while !open.is_empty() {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(e) if names.contains_key(&e.task_id) => {
                    if live {
                        let attempt = if e.attempt > 0 { format!(" (attempt {})", e.attempt) } else { String::new() };
                        eprintln!("{}  {:width$}  {}{}", e.at.to_rfc3339().get(11..23).unwrap_or(""), e.name, e.status, attempt);
                    }
                    // On stderr in both modes: a script reading the JSON
                    // summary needs the id to approve, or it waits forever.
                    if e.status == TaskStatus::AwaitingApproval {
                        eprintln!("  {} waits for approval: task-queue approve {} [--reject]", e.name, e.task_id);
                    }
                    if e.status.is_terminal() {
                        open.remove(&e.task_id);
                    }
                }
                Ok(_) => {}
                Err(_) => tick.reset_immediately(),
            },
            _ = tick.tick() => {
                let still: Vec<String> = open.iter().cloned().collect();
                for t in queue.get_many(&still).await? {
                    if t.status.is_terminal() {
                        open.remove(&t.id);
                    }
                }
            }
            _ = sigint.recv() => { interrupted = true; break; }
            _ = sigterm.recv() => { interrupted = true; break; }
        }
    }
    // Nothing of the run is left running unless it was interrupted (or a
    // dependency outside the file still runs): either way it gets the
    // grace period before it is stopped.
    engine
        .shutdown(queue.config().execution.kill_grace.0)
        .await?;
    let mut tasks = queue.get_many(&ids).await?;
    let order: HashMap<&String, usize> = ids.iter().enumerate().map(|(i, id)| (id, i)).collect();
    tasks.sort_by_key(|t| order.get(&t.id).copied().unwrap_or(usize::MAX));
    let all_ok = !interrupted
        && tasks
            .iter()
            .all(|t| matches!(t.status, TaskStatus::Succeeded | TaskStatus::Skipped));
    let overall = if interrupted {
        "interrupted"
    } else if all_ok {
        "succeeded"
    } else {
        "failed"
    };
    if json_out {
        let list: Vec<_> = tasks
            .iter()
            .map(|t| {
                json!({
                    "id": t.id, "name": t.name, "status": t.status, "attempts": t.attempts,
                    "exit_code": t.result.as_ref().and_then(|r| r.exit_code),
                    "duration_ms": t.result.as_ref().map(|r| r.duration_ms),
                })
            })
            .collect();
        let mut out = json!({ "status": overall, "tasks": list });
        if let Some(w) = &workflow_id {
            out["workflow_id"] = json!(w);
            if let Ok(r) = queue.workflow(w).await {
                out["workflow_status"] = json!(r.status);
            }
        }
        outln!("{out}");
    } else {
        for t in &tasks {
            let detail = match (&t.error, t.result.as_ref().map(|r| r.duration_ms)) {
                (Some(e), _) if t.status != TaskStatus::Succeeded => format!("  {e}"),
                (_, Some(ms)) => format!("  {ms} ms"),
                _ => String::new(),
            };
            outln!(
                "{:width$}  {:17} attempts={}{}",
                t.name,
                t.status.as_str(),
                t.attempts,
                detail
            );
        }
        outln!(
            "{overall}: {} of {} tasks succeeded",
            tasks
                .iter()
                .filter(|t| t.status == TaskStatus::Succeeded)
                .count(),
            tasks.len()
        );
    }
    Ok(if all_ok {
        ExitCode::SUCCESS
    } else if interrupted {
        ExitCode::from(130)
    } else {
        ExitCode::from(1)
    })
}

/// MCP over stdio until the client closes stdin or a signal arrives.
async fn mcp_stdio(queue: &TaskQueue) -> Result<ExitCode> {
    use rmcp::ServiceExt;
    let engine = queue.start();
    let service = crate::mcp::McpServer::new(queue.clone())
        .serve(crate::mcp::stdio::checked_stdio())
        .await
        .map_err(|e| Error::Io(std::io::Error::other(format!("MCP handshake failed: {e}"))))?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = service.waiting() => {
            if let Err(e) = r {
                tracing::warn!(error = %e, "the MCP session ended with an error");
            }
        }
        _ = sigterm.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    engine.shutdown(Duration::from_secs(10)).await?;
    Ok(ExitCode::SUCCESS)
}

async fn workflow_command(queue: &TaskQueue, command: WorkflowCommand) -> Result<ExitCode> {
    match command {
        WorkflowCommand::List { json: j, limit } => {
            let page = queue
                .list_workflows(Vec::new(), None, Some(limit), None)
                .await?;
            if j {
                print_json(&serde_json::to_value(&page).unwrap_or_default());
            } else {
                for w in &page.workflows {
                    outln!(
                        "{}  {:9}  {}/{} done  {}",
                        w.id,
                        w.status.as_str(),
                        w.tasks_done,
                        w.tasks_total,
                        w.name
                    );
                }
            }
        }
        WorkflowCommand::Show { id, json: j } => {
            print_workflow(&queue.get_workflow(&id).await?, j);
        }
        WorkflowCommand::Graph { id, format } => {
            outln!("{}", queue.workflow_graph(&id, &format).await?);
        }
        WorkflowCommand::Cancel { id } => {
            let w = queue.cancel_workflow(&id).await?;
            print_json(&serde_json::to_value(&w).unwrap_or_default());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn signal(kind: tokio::signal::unix::SignalKind) -> Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).map_err(Error::from)
}

/// How long a stopping worker lets its running tasks finish.
const WORKER_GRACE: Duration = Duration::from_secs(30);

/// Runs the engine until SIGINT or SIGTERM (or, with `until_idle`, until
/// nothing is left to run). A signal stops claiming and lets running tasks
/// finish for up to [`WORKER_GRACE`]; a second signal stops them at once.
/// Tasks stopped either way go back to the queue (`lost`, retried at once).
async fn worker(queue: &TaskQueue, until_idle: bool) -> Result<ExitCode> {
    let mut sigint = signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = signal(tokio::signal::unix::SignalKind::terminate())?;
    // The first signal starts the graceful stop, a second one cuts it short.
    let (first_tx, first) = tokio::sync::oneshot::channel::<()>();
    let (second_tx, second) = tokio::sync::oneshot::channel::<()>();
    let signals = tokio::spawn(async move {
        for tx in [first_tx, second_tx] {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            let _ = tx.send(());
        }
    });
    let engine = if until_idle {
        queue.start_until_idle()
    } else {
        queue.start()
    };
    let result = engine
        .stop_when(
            async {
                let _ = first.await;
                tracing::info!(
                    "shutting down: running tasks may finish for up to {} s; send the signal again to stop them now",
                    WORKER_GRACE.as_secs()
                );
            },
            WORKER_GRACE,
            async {
                if second.await.is_err() {
                    std::future::pending::<()>().await;
                }
                tracing::info!("stopping running tasks now; they go back to the queue");
            },
        )
        .await;
    signals.abort();
    result?;
    Ok(ExitCode::SUCCESS)
}

async fn status(
    queue: &TaskQueue,
    id: Option<String>,
    json_out: bool,
    list: ListOptions,
) -> Result<ExitCode> {
    match id {
        Some(id) => {
            let (t, attempts) = queue.get_with_attempts(&id).await?;
            print_task(&t, &attempts, json_out);
        }
        None => {
            let page = queue.list(list).await?;
            print_page(&page, json_out);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_task(t: &TaskRecord, attempts: &[crate::model::Attempt], json_out: bool) {
    if json_out {
        let mut v = serde_json::to_value(t).unwrap_or_default();
        v["attempt_history"] = serde_json::to_value(attempts).unwrap_or_default();
        print_json(&v);
        return;
    }
    outln!("{}  {}  {}", t.id, t.name, t.status);
    outln!("attempts: {} of {}", t.attempts, t.max_attempts);
    if let Some(e) = &t.error {
        outln!("error: {e}");
    }
    for a in attempts {
        let exit = a
            .result
            .exit_code
            .map(|c| format!(" exit={c}"))
            .unwrap_or_default();
        let signal = a
            .result
            .signal
            .map(|s| format!(" signal={s}"))
            .unwrap_or_default();
        outln!(
            "  #{} {}{exit}{signal} {} ms{}",
            a.result.attempt,
            a.status.as_str(),
            a.result.duration_ms,
            a.error
                .as_ref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
}

fn print_search(r: &crate::search::SearchResults, json_out: bool) {
    if json_out {
        print_json(&serde_json::to_value(r).unwrap_or_default());
        return;
    }
    for n in &r.notices {
        eprintln!("note: {n}");
    }
    for h in &r.hits {
        outln!(
            "{:.4}  {}{}  {}  {} runs  {}",
            h.score,
            h.project
                .as_deref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default(),
            h.name,
            h.status,
            h.runs,
            h.snippet
        );
    }
}

fn print_workflow(d: &crate::model::WorkflowDetail, json_out: bool) {
    if json_out {
        print_json(&serde_json::to_value(d).unwrap_or_default());
        return;
    }
    outln!(
        "{}  {}  {}{}",
        d.workflow.id,
        d.workflow.name,
        d.workflow.status,
        d.workflow
            .idempotency_key
            .as_ref()
            .map(|k| format!("  (idempotency key {k})"))
            .unwrap_or_default()
    );
    let width = d
        .tasks
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(8)
        .min(40);
    for t in &d.tasks {
        outln!(
            "  {:width$}  {:17}  {}{}",
            t.name,
            t.status.as_str(),
            t.id,
            t.error
                .as_ref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        );
    }
}

fn print_page(page: &crate::service::TaskPage, json_out: bool) {
    if json_out {
        print_json(&serde_json::to_value(page).unwrap_or_default());
    } else {
        for t in &page.tasks {
            outln!("{}  {:17}  {}", t.id, t.status.as_str(), t.name);
        }
        if let Some(c) = &page.next_cursor {
            eprintln!("more: --cursor {c}");
        }
    }
}

fn print_log(attempt: u32, stream: &str, text: &str, dropped_bytes: u64) {
    outln!("--- attempt {attempt} {stream} ---");
    print!("{text}");
    if dropped_bytes > 0 {
        outln!("[... {dropped_bytes} more bytes dropped at the output limit]");
    }
}

/// The commands that work against a running server (`--server URL`),
/// through [`crate::client::Client`]; their output matches the local forms.
async fn remote(client: &crate::client::Client, command: Command) -> Result<ExitCode> {
    use crate::client::{LogsQuery, TaskQuery};
    match command {
        Command::Submit { file } => match read_tasks(&file)? {
            Submission::Workflow(w) => {
                let out = client.submit_workflow(&w).await?;
                print_json(&serde_json::to_value(&out).unwrap_or_default());
            }
            Submission::Tasks(t) => {
                let tasks = client.submit_batch(&t).await?;
                print_json(&json!({ "tasks": tasks }));
            }
        },
        Command::Status {
            id,
            json,
            statuses,
            project,
            limit,
            cursor,
        } => match id {
            Some(id) => {
                let d = client.get(&id).await?;
                print_task(&d.task, &d.attempts, json);
            }
            None => {
                let page = client
                    .list(&TaskQuery {
                        statuses,
                        project,
                        limit: Some(limit),
                        cursor,
                        ..TaskQuery::default()
                    })
                    .await?;
                print_page(&page, json);
            }
        },
        Command::Cancel { id } => print_json(&summary(&client.cancel(&id).await?)),
        Command::Approve {
            id,
            reject,
            comment,
            by,
        } => {
            let t = client
                .approve(&id, !reject, comment.as_deref(), by.as_deref())
                .await?;
            print_json(&summary(&t));
        }
        Command::Logs { id, attempt } => {
            // Page through each stream until the server says there is no more.
            let first = client
                .logs(
                    &id,
                    &LogsQuery {
                        attempt,
                        limit: Some(1 << 20),
                        ..LogsQuery::default()
                    },
                )
                .await?;
            for slice in first.logs {
                let mut text = slice.text;
                let mut next = slice.next_offset;
                while let Some(offset) = next {
                    let more = client
                        .logs(
                            &id,
                            &LogsQuery {
                                attempt: Some(slice.attempt),
                                stream: Some(slice.stream.clone()),
                                offset: Some(offset),
                                limit: Some(1 << 20),
                                ..LogsQuery::default()
                            },
                        )
                        .await?;
                    let Some(s) = more.logs.into_iter().next() else {
                        break;
                    };
                    text.push_str(&s.text);
                    next = s.next_offset.filter(|n| *n > offset);
                }
                print_log(slice.attempt, &slice.stream, &text, slice.dropped_bytes);
            }
        }
        Command::Workflow {
            command: WorkflowCommand::Show { id, json },
        } => print_workflow(&client.workflow(&id).await?, json),
        Command::Workflow {
            command: WorkflowCommand::Graph { id, format },
        } => outln!("{}", client.workflow_graph(&id, &format).await?),
        Command::Workflow {
            command: WorkflowCommand::Cancel { id },
        } => {
            let w = client.cancel_workflow(&id).await?;
            print_json(&serde_json::to_value(&w).unwrap_or_default());
        }
        Command::Search {
            query,
            project,
            status,
            tag,
            limit,
            json,
        } => {
            let r = client
                .search(&crate::search::SearchRequest {
                    query,
                    project,
                    statuses: status,
                    tags: tag,
                    limit,
                    ..Default::default()
                })
                .await?;
            print_search(&r, json);
        }
        Command::Recommend {
            name,
            command,
            description,
            project,
        } => {
            let r = client
                .recommend(&crate::search::recommend::RecommendRequest {
                    name,
                    command,
                    description,
                    project,
                })
                .await?;
            print_json(&serde_json::to_value(&r).unwrap_or_default());
        }
        other => {
            return Err(Error::invalid(
                "--server",
                format!(
                    "`{}` works on the database directly; run it without --server \
                     (remote commands: submit, status, logs, cancel, approve, search, recommend, workflow show|graph|cancel)",
                    command_name(&other)
                ),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The command as it is typed (`ToolsSchema` → `tools-schema`).
fn command_name(c: &Command) -> String {
    let mut name = String::new();
    for ch in format!("{c:?}")
        .chars()
        .take_while(|ch| ch.is_ascii_alphanumeric())
    {
        if ch.is_ascii_uppercase() && !name.is_empty() {
            name.push('-');
        }
        name.push(ch.to_ascii_lowercase());
    }
    name
}
