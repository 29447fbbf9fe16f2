"""End-to-end MCP scenario against the real task-queue binary, with the
official Python client (`pip install 'mcp>=2.3,<3'`).

    python3 tests/mcp/scenario.py stdio BIN DB CONFIG TOOLS_SCHEMA
    python3 tests/mcp/scenario.py http URL TOOLS_SCHEMA
    python3 tests/mcp/scenario.py sse URL TOOLS_SCHEMA

Prints one JSON line with what it checked; exits non-zero on the first
failed check (with the reason on stderr).
"""

import asyncio
import json
import os
import sys
import uuid

from mcp import Client, StdioServerParameters


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr, flush=True)
        os._exit(1)


def text_of(result):
    return " ".join(getattr(c, "text", "") for c in result.content)


async def call(c, name, args, **kw):
    return await c.call_tool(name, args, **kw)


async def scenario(c, tools_schema_path, transport):
    report = {"transport": transport}

    # The tool list is exactly tools.schema.
    listed = await c.list_tools()
    with open(tools_schema_path) as f:
        expected = json.load(f)["tools"]
    served = {t.name: t.model_dump(by_alias=True, exclude_none=True) for t in listed.tools}
    check(sorted(served) == sorted(t["name"] for t in expected), f"tool names {sorted(served)}")
    for t in expected:
        s = served[t["name"]]
        for key in ("description", "inputSchema", "outputSchema", "annotations", "title"):
            check(s.get(key) == t.get(key), f"{t['name']}.{key} differs from tools.schema")
    report["tools"] = len(served)

    templates = await c.list_resource_templates()
    uris = sorted(t.uri_template for t in templates.resource_templates)
    check(uris == ["task://{id}", "workflow://{id}"], f"resource templates {uris}")

    # A workflow with an approval gate and an external review step.
    release = {
        "name": "mcp-release",
        "project": "mcp-e2e",
        # One key per run: the scenario runs once per transport on one server.
        "idempotency_key": f"mcp-release-{uuid.uuid4()}",
        "tasks": [
            {"name": "build", "command": "echo building the release; sleep 1; "
                                         "echo '{\"version\": \"2.0.0\"}' > \"$TASK_QUEUE_RESULT\""},
            {"name": "gate", "command": "echo approved", "requires_approval": True,
             "depends_on": ["build"]},
            {"name": "deploy", "command": "echo deployed", "depends_on": ["gate"]},
            {"name": "review", "kind": "external", "description": "review the release notes",
             "depends_on": ["build"], "validation": {"type": "object", "required": ["verdict"]}},
        ],
    }
    r = await call(c, "submit_workflow", release)
    check(not r.is_error, f"submit_workflow: {text_of(r)}")
    wf = r.structured_content
    ids = {t["name"]: t["id"] for t in wf["tasks"]}
    check(len(ids) == 4, f"four tasks: {wf}")
    check(wf["created"] is True, f"created: {wf}")

    # Submitted again with its key (an agent retrying a lost answer): the
    # same workflow and tasks, nothing new.
    r = await call(c, "submit_workflow", release)
    check(not r.is_error, f"submit_workflow again: {text_of(r)}")
    again = r.structured_content
    check(again["workflow_id"] == wf["workflow_id"] and again["created"] is False,
          f"the first workflow answers: {again}")
    check({t["name"]: t["id"] for t in again["tasks"]} == ids, f"the same tasks: {again}")
    check("already submitted" in text_of(r), f"text says so: {text_of(r)}")

    # Wait for the build with progress notifications.
    progress = []

    async def on_progress(value, total, message):
        progress.append(message)

    r = await call(c, "wait_for_task", {"id": ids["build"], "timeout_seconds": 30},
                   progress_callback=on_progress)
    check(not r.is_error, f"wait_for_task: {text_of(r)}")
    check(r.structured_content["done"] is True, f"build finished: {r.structured_content}")
    check(r.structured_content["task"]["status"] == "succeeded", "build succeeded")
    check(r.structured_content["task"]["result"]["output"] == {"version": "2.0.0"}, "build output")
    check(len(progress) >= 1, f"progress notifications: {progress}")
    report["progress_messages"] = progress

    # A short wait that runs out returns the current state, not an error.
    r = await call(c, "wait_for_task", {"id": ids["deploy"], "timeout_seconds": 1})
    check(not r.is_error and r.structured_content["done"] is False, f"short wait: {text_of(r)}")

    r = await call(c, "get_task_logs", {"id": ids["build"], "stream": "stdout", "tail": 100})
    check(not r.is_error, f"get_task_logs: {text_of(r)}")
    check("building the release" in r.structured_content["logs"][0]["text"], "build log")

    r = await call(c, "get_workflow", {"id": wf["workflow_id"]})
    check(not r.is_error, f"get_workflow: {text_of(r)}")
    check("flowchart TD" in r.structured_content["graph"], "mermaid graph")
    check(r.structured_content["status"] == "running", "workflow running")

    # The gate waits for approval; approve it and deploy runs.
    for _ in range(100):
        r = await call(c, "get_task", {"id": ids["gate"], "include_attempts": False})
        if r.structured_content["task"]["status"] == "awaiting_approval":
            break
        await asyncio.sleep(0.1)
    check(r.structured_content["task"]["status"] == "awaiting_approval", "gate awaits approval")
    r = await call(c, "approve_task", {"id": ids["gate"], "approve": True, "comment": "looks good"})
    check(not r.is_error, f"approve_task: {text_of(r)}")
    r = await call(c, "wait_for_task", {"id": ids["deploy"], "timeout_seconds": 30})
    check(r.structured_content["task"]["status"] == "succeeded", f"deploy: {text_of(r)}")

    # The external review: claim, a refused output, then complete.
    r = await call(c, "claim_task", {"worker_id": f"py-agent-{transport}", "names": ["review"],
                                     "lease_seconds": 60})
    check(not r.is_error, f"claim_task: {text_of(r)}")
    claimed = r.structured_content["tasks"]
    check(len(claimed) == 1 and claimed[0]["task_id"] == ids["review"], f"claimed {claimed}")
    check(claimed[0]["spec"]["description"] == "review the release notes", "spec comes along")
    r = await call(c, "heartbeat_task", {"id": ids["review"], "worker_id": f"py-agent-{transport}"})
    check(not r.is_error, f"heartbeat_task: {text_of(r)}")
    r = await call(c, "complete_task", {"id": ids["review"], "worker_id": f"py-agent-{transport}",
                                        "output": {"notes": "fine"}})
    check(r.is_error and "output" in text_of(r), f"invalid output refused: {text_of(r)}")
    r = await call(c, "complete_task", {"id": ids["review"], "worker_id": f"py-agent-{transport}",
                                        "output": {"verdict": "approve"}})
    check(not r.is_error and r.structured_content["task"]["status"] == "succeeded",
          f"complete_task: {text_of(r)}")

    r = await call(c, "get_workflow", {"id": wf["workflow_id"], "graph": "none"})
    check(r.structured_content["status"] == "succeeded", f"workflow succeeded: {text_of(r)}")

    # A failing external task, failed for good.
    r = await call(c, "submit_task", {"name": "label", "kind": "external", "project": "mcp-e2e",
                                      "retry": {"max_attempts": 1}})
    check(not r.is_error and r.structured_content["created"], f"submit_task: {text_of(r)}")
    label = r.structured_content["id"]
    r = await call(c, "claim_task", {"worker_id": "py-2", "names": ["label"]})
    check(len(r.structured_content["tasks"]) == 1, "claimed label")
    r = await call(c, "fail_task", {"id": label, "worker_id": "py-2", "error": "no labels today",
                                    "retryable": False})
    check(r.structured_content["task"]["status"] == "failed", f"fail_task: {text_of(r)}")
    r = await call(c, "retry_task", {"id": label})
    check(r.structured_content["task"]["status"] == "queued", f"retry_task: {text_of(r)}")
    r = await call(c, "cancel_task", {"id": label})
    check(r.structured_content["task"]["status"] == "cancelled", f"cancel_task: {text_of(r)}")

    # Bad input and unknown ids are tool errors that say what to fix.
    bad = [
        ("get_task", {"id": "nope"}, "invalid id"),
        ("get_task", {"id": "0193b0c2-0000-7000-8000-000000000000"}, "not found"),
        ("submit_task", {"name": "x", "command": "true", "priority": 500}, "priority"),
        ("submit_task", {"name": "x", "command": "true", "colour": "red"}, "colour"),
        ("submit_workflow", {"name": "w", "tasks": [
            {"name": "a", "command": "true", "depends_on": ["b"]},
            {"name": "b", "command": "true", "depends_on": ["a"]}]}, "cycle: "),
        ("wait_for_task", {"id": label, "timeout_seconds": 500}, "timeout_seconds"),
        ("approve_task", {"id": label, "approve": True}, "not awaiting_approval"),
        ("get_task_logs", {"id": label, "stream": "stdin"}, "stream"),
        ("search_tasks", {"query": "\"*"}, "query"),
        ("search_tasks", {"query": "deploy", "limit": 500}, "limit"),
        ("recommend", {}, "name"),
    ]
    for name, args, needle in bad:
        r = await call(c, name, args)
        check(r.is_error, f"{name} {args} should be an error")
        check(needle in text_of(r), f"{name}: wanted {needle!r} in {text_of(r)!r}")
    report["error_cases"] = len(bad)

    r = await call(c, "queue_stats", {})
    check(not r.is_error and r.structured_content["tasks"].get("succeeded", 0) >= 4,
          f"queue_stats: {text_of(r)}")

    rr = await c.read_resource(f"task://{ids['deploy']}")
    doc = json.loads(rr.contents[0].text)
    check(doc["task"]["status"] == "succeeded", "task resource")
    rr = await c.read_resource(f"workflow://{wf['workflow_id']}")
    doc = json.loads(rr.contents[0].text)
    check(doc["status"] == "succeeded" and "flowchart" in doc["graph"], "workflow resource")
    report["ok"] = True
    return report


