//! The MCP server: the agent's interface. Every tool is a thin call into
//! [`TaskQueue`]; bad input and unknown ids come back as tool results with
//! `isError: true` whose text names the field or id and the fix. Served
//! over stdio (`task-queue mcp`), streamable HTTP at `/mcp` and the legacy
//! HTTP+SSE transport at `/sse` + `/messages` (`task-queue serve`).

pub mod sse;
pub mod stdio;
pub mod types;

use std::time::{Duration, Instant};

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::schema_for_output;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    PaginatedRequestParams, ProgressNotificationParam, ReadResourceRequestParams,
    ReadResourceResponse, ReadResourceResult, ResourceContents, ResourceTemplate,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::Error;
use crate::model::{TaskSpec, TaskStatus, WorkflowSpec, from_value};
use crate::service::{ClaimFilter, ListOptions, TaskQueue};
use crate::store::Role;
use types::*;

/// Longest a tool waits (wait_for_task): clients time out around 60 s.
const MAX_WAIT: Duration = Duration::from_secs(50);

/// What the server tells a model up front.
const INSTRUCTIONS: &str = "task-queue runs tasks and workflows durably: shell commands, HTTP calls, \
and external tasks that you (or another agent) claim and complete. Submit with submit_task or \
submit_workflow (a DAG: depends_on by name with conditions success/failure/completion/schema), \
then follow with wait_for_task (up to 50 s per call; call again to keep waiting), get_task, \
get_workflow and get_task_logs. Tasks that need a person wait in awaiting_approval until \
approve_task. External work: claim_task, heartbeat_task, then complete_task or fail_task. \
Resources task://{id} and workflow://{id} return the same JSON as get_task and get_workflow.";

/// The MCP server over one queue.
#[derive(Clone)]
pub struct McpServer {
    queue: TaskQueue,
    tool_router: ToolRouter<Self>,
    /// The role of the token that opened the session (legacy SSE), when
    /// auth is on. Over `/mcp` the role comes with each request instead;
    /// over stdio there is none, and every tool is open.
    role: Option<Role>,
}

/// The least role each tool needs when the caller came with a token
/// (SPEC §7): reading and searching for viewers, the external-task loop for
/// workers, everything that starts, stops or decides work for operators.
pub fn tool_role(tool: &str) -> Role {
    match tool {
        "claim_task" | "heartbeat_task" | "complete_task" | "fail_task" => Role::Worker,
        "submit_task" | "submit_workflow" | "cancel_task" | "retry_task" | "approve_task" => {
            Role::Operator
        }
        _ => Role::Viewer,
    }
}

type ToolResult = Result<CallToolResult, McpError>;

/// Parses tool arguments; a failure names the field.
fn parse<T: DeserializeOwned>(raw: Raw<T>) -> Result<T, CallToolResult> {
    let v = if raw.value.is_null() {
        Value::Object(Default::default())
    } else {
        raw.value
    };
    from_value(v).map_err(fail)
}

/// A successful result: structured content plus a short text rendering.
fn ok<T: Serialize>(value: &T, text: String) -> ToolResult {
    let v = serde_json::to_value(value)
        .map_err(|e| McpError::internal_error(format!("cannot encode the result: {e}"), None))?;
    let mut r = CallToolResult::structured(v);
    r.content = vec![ContentBlock::text(text)];
    Ok(r)
}

/// A failed call: `isError: true` with what was wrong and what to do.
fn fail(e: Error) -> CallToolResult {
    let hint = match &e {
        Error::InvalidInput { .. } => " Fix that argument and call again.",
        Error::Unsupported { .. } => "",
        Error::NotFound { what: "task", .. } => {
            " Check the id: list_tasks shows recent tasks and their ids."
        }
        Error::NotFound {
            what: "workflow", ..
        } => " Check the id: submit_workflow returned it as workflow_id.",
        Error::NotFound { .. } => " Check the id.",
        Error::Conflict(_) => " Read the task with get_task to see its current state.",
        Error::Store(_) | Error::Io(_) => " This is a server-side problem; try again shortly.",
        Error::ShuttingDown => " The server is restarting; try again shortly.",
        Error::Integrity(_) | Error::Config(_) | Error::Remote { .. } => "",
    };
    CallToolResult::error(vec![ContentBlock::text(format!(
        "{} ({}).{hint}",
        e,
        e.code()
    ))])
}

