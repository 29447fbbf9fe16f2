//! The OpenAPI 3.1 document at `/api/v1/openapi.json`. Component schemas
//! are generated from the Rust types the handlers use (schemars, JSON Schema
//! 2020-12, which OpenAPI 3.1 adopts); the operation table below mirrors
//! the router, and a test checks that every routed path is documented.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{Map, Value, json};

use crate::mcp::types::{ClaimArgs, LogsOut};
use crate::model::{TaskRecord, TaskSpec, WorkflowDetail, WorkflowSpec};
use crate::service::{ClaimedWork, TaskPage, WorkflowPage, WorkflowSubmitted};
use crate::store::{QueueStats, StreamEvent, Submitted};

fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    serde_json::to_value(g.subschema_for::<T>()).unwrap_or(Value::Null)
}

fn error_response(desc: &str) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}})
}

fn ok(desc: &str, schema: Value) -> Value {
    json!({"description": desc, "content": {"application/json": {"schema": schema}}})
}

fn path_id(what: &str) -> Value {
    json!({"name": "id", "in": "path", "required": true, "description": format!("The {what} id (UUID)."), "schema": {"type": "string", "format": "uuid"}})
}

fn query(name: &str, desc: &str, ty: &str) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": ty}})
}

fn query_int(name: &str, desc: &str, min: u64, max: u64) -> Value {
    json!({"name": name, "in": "query", "required": false, "description": desc, "schema": {"type": "integer", "minimum": min, "maximum": max}})
}

fn body(schema: Value) -> Value {
    json!({"required": true, "content": {"application/json": {"schema": schema}}})
}

fn op(id: &str, summary: &str, params: Vec<Value>, req: Option<Value>, responses: Value) -> Value {
    let mut o = json!({"operationId": id, "summary": summary, "responses": responses});
    if !params.is_empty() {
        o["parameters"] = Value::Array(params);
    }
    if let Some(b) = req {
        o["requestBody"] = b;
    }
    o
}

/// OpenAPI links: how the id a creating call returns feeds the calls that
/// read or act on the created object (clients and fuzzers follow them).
fn add_links(paths: &mut Value) {
    let link = |op: &str, id: &str| json!({"operationId": op, "parameters": {"id": id}});
    let task_ops = [
        ("GetTask", "getTask"),
        ("GetTaskLogs", "getTaskLogs"),
        ("CancelTask", "cancelTask"),
        ("RetryTask", "retryTask"),
        ("ApproveTask", "approveTask"),
        ("RejectTask", "rejectTask"),
    ];
    let task_links: Map<String, Value> = task_ops
        .iter()
        .map(|(name, op)| (name.to_string(), link(op, "$response.body#/id")))
        .collect();
    paths["/tasks"]["post"]["responses"]["201"]["links"] = Value::Object(task_links);
    let wf_ops = [
        ("GetWorkflow", "getWorkflow"),
        ("GetWorkflowGraph", "getWorkflowGraph"),
        ("CancelWorkflow", "cancelWorkflow"),
    ];
    let mut wf_links: Map<String, Value> = wf_ops
        .iter()
        .map(|(name, op)| (name.to_string(), link(op, "$response.body#/workflow_id")))
        .collect();
    wf_links.insert(
        "GetFirstTask".into(),
        link("getTask", "$response.body#/tasks/0/id"),
    );
    paths["/workflows"]["post"]["responses"]["201"]["links"] = Value::Object(wf_links);
}