def check_capabilities(caps):
    """Tools and resources; never the deprecated logging capability."""
    check(caps.tools is not None and caps.resources is not None, f"capabilities {caps}")
    check(caps.logging is None, f"logging must not be advertised: {caps}")


async def roles(url, viewer, worker, operator):
    """Each tool checks the role of the token that called it."""
    from mcp import ClientSession
    from mcp.client.streamable_http import create_mcp_http_client, streamable_http_client

    async def session_with(token, body):
        http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"})
        async with http:
            async with streamable_http_client(url, http_client=http) as streams:
                r, w = streams[0], streams[1]
                async with ClientSession(r, w) as s:
                    await s.initialize()
                    return await body(s)

    report = {}

    async def as_viewer(s):
        tools = await s.list_tools()
        check(len(tools.tools) >= 17, "a viewer lists every tool")
        stats = await s.call_tool("queue_stats", {})
        check(not stats.is_error, f"a viewer reads stats: {text_of(stats)}")
        sub = await s.call_tool("submit_task", {"name": "nope", "command": "true"})
        check(sub.is_error and "operator" in text_of(sub), f"a viewer cannot submit: {text_of(sub)}")
        claim = await s.call_tool("claim_task", {"worker_id": "v"})
        check(claim.is_error and "worker" in text_of(claim), f"a viewer cannot claim: {text_of(claim)}")
        report["viewer_denied"] = text_of(sub)

    async def as_worker(s):
        claim = await s.call_tool("claim_task", {"worker_id": "w", "names": ["nothing-*"]})
        check(not claim.is_error, f"a worker claims: {text_of(claim)}")
        sub = await s.call_tool("submit_task", {"name": "nope", "command": "true"})
        check(sub.is_error and "operator" in text_of(sub), f"a worker cannot submit: {text_of(sub)}")

    async def as_operator(s):
        sub = await s.call_tool("submit_task", {"name": "allowed", "kind": "external"})
        check(not sub.is_error, f"an operator submits: {text_of(sub)}")
        report["operator_submitted"] = sub.structured_content["id"]

    await session_with(viewer, as_viewer)
    await session_with(worker, as_worker)
    await session_with(operator, as_operator)
    report["ok"] = True
    return report


async def main():
    kind = sys.argv[1]
    if kind == "roles":
        url, viewer, worker, operator = sys.argv[2:6]
        print(json.dumps(await roles(url, viewer, worker, operator)))
        return
    if kind == "stdio":
        binary, db, config, schema = sys.argv[2:6]
        target = StdioServerParameters(command=binary, args=["--db", db, "--config", config, "mcp"])
        async with Client(target) as c:
            check_capabilities(c.server_capabilities)
            report = await scenario(c, schema, "stdio")
    elif kind == "http":
        url, schema = sys.argv[2:4]
        async with Client(url) as c:
            check_capabilities(c.server_capabilities)
            report = await scenario(c, schema, "http")
    elif kind == "sse":
        from mcp import ClientSession
        from mcp.client.sse import sse_client

        url, schema = sys.argv[2:4]
        async with sse_client(url) as (r, w):
            async with ClientSession(r, w) as s:
                init = await s.initialize()
                check_capabilities(init.capabilities)
                report = await scenario(s, schema, "sse")
    else:
        raise SystemExit(f"unknown transport {kind}")
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main())