macro_rules! try_tool {
    ($e:expr) => {
        match $e {
            Ok(v) => v,
            Err(e) => return Ok(fail(e)),
        }
    };
}

macro_rules! args {
    ($raw:expr) => {
        match parse($raw) {
            Ok(v) => v,
            Err(r) => return Ok(r),
        }
    };
}

fn search_text(r: &crate::search::SearchResults) -> String {
    let mut s = format!("{} past task(s) found ({} ranking)", r.hits.len(), r.mode);
    for n in &r.notices {
        s.push_str(&format!("\nnote: {n}"));
    }
    for h in &r.hits {
        s.push_str(&format!(
            "\n- {}{} [{}] task {} ({} runs, {} ms): {}",
            h.project
                .as_deref()
                .map(|p| format!("{p}/"))
                .unwrap_or_default(),
            h.name,
            h.status,
            h.task_id,
            h.runs,
            h.duration_ms,
            h.snippet
        ));
    }
    s
}

fn recommend_text(r: &crate::search::recommend::Recommendation) -> String {
    let Some(name) = &r.based_on else {
        return "no similar past task: no recommendation from history".into();
    };
    let mut s = format!("based on {} past run(s) of {name}", r.runs);
    if let Some(rate) = r.success_rate {
        s.push_str(&format!(", {:.0}% succeeded", rate * 100.0));
    }
    if let (Some(p50), Some(p90)) = (r.p50_duration_ms, r.p90_duration_ms) {
        s.push_str(&format!(", p50 {p50} ms, p90 {p90} ms"));
    }
    if let Some(t) = &r.suggested_timeout {
        s.push_str(&format!("; suggested timeout {t}"));
    }
    s.push_str(&format!("; retry: {}", r.retry_reason));
    s
}

fn task_line(t: &crate::model::TaskRecord) -> String {
    let mut s = format!(
        "task {} ({}) is {} after {} of {} attempts",
        t.name, t.id, t.status, t.attempts, t.max_attempts
    );
    if let Some(e) = &t.error {
        s.push_str(&format!("; error: {e}"));
    }
    if let Some(out) = t.result.as_ref().and_then(|r| r.output.as_ref()) {
        let text = out.to_string();
        let cut: String = text.chars().take(300).collect();
        s.push_str(&format!("; output: {cut}"));
    }
    s
}

#[tool_router]
impl McpServer {
    pub fn new(queue: TaskQueue) -> Self {
        Self::for_role(queue, None)
    }

    /// A server whose tools are limited to what `role` may do (None: all).
    pub fn for_role(queue: TaskQueue, role: Option<Role>) -> Self {
        McpServer {
            queue,
            tool_router: Self::router(),
            role,
        }
    }

    /// The tools, with schemas cleaned of the integer `format`s schemars
    /// emits (`uint32`, ...): they are not JSON Schema formats, and
    /// validating clients warn about every one of them.
    fn router() -> ToolRouter<Self> {
        let mut r = Self::tool_router();
        for route in r.map.values_mut() {
            let mut input = Value::Object((*route.attr.input_schema).clone());
            strip_int_formats(&mut input);
            if let Value::Object(m) = input {
                route.attr.input_schema = std::sync::Arc::new(m);
            }
            if let Some(out) = &route.attr.output_schema {
                let mut v = Value::Object((**out).clone());
                strip_int_formats(&mut v);
                if let Value::Object(m) = v {
                    route.attr.output_schema = Some(std::sync::Arc::new(m));
                }
            }
        }
        r
    }

