// The TypeScript client against a running task-queue server.
//
//   TASK_QUEUE_URL=http://127.0.0.1:PORT TASK_QUEUE_TOKEN=tq_... \
//   TASK_QUEUE_VIEWER_TOKEN=tq_... npm test
//
// TASK_QUEUE_TOKEN must allow everything (admin); TASK_QUEUE_VIEWER_TOKEN is
// optional (a viewer token, to check that roles hold). The Rust test
// `sdk::typescript_client_against_the_server` starts the server and runs this.

import { test } from "node:test";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import http from "node:http";
import net from "node:net";

import {
  Client,
  Conflict,
  Forbidden,
  InvalidInput,
  NotFound,
  TaskQueueError,
  Unauthorized,
  Unavailable,
} from "../dist/index.js";

const URL_ = process.env.TASK_QUEUE_URL ?? "http://127.0.0.1:16080";
const TOKEN = process.env.TASK_QUEUE_TOKEN;
const VIEWER = process.env.TASK_QUEUE_VIEWER_TOKEN;
const q = new Client(URL_, { token: TOKEN, timeout: 30 });

const unique = (p) => `${p}-${randomUUID().slice(0, 8)}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function untilStatus(id, status) {
  for (let i = 0; i < 300; i++) {
    if ((await q.getTask(id)).task.status === status) return;
    await sleep(100);
  }
  assert.fail(`${id} never reached ${status}`);
}

test("submit, wait, logs and idempotency", async () => {
  const project = unique("ts");
  const key = unique("key");
  const spec = {
    name: "ts-hello",
    project,
    tags: ["sdk"],
    command: 'echo hello from typescript; echo \'{"answer": 42}\' > "$TASK_QUEUE_RESULT"',
  };
  const first = await q.submitTask(spec, key);
  assert.equal(first.created, true);
  const again = await q.submitTask(spec, key);
  assert.equal(again.id, first.id);
  assert.equal(again.created, false);
  const done = await q.waitForTask(first.id, 30);
  assert.equal(done.status, "succeeded");
  assert.deepEqual(done.result.output, { answer: 42 });
  const detail = await q.getTask(first.id);
  assert.equal(detail.attempts.length, 1);
  const logs = await q.taskLogs(first.id, { stream: "stdout" });
  assert.match(logs.logs[0].text, /hello from typescript/);
  const page = await q.listTasks({ project });
  assert.deepEqual(page.tasks.map((t) => t.id), [first.id]);
});

test("batch and paging", async () => {
  const project = unique("batch");
  const specs = Array.from({ length: 7 }, (_, i) => ({ name: `b${i}`, project, command: "true" }));
  specs[6].depends_on = ["b0"];
  const out = await q.submitTasks(specs);
  assert.equal(out.length, 7);
  const seen = new Set();
  for await (const t of q.iterTasks({ project }, 3)) seen.add(t.id);
  assert.deepEqual(seen, new Set(out.map((t) => t.id)));
  for (const t of out) assert.equal((await q.waitForTask(t.id, 30)).status, "succeeded");
});

test("bad input names the field; unknown ids are not found", async () => {
  const e = await q.submitTask({ name: "bad", command: "true", priority: "high" }).catch((e) => e);
  assert.ok(e instanceof InvalidInput, String(e));
  assert.ok(e instanceof TaskQueueError);
  assert.equal(e.status, 400);
  assert.equal(e.code, "invalid_input");
  assert.equal(e.field, "priority");
  const cycle = await q
    .submitWorkflow({
      name: "cyc",
      tasks: [
        { name: "a", command: "true", depends_on: ["b"] },
        { name: "b", command: "true", depends_on: ["a"] },
      ],
    })
    .catch((e) => e);
  assert.ok(cycle instanceof InvalidInput);
  assert.match(cycle.serverMessage, /cycle/);
  await assert.rejects(q.getTask(randomUUID()), NotFound);
  await assert.rejects(q.getWorkflow(randomUUID()), NotFound);
  // An id cannot change the route.
  await assert.rejects(q.getTask("../stats"), TaskQueueError);
});

test("a workflow with an approval, a key, its graph and its events", async () => {
  const project = unique("wf");
  const key = unique("release");
  const w = await q.submitWorkflow(
    {
      name: "ts-release",
      project,
      tasks: [
        { name: "build", command: "echo build" },
        { name: "gate", command: "true", requires_approval: true, depends_on: ["build"] },
        { name: "ship", command: "echo ship", depends_on: ["gate"] },
      ],
    },
    key,
  );
  assert.equal(w.created, true);
  const again = await q.submitWorkflow({ name: "ts-release", tasks: [{ name: "x", command: "true" }] }, key);
  assert.equal(again.created, false);
  assert.equal(again.workflow_id, w.workflow_id);
  assert.deepEqual(again.tasks.map((t) => t.name), ["build", "gate", "ship"]);
  const ids = Object.fromEntries(w.tasks.map((t) => [t.name, t.id]));

  const abort = new AbortController();
  const seen = [];
  const listening = (async () => {
    for await (const ev of q.events({ after: 0, workflowId: w.workflow_id, signal: abort.signal })) {
      seen.push(ev);
      if (ev.event === "workflow" && ev.data.to === "succeeded") return;
    }
  })();

  // The stream is closed whatever happens, so a failure cannot hang the run.
  const timer = setTimeout(() => abort.abort(), 60_000);
  try {
    await untilStatus(ids.gate, "awaiting_approval");
    const gate = await q.approveTask(ids.gate, { comment: "ok from typescript", by: "sdk-test" });
    assert.equal(gate.approval.comment, "ok from typescript");
    await assert.rejects(q.approveTask(ids.gate), Conflict);
    assert.equal((await q.waitForTask(ids.ship, 30)).status, "succeeded");
    await listening;
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
  assert.ok(
    seen.some((e) => e.event === "workflow" && e.data.to === "succeeded"),
    JSON.stringify(seen),
  );
  assert.ok(seen.every((e) => Number.isInteger(e.id)));

  const detail = await q.getWorkflow(w.workflow_id);
  assert.equal(detail.status, "succeeded");
  assert.equal(detail.idempotency_key, key);
  assert.match(await q.workflowGraph(w.workflow_id), /flowchart/);
  assert.match(await q.workflowGraph(w.workflow_id, "dot"), /digraph/);
  const listed = await q.listWorkflows({ project });
  assert.deepEqual(listed.workflows.map((x) => x.id), [w.workflow_id]);
});

test("reject, cancel and retry", async () => {
  const w = await q.submitWorkflow({
    name: unique("rej"),
    tasks: [{ name: "gate", command: "true", requires_approval: true }],
  });
  const gate = w.tasks[0].id;
  await untilStatus(gate, "awaiting_approval");
  assert.equal((await q.rejectTask(gate, { comment: "not now" })).status, "failed");
  assert.equal((await q.retryTask(gate)).status, "awaiting_approval");
  const sleeper = await q.submitTask({ name: "ts-sleep", command: "sleep 30" });
  assert.equal((await q.cancelTask(sleeper.id)).status, "cancelled");
  assert.equal((await q.cancelTask(sleeper.id)).status, "cancelled");
  const quick = await q.submitTask({ name: "ts-quick", command: "true" });
  await q.waitForTask(quick.id, 30);
  await assert.rejects(q.cancelTask(quick.id), Conflict);
  assert.equal((await q.cancelWorkflow(w.workflow_id)).status, "cancelled");
});

test("an external worker claims, heartbeats, completes and fails", async () => {
  const name = unique("review");
  const ok = await q.submitTask({
    name,
    kind: "external",
    validation: { type: "object", required: ["verdict"] },
  });
  const flaky = await q.submitTask({
    name,
    kind: "external",
    retry: { max_attempts: 2, initial_delay: "100ms" },
  });
  const worker = unique("ts-worker");
  const got = await q.claim(worker, { names: [name], leaseSeconds: 60, limit: 5 });
  assert.deepEqual(new Set(got.map((t) => t.task_id)), new Set([ok.id, flaky.id]));
  assert.ok(await q.heartbeat(ok.id, worker, 120));
  await assert.rejects(q.heartbeat(ok.id, "someone-else"), Conflict);
  await assert.rejects(q.complete(ok.id, worker, { no: "verdict" }), InvalidInput);
  const done = await q.complete(ok.id, worker, { verdict: "ship it" });
  assert.equal(done.status, "succeeded");
  assert.deepEqual(done.result.output, { verdict: "ship it" });
  assert.equal((await q.fail(flaky.id, worker, "flaky dependency", true)).status, "retrying");
  let again = [];
  for (let i = 0; i < 100 && again.length === 0; i++) {
    again = await q.claim(worker, { names: [name], leaseSeconds: 60 });
    if (again.length === 0) await sleep(100);
  }
  assert.equal(again[0].task_id, flaky.id);
  assert.equal(again[0].attempt, 2);
  assert.equal((await q.fail(flaky.id, worker, "still flaky", false)).status, "failed");
});

test("search, recommend, stats and health", async () => {
  const project = unique("hist");
  const t = await q.submitTask({ name: "deploy-api", project, command: "echo deploying the api" });
  await q.waitForTask(t.id, 30);
  let found;
  for (let i = 0; i < 100; i++) {
    found = await q.search("ship the backend", { project });
    if (found.hits.length) break;
    await sleep(100);
  }
  assert.equal(found.hits[0].task_id, t.id);
  const rec = await q.recommend({ name: "deploy-api", project });
  assert.ok(rec.similar.some((x) => x.task_id === t.id), JSON.stringify(rec));
  assert.ok("tasks" in (await q.stats()));
  assert.ok(["ok", "degraded"].includes((await q.health()).status));
});

test("base URLs and an unreachable server", { timeout: 60_000 }, async () => {
  assert.equal(new Client(URL_ + "/api/v1/").baseUrl, URL_);
  assert.throws(() => new Client("127.0.0.1:8080"), TypeError);
  const e = await new Client("http://127.0.0.1:9", { timeout: 2 }).stats().catch((e) => e);
  assert.ok(e instanceof Unavailable, String(e));
  assert.equal(e.status, 0);
  // A server that accepts the connection and never answers: a timeout.
  const held = [];
  const silent = net.createServer((sock) => held.push(sock));
  await new Promise((r) => silent.listen(0, "127.0.0.1", r));
  try {
    const port = silent.address().port;
    const t = await new Client(`http://127.0.0.1:${port}`, { timeout: 0.5 }).stats().catch((e) => e);
    assert.ok(t instanceof Unavailable, String(t));
    assert.equal(t.code, "timeout");
    // The event stream is bounded the same way while it connects.
    const quiet = new Client(`http://127.0.0.1:${port}`, { timeout: 0.5 });
    const started = Date.now();
    const ev = await (async () => {
      for await (const _ of quiet.events()) assert.fail("no event can come");
    })().catch((e) => e);
    assert.ok(ev instanceof Unavailable, String(ev));
    assert.equal(ev.code, "timeout");
    assert.ok(Date.now() - started < 10_000);
  } finally {
    held.forEach((sock) => sock.destroy());
    silent.close();
  }
  // A stream that answers and then goes quiet past the bound is broken;
  // without a bound it is waited for until the caller aborts it.
  const mute = http.createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/event-stream" });
    res.write(": connected\n\n");
  });
  await new Promise((r) => mute.listen(0, "127.0.0.1", r));
  try {
    const base = `http://127.0.0.1:${mute.address().port}`;
    const m = await (async () => {
      for await (const _ of new Client(base).events({ timeout: 0.5 })) assert.fail("no event");
    })().catch((e) => e);
    assert.ok(m instanceof Unavailable, String(m));
    assert.equal(m.code, "timeout");
    assert.match(m.message, /sent nothing on the event stream within 0.5 s/);
    const abort = new AbortController();
    setTimeout(() => abort.abort(), 700);
    const seen = [];
    for await (const e of new Client(base, { timeout: 0.2 }).events({ timeout: null, signal: abort.signal })) {
      seen.push(e);
    }
    assert.deepEqual(seen, [], "ended quietly by the signal, after the client's timeout had passed");
  } finally {
    mute.closeAllConnections();
    mute.close();
  }
  // `.` and `..` are ids like any other, not path steps.
  for (const odd of [".", ".."]) {
    const r = await q.getTask(odd).catch((e) => e);
    assert.ok(r instanceof TaskQueueError && [400, 404].includes(r.status), String(r));
  }
  // A header that is not ASCII is named before anything is sent.
  const h = await q.submitTask({ name: "h", command: "true" }, "clé").catch((e) => e);
  assert.ok(h instanceof InvalidInput, String(h));
  assert.equal(h.field, "Idempotency-Key");
});

test("roles hold", { skip: !(TOKEN && VIEWER) && "needs TASK_QUEUE_TOKEN and TASK_QUEUE_VIEWER_TOKEN" }, async () => {
  const viewer = new Client(URL_, { token: VIEWER });
  assert.ok("tasks" in (await viewer.listTasks({ limit: 1 })));
  const e = await viewer.submitTask({ name: "nope", command: "true" }).catch((e) => e);
  assert.ok(e instanceof Forbidden, String(e));
  assert.equal(e.status, 403);
  await assert.rejects(new Client(URL_).listTasks({ limit: 1 }), Unauthorized);
  await assert.rejects(new Client(URL_, { token: "tq_not_a_token" }).listTasks({ limit: 1 }), Unauthorized);
});