/// The document.
pub fn document() -> Value {
    let mut g = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let task_spec = schema::<TaskSpec>(&mut g);
    let workflow_spec = schema::<WorkflowSpec>(&mut g);
    let submitted = schema::<Submitted>(&mut g);
    let record = schema::<TaskRecord>(&mut g);
    let attempt = schema::<crate::model::Attempt>(&mut g);
    let page = schema::<TaskPage>(&mut g);
    let search_results = schema::<crate::search::SearchResults>(&mut g);
    let recommendation = schema::<crate::search::recommend::Recommendation>(&mut g);
    let wf_submitted = schema::<WorkflowSubmitted>(&mut g);
    let wf_detail = schema::<WorkflowDetail>(&mut g);
    let wf_page = schema::<WorkflowPage>(&mut g);
    let wf_record = schema::<crate::model::WorkflowRecord>(&mut g);
    let stats = schema::<QueueStats>(&mut g);
    let logs = schema::<LogsOut>(&mut g);
    let claim_args = schema::<ClaimArgs>(&mut g);
    let claimed = schema::<ClaimedWork>(&mut g);
    let event = schema::<StreamEvent>(&mut g);
    let mut components: Map<String, Value> = g
        .take_definitions(true)
        .into_iter()
        .collect::<Map<String, Value>>();
    components.insert(
        "Error".into(),
        json!({
            "type": "object",
            "required": ["error"],
            "properties": {"error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {
                    "code": {"type": "string", "description": "Stable machine-readable code: invalid_input, not_found, conflict, unsupported, storage, shutting_down, payload_too_large, unsupported_media_type, ..."},
                    "message": {"type": "string", "description": "What went wrong and, where it helps, what to do."},
                    "details": {"description": "The field or id concerned, when there is one."}
                }
            }}
        }),
    );
    let task_out = json!({"type": "object", "required": ["task"], "properties": {"task": record}});
    let task_with_attempts = json!({"type": "object", "required": ["task", "attempts"], "properties": {"task": record, "attempts": {"type": "array", "items": attempt}}});
    let decision = json!({"type": "object", "additionalProperties": false, "properties": {"comment": {"type": ["string", "null"]}, "by": {"type": ["string", "null"]}}});
    let worker = |extra: Value, required: Vec<&str>| {
        let mut props = json!({"worker_id": {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:@-]+$", "description": "The worker id used to claim the task."}});
        if let (Value::Object(p), Value::Object(e)) = (&mut props, extra) {
            p.extend(e);
        }
        json!({"type": "object", "additionalProperties": false, "required": required, "properties": props})
    };
    let errors = |extra: &[(&str, &str)]| {
        let mut r = Map::new();
        r.insert(
            "400".into(),
            error_response("Invalid input; `details.field` names it."),
        );
        for (code, desc) in extra {
            r.insert((*code).into(), error_response(desc));
        }
        r.insert(
            "503".into(),
            error_response("The store is unavailable; retry."),
        );
        r
    };
    let merge = |mut base: Map<String, Value>, ok_code: &str, ok_resp: Value| {
        base.insert(ok_code.into(), ok_resp);
        Value::Object(base)
    };
    let paths = json!({
        "/tasks": {
            "post": op("createTask", "Submit a task (201; 200 when the idempotency key matched an earlier task)",
                vec![json!({"name": "Idempotency-Key", "in": "header", "required": false, "description": "Same as the spec's idempotency_key: a repeat returns the first task.", "schema": {"type": "string"}})],
                Some(body(task_spec.clone())),
                {
                    let mut r = merge(errors(&[("413", "Body too large."), ("415", "Not application/json.")]), "201", ok("Created.", submitted.clone()));
                    r["200"] = ok("The idempotency key matched an earlier task; that task is returned (created: false).", submitted.clone());
                    r
                }),
            "get": op("listTasks", "List tasks, newest first, with cursor pagination",
                vec![query("status", "Statuses, comma-separated or repeated.", "string"), query("project", "Project.", "string"),
                     query("workflow_id", "Workflow id.", "string"), query("tag", "Tag.", "string"), query("name", "Exact name.", "string"),
                     query_int("limit", "Page size, 1..=1000 (default 50).", 1, 1000), query("cursor", "next_cursor of the previous page.", "string")],
                None, merge(errors(&[]), "200", ok("A page.", page))),
        },
        "/tasks/batch": {
            "post": op("createTasks", "Submit tasks atomically; they may depend on each other by name", vec![],
                Some(body(json!({"type": "object", "additionalProperties": false, "required": ["tasks"], "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": 100000, "items": task_spec}}}))),
                merge(errors(&[("413", "Body too large.")]), "201", ok("Created.", json!({"type": "object", "properties": {"tasks": {"type": "array", "items": submitted}}})))),
        },
        "/tasks/{id}": {"get": op("getTask", "A task with its attempts", vec![path_id("task")], None,
            merge(errors(&[("404", "No such task.")]), "200", ok("The task.", task_with_attempts)))},
        "/tasks/{id}/logs": {"get": op("getTaskLogs", "Captured stdout/stderr, sliced by tail or offset/limit",
            vec![path_id("task"), query_int("attempt", "Only this attempt.", 1, u32::MAX as u64), json!({"name": "stream", "in": "query", "required": false, "description": "stdout or stderr.", "schema": {"type": "string", "enum": ["stdout", "stderr"]}}),
                 query_int("tail", "Last N bytes of each stream.", 0, u32::MAX as u64), query_int("offset", "Start offset.", 0, u32::MAX as u64), query_int("limit", "Most bytes per stream, 1..=1048576 (default 65536).", 1, 1 << 20)],
            None, merge(errors(&[("404", "No such task.")]), "200", ok("The output.", logs)))},
        "/tasks/{id}/cancel": {"post": op("cancelTask", "Cancel an unfinished task (its processes are stopped)", vec![path_id("task")], None,
            merge(errors(&[("404", "No such task."), ("409", "Already finished.")]), "200", ok("The task.", task_out.clone())))},
        "/tasks/{id}/retry": {"post": op("retryTask", "Run a failed, timed-out or cancelled task again", vec![path_id("task")], None,
            merge(errors(&[("404", "No such task."), ("409", "Not in a state that can be retried.")]), "200", ok("The task.", task_out.clone())))},
        "/tasks/{id}/approve": {"post": op("approveTask", "Approve a task waiting in awaiting_approval", vec![path_id("task")], Some(body(decision.clone())),
            merge(errors(&[("404", "No such task."), ("409", "Not awaiting approval.")]), "200", ok("The task.", task_out.clone())))},
        "/tasks/{id}/reject": {"post": op("rejectTask", "Reject a task waiting in awaiting_approval (it fails)", vec![path_id("task")], Some(body(decision)),
            merge(errors(&[("404", "No such task."), ("409", "Not awaiting approval.")]), "200", ok("The task.", task_out.clone())))},
        "/tasks/{id}/heartbeat": {"post": op("heartbeatTask", "Extend the lease of a claimed task", vec![path_id("task")],
            Some(body(worker(json!({"lease_seconds": {"type": ["integer", "null"], "minimum": 1, "maximum": 3600, "description": "1..=3600, default 300."}}), vec!["worker_id"]))),
            merge(errors(&[("404", "No such task."), ("409", "The worker does not hold the task.")]), "200",
                ok("The new lease.", json!({"type": "object", "properties": {"task_id": {"type": "string"}, "lease_expires_at": {"type": "string", "format": "date-time"}}}))))},
        "/tasks/{id}/complete": {"post": op("completeTask", "Complete a claimed task with its result output", vec![path_id("task")],
            Some(body(worker(json!({"output": {"description": "The result; must match the task's validation schema."}}), vec!["worker_id"]))),
            merge(errors(&[("404", "No such task."), ("409", "The worker does not hold the task.")]), "200", ok("The task.", task_out.clone())))},
        "/tasks/{id}/fail": {"post": op("failTask", "Fail a claimed task", vec![path_id("task")],
            Some(body(worker(json!({"error": {"type": "string", "minLength": 1, "maxLength": 16384}, "retryable": {"type": ["boolean", "null"], "description": "Default true."}}), vec!["worker_id", "error"]))),
            merge(errors(&[("404", "No such task."), ("409", "The worker does not hold the task.")]), "200", ok("The task.", task_out)))},
        "/workers/claim": {"post": op("claimTasks", "Claim ready external tasks under a lease", vec![], Some(body(claim_args)),
            merge(errors(&[]), "200", ok("The claimed tasks (possibly none).", json!({"type": "object", "properties": {"tasks": {"type": "array", "items": claimed}}}))))},
        "/workflows": {
            "post": op("createWorkflow", "Submit a workflow (checked as a whole; nothing is stored if it is rejected; 200 when an idempotency key named an earlier workflow)",
                vec![json!({"name": "Idempotency-Key", "in": "header", "required": false, "description": "Same as the workflow's idempotency_key: a repeat returns the first workflow.", "schema": {"type": "string"}})],
                Some(body(workflow_spec)),
                {
                    let mut r = merge(errors(&[("413", "Body too large.")]), "201", ok("Created.", wf_submitted.clone()));
                    r["200"] = ok("The workflow's key (or every task's) named an earlier workflow; that workflow is returned (created: false).", wf_submitted);
                    r
                }),
            "get": op("listWorkflows", "List workflows, newest first",
                vec![query("status", "running, succeeded, failed or cancelled.", "string"), query("project", "Project.", "string"),
                     query_int("limit", "Page size, 1..=1000 (default 50).", 1, 1000), query("cursor", "next_cursor of the previous page.", "string")],
                None, merge(errors(&[]), "200", ok("A page.", wf_page))),
        },
        "/workflows/{id}": {"get": op("getWorkflow", "A workflow with its tasks and edges", vec![path_id("workflow")], None,
            merge(errors(&[("404", "No such workflow.")]), "200", ok("The workflow.", wf_detail)))},
        "/workflows/{id}/graph": {"get": op("getWorkflowGraph", "The workflow's graph as Mermaid or DOT, nodes styled by status",
            vec![path_id("workflow"), query("format", "mermaid (default) or dot.", "string")], None,
            merge(errors(&[("404", "No such workflow.")]), "200", json!({"description": "The graph text.", "content": {"text/plain": {"schema": {"type": "string"}}, "text/vnd.graphviz": {"schema": {"type": "string"}}}})))},
        "/workflows/{id}/cancel": {"post": op("cancelWorkflow", "Cancel every unfinished task of a workflow", vec![path_id("workflow")], None,
            merge(errors(&[("404", "No such workflow."), ("409", "Already finished.")]), "200", ok("The workflow.", wf_record)))},
        "/search": {"get": op("searchTasks", "Search past tasks: ranked hits with score, matched fields and a snippet",
            vec![json!({"name": "q", "in": "query", "required": true, "description": "What to look for, in words or part of a task name.", "schema": {"type": "string"}}),
                 query("project", "Only this project.", "string"),
                 query("status", "succeeded, failed, timed_out or cancelled (repeat or comma-separate).", "string"),
                 query("tag", "Only tasks with this tag (repeat or comma-separate: all must match).", "string"),
                 query("since", "Finished at or after (RFC 3339).", "string"),
                 query("until", "Finished before (RFC 3339).", "string"),
                 query_int("limit", "Most hits, 1..=50 (default 10).", 1, 50)],
            None, merge(errors(&[]), "200", ok("The hits.", search_results)))},
        "/recommendations": {"get": op("recommend", "Advice from similar past tasks: success rate, durations, timeout, retry policy, neighbours, failures, artifacts",
            vec![query("name", "Task name.", "string"), query("command", "Command.", "string"),
                 query("description", "What it does.", "string"), query("project", "Project (its runs count first).", "string")],
            None, merge(errors(&[]), "200", ok("The recommendation.", recommendation)))},
        "/stats": {"get": op("queueStats", "Tasks and workflows by status, ready backlog, schedules, leases", vec![], None,
            merge(errors(&[]), "200", ok("The snapshot.", stats)))},
        "/events": {"get": op("events", "Server-Sent Events of task and workflow state changes; resumable with Last-Event-ID",
            vec![query("workflow_id", "Only this workflow.", "string"), query("project", "Only this project.", "string"),
                 query("after", "Start after this event id (default: now).", "integer"),
                 json!({"name": "Last-Event-ID", "in": "header", "required": false, "description": "Resume after this event id.", "schema": {"type": "string"}})],
            None, merge(errors(&[]), "200", json!({"description": "An event stream: `event: task|workflow`, `id: <seq>`, `data: <StreamEvent JSON>`.",
                "content": {"text/event-stream": {"schema": event}}})))},
        "/openapi.json": {"get": op("openapi", "This document", vec![], None, json!({"200": {"description": "The OpenAPI document.", "content": {"application/json": {"schema": {"type": "object"}}}}}))},
    });
    let mut paths = paths;
    add_links(&mut paths);
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "task-queue",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Durable task and workflow orchestration. Errors are {\"error\": {\"code\", \"message\", \"details\"}}.",
        },
        "servers": [{"url": "/api/v1"}],
        "paths": paths,
        "components": {"schemas": components},
    })
}