    /// The `tools/list` payload this server answers with.
    pub fn tools_list() -> Value {
        let mut tools = Self::router().list_all();
        tools.sort_by(|a, b| a.name.cmp(&b.name));
        serde_json::json!({ "tools": tools })
    }

    /// Submit one task to run in the background. Use it for a single shell
    /// command (`command`, run with /bin/sh -c, or `argv`), an HTTP call
    /// (`http: {method, url, headers, body}`), or work for an agent
    /// (`kind: external`, done via claim_task). Options: priority (-100..100),
    /// timeout ("30s", "5m"), retry {max_attempts, initial_delay, ...},
    /// depends_on (ids of existing tasks), requires_approval, schedule
    /// ({at: RFC 3339} or {cron}), validation (JSON Schema for the result),
    /// idempotency_key (a repeat returns the first task). Returns the task
    /// id and status at once; follow with wait_for_task or get_task. For
    /// several steps that depend on each other use submit_workflow.
    #[tool(
        title = "Submit a task",
        output_schema = schema_for_output::<crate::store::Submitted>(),
        annotations(
            title = "Submit a task",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn submit_task(&self, Parameters(raw): Parameters<Raw<TaskSpec>>) -> ToolResult {
        let spec: TaskSpec = args!(raw);
        let s = try_tool!(self.queue.submit(spec).await);
        let text = format!(
            "{} task {} ({}), status {}{}",
            if s.created {
                "submitted"
            } else {
                "idempotency key matched existing"
            },
            s.name,
            s.id,
            s.status,
            s.schedule_id
                .as_ref()
                .map(|id| format!("; schedule {id}"))
                .unwrap_or_default()
        );
        ok(&s, text)
    }

    /// Submit a workflow: named tasks that depend on each other by name
    /// (`depends_on: ["build"]` or `[{task: build, condition: failure}]`;
    /// conditions success (default), failure, completion, or {schema: ...}
    /// over the dependency's result). The graph is checked first (cycles,
    /// unknown names): nothing is stored if anything is wrong. A task whose
    /// condition can no longer hold is skipped. Optional `schedule: {cron}`
    /// repeats the whole workflow. Returns the workflow id and every task's
    /// id; follow with get_workflow (status and a Mermaid graph) or
    /// wait_for_task on the last step. To make a retry safe, give every task
    /// an idempotency_key: when all of them match tasks of one earlier
    /// workflow, that workflow is returned and nothing new is stored.
    #[tool(
        title = "Submit a workflow",
        output_schema = schema_for_output::<crate::service::WorkflowSubmitted>(),
        annotations(
            title = "Submit a workflow",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn submit_workflow(&self, Parameters(raw): Parameters<Raw<WorkflowSpec>>) -> ToolResult {
        let w: WorkflowSpec = args!(raw);
        let s = try_tool!(self.queue.submit_workflow(w).await);
        let names: Vec<String> = s
            .tasks
            .iter()
            .map(|t| format!("{}={}", t.name, t.id))
            .collect();
        let what = if !s.created {
            "already submitted (matched by idempotency key): workflow"
        } else {
            "submitted workflow"
        };
        let text = format!(
            "{what} {} ({}, {}) with {} tasks: {}",
            s.name,
            s.workflow_id,
            s.status.as_str(),
            s.tasks.len(),
            names.join(", ")
        );
        ok(&s, text)
    }

    /// Read one task: status, attempts so far, error, result output (the
    /// JSON the task reported), and its spec. Use it to check on a task
    /// without waiting.
    #[tool(
        title = "Get a task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Get a task",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_task(&self, Parameters(raw): Parameters<Raw<GetTaskArgs>>) -> ToolResult {
        let a: GetTaskArgs = args!(raw);
        let (task, attempts) = if a.include_attempts.unwrap_or(true) {
            let (task, attempts) = try_tool!(self.queue.get_with_attempts(&a.id).await);
            (task, Some(attempts))
        } else {
            (try_tool!(self.queue.get(&a.id).await), None)
        };
        let text = task_line(&task);
        ok(&TaskOut { task, attempts }, text)
    }

    /// List tasks, newest first, filtered by status, project, tag or name,
    /// one page at a time (pass next_cursor back for the next page).
    #[tool(
        title = "List tasks",
        output_schema = schema_for_output::<crate::service::TaskPage>(),
        annotations(
            title = "List tasks",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn list_tasks(&self, Parameters(raw): Parameters<Raw<ListTasksArgs>>) -> ToolResult {
        let a: ListTasksArgs = args!(raw);
        let limit = a.limit.unwrap_or(20);
        if limit == 0 || limit > 200 {
            return Ok(fail(Error::invalid(
                "limit",
                format!("must be between 1 and 200, got {limit}"),
            )));
        }
        let page = try_tool!(
            self.queue
                .list(ListOptions {
                    statuses: a.status,
                    project: a.project,
                    tag: a.tag,
                    name: a.name,
                    workflow_id: a.workflow_id,
                    limit: Some(limit),
                    cursor: a.cursor,
                })
                .await
        );
        let mut text = format!("{} tasks", page.tasks.len());
        for t in &page.tasks {
            text.push_str(&format!("\n{}  {}  {}", t.id, t.status, t.name));
        }
        if let Some(c) = &page.next_cursor {
            text.push_str(&format!("\nmore: cursor {c}"));
        }
        ok(&page, text)
    }

    /// Read a workflow: its status (running, succeeded, failed, cancelled),
    /// every task with its status and result, the dependency edges, and the
    /// graph as Mermaid (or DOT) with nodes styled by status.
    #[tool(
        title = "Get a workflow",
        output_schema = schema_for_output::<WorkflowOut>(),
        annotations(
            title = "Get a workflow",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_workflow(&self, Parameters(raw): Parameters<Raw<GetWorkflowArgs>>) -> ToolResult {
        let a: GetWorkflowArgs = args!(raw);
        let workflow = try_tool!(self.queue.get_workflow(&a.id).await);
        let graph = match a.graph.as_deref().unwrap_or("mermaid") {
            "none" => None,
            f @ ("mermaid" | "dot") => Some(try_tool!(self.queue.workflow_graph(&a.id, f).await)),
            other => {
                return Ok(fail(Error::invalid(
                    "graph",
                    format!("must be mermaid, dot or none, got {other:?}"),
                )));
            }
        };
        let mut text = format!(
            "workflow {} ({}) is {}: {} of {} tasks done",
            workflow.workflow.name,
            workflow.workflow.id,
            workflow.workflow.status,
            workflow.workflow.tasks_done,
            workflow.workflow.tasks_total
        );
        for t in &workflow.tasks {
            text.push_str(&format!("\n{}  {}  {}", t.name, t.status, t.id));
        }
        ok(&WorkflowOut { workflow, graph }, text)
    }

    /// Wait until a task finishes (succeeded, failed, timed_out, cancelled
    /// or skipped), for at most timeout_seconds (1..=50, default 30). Sends
    /// progress notifications while waiting when you pass a progress token.
    /// If time runs out you get the current state with done: false — call
    /// again to keep waiting. A task in awaiting_approval will not move
    /// until approve_task is called.
    #[tool(
        title = "Wait for a task",
        output_schema = schema_for_output::<WaitOut>(),
        annotations(
            title = "Wait for a task",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn wait_for_task(
        &self,
        Parameters(raw): Parameters<Raw<WaitArgs>>,
        ctx: RequestContext<RoleServer>,
    ) -> ToolResult {
        let a: WaitArgs = args!(raw);
        let secs = a.timeout_seconds.unwrap_or(30);
        if secs == 0 || secs > MAX_WAIT.as_secs() {
            return Ok(fail(Error::invalid(
                "timeout_seconds",
                format!("must be between 1 and 50, got {secs}"),
            )));
        }
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let token = ctx.meta.get_progress_token();
        let mut events = self.queue.subscribe();
        let mut step = 0u32;
        let mut last: Option<(TaskStatus, u32)> = None;
        loop {
            let t = try_tool!(self.queue.get(&a.id).await);
            let done = t.status.is_terminal();
            if let Some(token) = &token
                && last != Some((t.status, t.attempts))
            {
                step += 1;
                let _ =
                    ctx.peer
                        .notify_progress(
                            ProgressNotificationParam::new(token.clone(), step as f64)
                                .with_message(format!(
                                    "{} is {} (attempt {} of {})",
                                    t.name, t.status, t.attempts, t.max_attempts
                                )),
                        )
                        .await;
            }
            last = Some((t.status, t.attempts));
            if done || tokio::time::Instant::now() >= deadline || ctx.ct.is_cancelled() {
                let waited_ms = started.elapsed().as_millis() as u64;
                let text = format!(
                    "{}{}",
                    if done { "" } else { "still waiting: " },
                    task_line(&t)
                );
                return ok(
                    &WaitOut {
                        done,
                        waited_ms,
                        task: t,
                    },
                    text,
                );
            }
            // Events cover this process; the poll covers other processes.
            let id = crate::service::canonical_id(&a.id);
            tokio::select! {
                _ = async {
                    loop {
                        match events.recv().await {
                            Ok(e) if e.task_id == id => return,
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                } => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = ctx.ct.cancelled() => {}
            }
        }
    }

    /// Cancel a task that has not finished; if it is running, its process
    /// group is stopped. Dependents waiting for its success are skipped;
    /// those waiting for `completion` still run. Cancelling a service task
    /// that already succeeded stops its process.
    #[tool(
        title = "Cancel a task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Cancel a task",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn cancel_task(&self, Parameters(raw): Parameters<Raw<TaskIdArgs>>) -> ToolResult {
        let a: TaskIdArgs = args!(raw);
        let task = try_tool!(self.queue.cancel(&a.id).await);
        let text = task_line(&task);
        ok(
            &TaskOut {
                task,
                attempts: None,
            },
            text,
        )
    }

    /// Run a failed, timed-out or cancelled task again, with a fresh
    /// allowance of attempts (its history is kept). Tasks that were skipped
    /// because of it are decided again, and its workflow is running again.
    /// Fix the cause first (e.g. the file or service it needed).
    #[tool(
        title = "Retry a task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Retry a task",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = true
        )
    )]
    async fn retry_task(&self, Parameters(raw): Parameters<Raw<TaskIdArgs>>) -> ToolResult {
        let a: TaskIdArgs = args!(raw);
        let task = try_tool!(self.queue.retry(&a.id).await);
        let text = task_line(&task);
        ok(
            &TaskOut {
                task,
                attempts: None,
            },
            text,
        )
    }

    /// Approve or reject a task waiting in awaiting_approval (tasks with
    /// requires_approval stop there once their dependencies are met).
    /// Approve queues it to run; reject fails it, so its failure handlers
    /// run and the steps after it are skipped. Add a comment saying why.
    #[tool(
        title = "Approve or reject a task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Approve or reject a task",
            read_only_hint = false,
            destructive_hint = true,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn approve_task(&self, Parameters(raw): Parameters<Raw<ApproveArgs>>) -> ToolResult {
        let a: ApproveArgs = args!(raw);
        let by = a.by.or_else(|| Some("mcp".to_string()));
        let task = try_tool!(self.queue.approve(&a.id, a.approve, a.comment, by).await);
        let text = format!(
            "{}: {}",
            if a.approve { "approved" } else { "rejected" },
            task_line(&task)
        );
        ok(
            &TaskOut {
                task,
                attempts: None,
            },
            text,
        )
    }

    /// Read a task's captured stdout/stderr (kept up to the task's output
    /// limit). Use tail to get the end of a long log (e.g. the error of a
    /// failed build), or offset/limit to page through it.
    #[tool(
        title = "Read a task's output",
        output_schema = schema_for_output::<LogsOut>(),
        annotations(
            title = "Read a task's output",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn get_task_logs(&self, Parameters(raw): Parameters<Raw<LogsArgs>>) -> ToolResult {
        let a: LogsArgs = args!(raw);
        let limit = a.limit.unwrap_or(16 * 1024);
        if limit == 0 || limit > 256 * 1024 {
            return Ok(fail(Error::invalid(
                "limit",
                format!("must be between 1 and 262144 bytes, got {limit}"),
            )));
        }
        let out = try_tool!(
            crate::rest::logs_slice(
                &self.queue,
                &a.id,
                a.attempt,
                a.stream,
                a.tail,
                a.offset,
                Some(limit)
            )
            .await
        );
        let mut text = String::new();
        for l in &out.logs {
            text.push_str(&format!(
                "--- attempt {} {} (bytes {}..{} of {})\n{}\n",
                l.attempt,
                l.stream,
                l.offset,
                l.offset + l.text.len(),
                l.total_bytes,
                l.text
            ));
        }
        let logs = out.logs;
        if logs.is_empty() {
            text = "no output captured (yet)".into();
        }
        ok(
            &LogsOut {
                task_id: out.task_id,
                logs,
            },
            text,
        )
    }

    /// Take external tasks (kind: external) to work on yourself, under a
    /// lease. Filter by names, project or tags. You get each task's spec
    /// (description, parameters, validation schema). Keep the lease alive
    /// with heartbeat_task, then report with complete_task or fail_task
    /// using the same worker_id. Returns an empty list when nothing is ready.
    #[tool(
        title = "Claim external tasks",
        output_schema = schema_for_output::<ClaimOut>(),
        annotations(
            title = "Claim external tasks",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn claim_task(&self, Parameters(raw): Parameters<Raw<ClaimArgs>>) -> ToolResult {
        let a: ClaimArgs = args!(raw);
        let tasks = try_tool!(
            self.queue
                .claim(
                    &a.worker_id,
                    ClaimFilter {
                        names: a.names,
                        project: a.project,
                        tags: a.tags,
                    },
                    Duration::from_secs(a.lease_seconds.unwrap_or(300)),
                    a.limit.unwrap_or(1),
                )
                .await
        );
        let mut text = format!("claimed {} tasks", tasks.len());
        for t in &tasks {
            text.push_str(&format!(
                "\n{} ({}) attempt {}, lease until {}{}",
                t.name,
                t.task_id,
                t.attempt,
                t.lease_expires_at,
                t.spec
                    .description
                    .as_ref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            ));
        }
        ok(&ClaimOut { tasks }, text)
    }

    /// Extend the lease of a task you claimed, while you are still working
    /// on it. An error means you lost it (expired or cancelled): stop.
    #[tool(
        title = "Renew a claim",
        output_schema = schema_for_output::<HeartbeatOut>(),
        annotations(
            title = "Renew a claim",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn heartbeat_task(&self, Parameters(raw): Parameters<Raw<HeartbeatArgs>>) -> ToolResult {
        let a: HeartbeatArgs = args!(raw);
        let until = try_tool!(
            self.queue
                .heartbeat(
                    &a.id,
                    &a.worker_id,
                    Duration::from_secs(a.lease_seconds.unwrap_or(300)),
                )
                .await
        );
        let task_id = crate::service::canonical_id(&a.id);
        let text = format!("lease on {task_id} renewed until {until}");
        ok(
            &HeartbeatOut {
                task_id,
                lease_expires_at: until,
            },
            text,
        )
    }

    /// Report a claimed task as done, with its result output. The output
    /// must match the task's validation schema if it has one (otherwise the
    /// call fails and the task stays yours to complete again). Dependents
    /// waiting on it start.
    #[tool(
        title = "Complete a claimed task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Complete a claimed task",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn complete_task(&self, Parameters(raw): Parameters<Raw<CompleteArgs>>) -> ToolResult {
        let a: CompleteArgs = args!(raw);
        let task = try_tool!(self.queue.complete(&a.id, &a.worker_id, a.output).await);
        let text = task_line(&task);
        ok(
            &TaskOut {
                task,
                attempts: None,
            },
            text,
        )
    }

    /// Report a claimed task as failed, saying why. With retryable (the
    /// default) it is retried per its policy while attempts remain;
    /// otherwise it fails now and its failure handlers run.
    #[tool(
        title = "Fail a claimed task",
        output_schema = schema_for_output::<TaskOut>(),
        annotations(
            title = "Fail a claimed task",
            read_only_hint = false,
            destructive_hint = false,
            idempotent_hint = false,
            open_world_hint = false
        )
    )]
    async fn fail_task(&self, Parameters(raw): Parameters<Raw<FailArgs>>) -> ToolResult {
        let a: FailArgs = args!(raw);
        let task = try_tool!(
            self.queue
                .fail(&a.id, &a.worker_id, a.error, a.retryable.unwrap_or(true))
                .await
        );
        let text = task_line(&task);
        ok(
            &TaskOut {
                task,
                attempts: None,
            },
            text,
        )
    }

    /// Search the history of past tasks by meaning and words ("how did we
    /// deploy the API last time"): names, descriptions, commands, results
    /// and output. Filter by project, status or tags. Each hit has a score
    /// and a snippet of why it matched.
    #[tool(
        title = "Search past tasks",
        output_schema = schema_for_output::<SearchOut>(),
        annotations(
            title = "Search past tasks",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn search_tasks(&self, Parameters(raw): Parameters<Raw<SearchArgs>>) -> ToolResult {
        let a: SearchArgs = args!(raw);
        match self.queue.search(a.into_request()).await {
            Ok(r) => {
                let text = search_text(&r);
                ok(&r, text)
            }
            Err(e) => Ok(fail(e)),
        }
    }

    /// Before running something, ask what happened when similar tasks ran:
    /// success rate, typical duration (p50/p90), a suggested timeout and
    /// retry policy, the steps that usually come before and after it, common
    /// failure messages and usual artifacts.
    #[tool(
        title = "Recommend settings from history",
        output_schema = schema_for_output::<RecommendOut>(),
        annotations(
            title = "Recommend settings from history",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn recommend(&self, Parameters(raw): Parameters<Raw<RecommendArgs>>) -> ToolResult {
        let a: RecommendArgs = args!(raw);
        match self.queue.recommend(a.into_request()).await {
            Ok(r) => {
                let text = recommend_text(&r);
                ok(&r, text)
            }
            Err(e) => Ok(fail(e)),
        }
    }

    /// A snapshot of the queue: tasks by status, workflows by status, how
    /// many tasks are ready and how long the oldest has waited, schedules,
    /// and leases per worker. Use it to see whether work is piling up.
    #[tool(
        title = "Queue statistics",
        output_schema = schema_for_output::<crate::store::QueueStats>(),
        annotations(
            title = "Queue statistics",
            read_only_hint = true,
            destructive_hint = false,
            idempotent_hint = true,
            open_world_hint = false
        )
    )]
    async fn queue_stats(&self, Parameters(raw): Parameters<Raw<NoArgs>>) -> ToolResult {
        let _a: NoArgs = args!(raw);
        let s = try_tool!(self.queue.stats().await);
        let by: Vec<String> = s.tasks.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let text = format!(
            "tasks: {}; ready: {}{}; workflows running: {}; schedules active: {}",
            if by.is_empty() {
                "none".to_string()
            } else {
                by.join(", ")
            },
            s.ready,
            s.oldest_ready_ms
                .map(|ms| format!(" (oldest waiting {ms} ms)"))
                .unwrap_or_default(),
            s.workflows
                .get(&crate::model::WorkflowStatus::Running)
                .copied()
                .unwrap_or(0),
            s.schedules_active
        );
        ok(&s, text)
    }
}

fn strip_int_formats(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("format").and_then(Value::as_str).is_some_and(|f| {
                matches!(
                    f,
                    "uint"
                        | "uint8"
                        | "uint16"
                        | "uint32"
                        | "uint64"
                        | "int8"
                        | "int16"
                        | "int32"
                        | "int64"
                        | "float"
                        | "double"
                )
            }) {
                m.remove("format");
            }
            for x in m.values_mut() {
                strip_int_formats(x);
            }
        }
        Value::Array(a) => a.iter_mut().for_each(strip_int_formats),
        _ => {}
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for McpServer {
    /// Checks the caller's role for the tool, then runs it. A role too low
    /// is a tool error naming the role needed, so the agent can say why.
    async fn call_tool(
        &self,
        request: rmcp::model::CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::CallToolResponse, McpError> {
        let caller = context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<crate::server::Caller>())
            .map(|c| c.role)
            .or(self.role);
        let need = tool_role(&request.name);
        if let Some(role) = caller
            && role < need
        {
            let msg = format!(
                "{} needs a token with role {} or above; this session's token has role {}. \
                 Ask for a token with that role (task-queue token create --role {})",
                request.name,
                need.as_str(),
                role.as_str(),
                need.as_str()
            );
            return Ok(CallToolResult::error(vec![ContentBlock::text(msg)]).into());
        }
        let tcc = rmcp::handler::server::tool::ToolCallContext::new(self, request, context);
        self.tool_router.call(tcc).await
    }

    fn get_info(&self) -> ServerConfig {
        // Tools and resources only: the deprecated logging capability is
        // not advertised (some clients fail against servers that do).
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_server_info(Implementation::new("task-queue", env!("CARGO_PKG_VERSION")))
        .with_instructions(INSTRUCTIONS)
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![]))
    }

    async fn list_resource_templates(
        &self,
        _request: Option<PaginatedRequestParams>,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new("task://{id}", "task")
                .with_title("Task")
                .with_description("A task with its attempts, as JSON (what get_task returns)")
                .with_mime_type("application/json"),
            ResourceTemplate::new("workflow://{id}", "workflow")
                .with_title("Workflow")
                .with_description(
                    "A workflow with its tasks, edges and Mermaid graph, as JSON (what get_workflow returns)",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        _ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let uri = request.uri.clone();
        let not_found = |msg: String| McpError::resource_not_found(msg, None);
        let value = if let Some(id) = uri.strip_prefix("task://") {
            let task = self
                .queue
                .get(id)
                .await
                .map_err(|e| not_found(e.to_string()))?;
            let attempts = self
                .queue
                .attempts(id)
                .await
                .map_err(|e| not_found(e.to_string()))?;
            serde_json::to_value(TaskOut {
                task,
                attempts: Some(attempts),
            })
        } else if let Some(id) = uri.strip_prefix("workflow://") {
            let workflow = self
                .queue
                .get_workflow(id)
                .await
                .map_err(|e| not_found(e.to_string()))?;
            let graph = self.queue.workflow_graph(id, "mermaid").await.ok();
            serde_json::to_value(WorkflowOut { workflow, graph })
        } else {
            return Err(not_found(format!(
                "unknown resource {uri}; use task://{{id}} or workflow://{{id}}"
            )));
        }
        .map_err(|e| McpError::internal_error(e.to_string(), None))?;
        let text = serde_json::to_string_pretty(&value)
            .map_err(|e| McpError::internal_error(e.to_string(), None))?;
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(text, uri).with_mime_type("application/json"),
        ])
        .into())
    }
}
