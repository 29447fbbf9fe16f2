/**
 * A TypeScript client for the task-queue REST API (`/api/v1`).
 *
 * No dependencies: it uses the platform's `fetch` (Node.js 18+, browsers,
 * Deno, Bun). Every method is one HTTP request (`waitForTask` polls,
 * `iterTasks` pages, `events` streams) and resolves to the server's JSON
 * as docs/API.md describes it. Error answers reject with a
 * {@link TaskQueueError} subclass carrying the server's `code`, `message`
 * and `details`.
 *
 * ```ts
 * import { Client } from "task-queue-client";
 * const q = new Client("http://127.0.0.1:16080");
 * const t = await q.submitTask({ name: "hello", command: "echo hello" });
 * const done = await q.waitForTask(t.id, 30);
 * ```
 */

/** A JSON object as the server sends it. */
export type Json = { [key: string]: any };

/** The answer for one submitted task. */
export interface Submitted extends Json {
  id: string;
  name: string;
  /** False when an idempotency key named an earlier task. */
  created: boolean;
  status: string;
  workflow_id?: string;
  schedule_id?: string;
}

/** The answer for a submitted workflow. */
export interface WorkflowSubmitted extends Json {
  workflow_id: string;
  name: string;
  status: string;
  /** False when an idempotency key named an earlier workflow. */
  created: boolean;
  tasks: Submitted[];
  schedule_id?: string;
}

/** A task as stored (status, attempts, result, spec, times, ...). */
export interface TaskRecord extends Json {
  id: string;
  name: string;
  status: string;
}

/** One server-sent event of `GET /events`. */
export interface QueueEvent {
  /** The audit sequence number; pass it as `after` to resume. */
  id?: number;
  /** `task` or `workflow`. */
  event: string;
  data: Json;
}

/** Task statuses that do not change any more (unless the task is retried). */
export const TERMINAL_STATUSES: ReadonlySet<string> = new Set([
  "succeeded",
  "failed",
  "timed_out",
  "cancelled",
  "skipped",
]);

/** An error answer from the server (or none at all: `status` 0). */
export class TaskQueueError extends Error {
  readonly status: number;
  /** The server's stable error code (`invalid_input`, `not_found`, ...). */
  readonly code: string;
  readonly details: Json;

  constructor(status: number, code: string, message: string, details: Json = {}) {
    super(`${message} (HTTP ${status}, ${code})`);
    this.name = new.target.name;
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /** The field an `invalid_input` error names, if any. */
  get field(): string | undefined {
    return typeof this.details.field === "string" ? this.details.field : undefined;
  }

  /** The server's message without the status and code. */
  get serverMessage(): string {
    return this.message.replace(/ \(HTTP \d+, [^)]*\)$/, "");
  }
}

/** 400: the request named a field wrongly (see `field`). */
export class InvalidInput extends TaskQueueError {}
/** 401: no token, or one the server does not know. */
export class Unauthorized extends TaskQueueError {}
/** 403: the token's role does not allow this. */
export class Forbidden extends TaskQueueError {}
/** 404: no such task, workflow or endpoint. */
export class NotFound extends TaskQueueError {}
/** 409: the object is not in a state that allows this. */
export class Conflict extends TaskQueueError {}
/** 503 (or no answer): the server or its store cannot serve now; retry. */
export class Unavailable extends TaskQueueError {}

const BY_STATUS: Record<number, new (s: number, c: string, m: string, d?: Json) => TaskQueueError> = {
  400: InvalidInput,
  401: Unauthorized,
  403: Forbidden,
  404: NotFound,
  409: Conflict,
  502: Unavailable,
  503: Unavailable,
  504: Unavailable,
};

type Query = Record<string, string | number | boolean | string[] | undefined | null>;

export interface ClientOptions {
  /** An API token (`task-queue token create`), sent as `Authorization: Bearer`. */
  token?: string;
  /** Bound on each request, in seconds (default 30). */
  timeout?: number;
}

export interface TaskFilter {
  status?: string[];
  project?: string;
  workflow_id?: string;
  tag?: string;
  name?: string;
}

/** One path segment, percent-encoded so an id cannot change the route
 * (`.` and `..` included, which URL parsing would otherwise resolve). */
function seg(s: string): string {
  const out = encodeURIComponent(String(s));
  return out === "." || out === ".." ? out.replace(/\./g, "%2E") : out;
}

/** Headers must be Latin-1 text; say which one is not before `fetch` does. */
function checkHeaders(headers: Record<string, string>): void {
  for (const [k, v] of Object.entries(headers)) {
    if (!/^[\t\x20-\x7e\x80-\xff]*$/.test(v)) {
      throw new InvalidInput(0, "invalid_input", `the ${k} header must be visible ASCII`, { field: k });
    }
  }
}

/** A connection to one task-queue server. */
export class Client {
  readonly baseUrl: string;
  readonly token?: string;
  readonly timeout: number;

  /** `baseUrl` is `http(s)://host:port`; a trailing `/api/v1` is accepted. */
  constructor(baseUrl: string, options: ClientOptions = {}) {
    let url = baseUrl.replace(/\/+$/, "");
    if (url.endsWith("/api/v1")) url = url.slice(0, -"/api/v1".length);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      throw new TypeError(`baseUrl must be http(s)://host[:port], got ${JSON.stringify(baseUrl)}`);
    }
    if (!["http:", "https:"].includes(parsed.protocol) || !parsed.host) {
      throw new TypeError(`baseUrl must be http(s)://host[:port], got ${JSON.stringify(baseUrl)}`);
    }
    this.baseUrl = url;
    this.token = options.token;
    this.timeout = options.timeout ?? 30;
  }

  // -- plumbing ---------------------------------------------------------

  private async request(
    method: string,
    path: string,
    opts: { query?: Query; body?: unknown; headers?: Record<string, string>; timeout?: number | null } = {},
  ): Promise<Response> {
    const url = new URL(this.baseUrl + path);
    for (const [k, v] of Object.entries(opts.query ?? {})) {
      if (v === undefined || v === null) continue;
      if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, String(x)));
      else url.searchParams.append(k, String(v));
    }
    const headers: Record<string, string> = { Accept: "application/json", ...(opts.headers ?? {}) };
    let body: string | undefined;
    if (opts.body !== undefined) {
      body = JSON.stringify(opts.body);
      headers["Content-Type"] = "application/json";
    }
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    checkHeaders(headers);
    const timeout = opts.timeout === undefined ? this.timeout : opts.timeout;
    let resp: Response;
    try {
      resp = await fetch(url, {
        method,
        headers,
        body,
        signal: timeout === null ? undefined : AbortSignal.timeout(timeout * 1000),
      });
    } catch (e) {
      throw this.noAnswer(e);
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp;
  }

  /** A request that got no usable answer: a timeout or a lost connection. */
  private noAnswer(e: unknown): Unavailable {
    const name = (e as Error)?.name;
    if (name === "TimeoutError") {
      return new Unavailable(0, "timeout", `${this.baseUrl} did not answer within ${this.timeout} s`);
    }
    return new Unavailable(0, "unreachable", `cannot reach ${this.baseUrl}: ${(e as Error)?.message ?? e}`);
  }

  /** The body's text, with a broken or slow body reported like no answer. */
  private async text(resp: Response): Promise<string> {
    try {
      return await resp.text();
    } catch (e) {
      throw this.noAnswer(e);
    }
  }

  private async json<T>(method: string, path: string, opts: Parameters<Client["request"]>[2] = {}): Promise<T> {
    const resp = await this.request(method, path, opts);
    const text = await this.text(resp);
    try {
      return (text ? JSON.parse(text) : null) as T;
    } catch {
      throw new TaskQueueError(resp.status, "bad_response", `the answer to ${method} ${path} is not JSON`);
    }
  }

  private get<T>(path: string, query?: Query): Promise<T> {
    return this.json<T>("GET", path, { query });
  }

  private post<T>(path: string, body: unknown = {}, headers?: Record<string, string>): Promise<T> {
    return this.json<T>("POST", path, { body, headers });
  }

  // -- tasks ------------------------------------------------------------

  /** Submits one task spec. With an idempotency key (argument or spec
   * field) a repeat resolves to the first task with `created` false. */
  submitTask(spec: Json, idempotencyKey?: string): Promise<Submitted> {
    return this.post("/api/v1/tasks", spec, idempotencyKey ? { "Idempotency-Key": idempotencyKey } : undefined);
  }

  /** Submits tasks atomically (they may depend on each other by name). */
  async submitTasks(specs: Json[]): Promise<Submitted[]> {
    return (await this.post<{ tasks: Submitted[] }>("/api/v1/tasks/batch", { tasks: specs })).tasks;
  }

  /** `{task, attempts}` for one task. */
  getTask(id: string): Promise<{ task: TaskRecord; attempts: Json[] }> {
    return this.get(`/api/v1/tasks/${seg(id)}`);
  }

  /** One page, newest first. */
  listTasks(filter: TaskFilter & { limit?: number; cursor?: string } = {}): Promise<{ tasks: TaskRecord[]; next_cursor?: string }> {
    return this.get("/api/v1/tasks", { ...filter });
  }

  /** Every task matching `filter`, page by page. */
  async *iterTasks(filter: TaskFilter = {}, pageSize = 100): AsyncGenerator<TaskRecord> {
    let cursor: string | undefined;
    for (;;) {
      const page = await this.listTasks({ ...filter, limit: pageSize, cursor });
      yield* page.tasks;
      cursor = page.next_cursor;
      if (!cursor) return;
    }
  }

  /** Captured output: `{task_id, logs: [{attempt, stream, text, ...}]}`. */
  taskLogs(
    id: string,
    opts: { attempt?: number; stream?: "stdout" | "stderr"; tail?: number; offset?: number; limit?: number } = {},
  ): Promise<Json> {
    return this.get(`/api/v1/tasks/${seg(id)}/logs`, { ...opts });
  }

  /** Polls until the task is finished or `timeout` seconds pass; resolves
   * to its last state either way (check `status`). */
  async waitForTask(id: string, timeout = 60): Promise<TaskRecord> {
    const deadline = Date.now() + timeout * 1000;
    let pause = 50;
    for (;;) {
      const { task } = await this.getTask(id);
      const left = deadline - Date.now();
      if (TERMINAL_STATUSES.has(task.status) || left <= 0) return task;
      await new Promise((r) => setTimeout(r, Math.min(pause, left)));
      pause = Math.min(pause * 2, 1000);
    }
  }

  /** Cancels an unfinished task (its processes are stopped). */
  async cancelTask(id: string): Promise<TaskRecord> {
    return (await this.post<{ task: TaskRecord }>(`/api/v1/tasks/${seg(id)}/cancel`)).task;
  }

  /** Runs a failed, timed-out or cancelled task again. */
  async retryTask(id: string): Promise<TaskRecord> {
    return (await this.post<{ task: TaskRecord }>(`/api/v1/tasks/${seg(id)}/retry`)).task;
  }

  /** Approves a task waiting in `awaiting_approval`. */
  approveTask(id: string, opts: { comment?: string; by?: string } = {}): Promise<TaskRecord> {
    return this.decide(id, "approve", opts);
  }

  /** Rejects a task waiting in `awaiting_approval` (it fails). */
  rejectTask(id: string, opts: { comment?: string; by?: string } = {}): Promise<TaskRecord> {
    return this.decide(id, "reject", opts);
  }

  private async decide(id: string, op: string, opts: { comment?: string; by?: string }): Promise<TaskRecord> {
    return (await this.post<{ task: TaskRecord }>(`/api/v1/tasks/${seg(id)}/${op}`, { ...opts })).task;
  }

  // -- external workers -------------------------------------------------

  /** Takes up to `limit` external tasks for `workerId`; each comes with its
   * `spec`, `attempt` and `lease_expires_at`. */
  async claim(
    workerId: string,
    opts: { names?: string[]; project?: string; tags?: string[]; leaseSeconds?: number; limit?: number } = {},
  ): Promise<Json[]> {
    const body: Json = { worker_id: workerId, lease_seconds: opts.leaseSeconds ?? 300, limit: opts.limit ?? 1 };
    if (opts.names?.length) body.names = opts.names;
    if (opts.tags?.length) body.tags = opts.tags;
    if (opts.project !== undefined) body.project = opts.project;
    return (await this.post<{ tasks: Json[] }>("/api/v1/workers/claim", body)).tasks;
  }

  /** Extends a claimed task's lease; resolves to when it now expires. */
  async heartbeat(id: string, workerId: string, leaseSeconds = 300): Promise<string> {
    const out = await this.post<{ lease_expires_at: string }>(`/api/v1/tasks/${seg(id)}/heartbeat`, {
      worker_id: workerId,
      lease_seconds: leaseSeconds,
    });
    return out.lease_expires_at;
  }

  /** Reports a claimed task done with its output (checked against the
   * task's `validation` schema). */
  async complete(id: string, workerId: string, output?: unknown): Promise<TaskRecord> {
    const body: Json = { worker_id: workerId };
    if (output !== undefined) body.output = output;
    return (await this.post<{ task: TaskRecord }>(`/api/v1/tasks/${seg(id)}/complete`, body)).task;
  }

  /** Reports a claimed task failed; `retryable` lets its retry policy run it again. */
  async fail(id: string, workerId: string, error: string, retryable = true): Promise<TaskRecord> {
    return (
      await this.post<{ task: TaskRecord }>(`/api/v1/tasks/${seg(id)}/fail`, {
        worker_id: workerId,
        error,
        retryable,
      })
    ).task;
  }

  // -- workflows --------------------------------------------------------

  /** Submits a workflow (`{name, tasks, ...}`; checked as a whole). With an
   * idempotency key a repeat resolves to the first workflow, `created` false. */
  submitWorkflow(spec: Json, idempotencyKey?: string): Promise<WorkflowSubmitted> {
    return this.post("/api/v1/workflows", spec, idempotencyKey ? { "Idempotency-Key": idempotencyKey } : undefined);
  }

  /** The workflow with `counts`, `tasks` and `edges`. */
  getWorkflow(id: string): Promise<Json> {
    return this.get(`/api/v1/workflows/${seg(id)}`);
  }

  /** One page, newest first. */
  listWorkflows(opts: { status?: string[]; project?: string; limit?: number; cursor?: string } = {}): Promise<{
    workflows: Json[];
    next_cursor?: string;
  }> {
    return this.get("/api/v1/workflows", { ...opts });
  }

  /** The workflow's graph as Mermaid or DOT text. */
  async workflowGraph(id: string, format: "mermaid" | "dot" = "mermaid"): Promise<string> {
    const resp = await this.request("GET", `/api/v1/workflows/${seg(id)}/graph`, { query: { format } });
    return this.text(resp);
  }

  /** Cancels every unfinished task of a workflow. */
  cancelWorkflow(id: string): Promise<Json> {
    return this.post(`/api/v1/workflows/${seg(id)}/cancel`);
  }

  // -- history, stats, events ------------------------------------------

  /** Past tasks ranked for `q`: `{hits: [{score, why, ...}], ...}`. */
  search(
    q: string,
    opts: { project?: string; status?: string; tag?: string; since?: string; until?: string; limit?: number } = {},
  ): Promise<Json> {
    return this.get("/api/v1/search", { q, ...opts });
  }

  /** Advice from similar past tasks. */
  recommend(opts: { name?: string; command?: string; description?: string; project?: string }): Promise<Json> {
    return this.get("/api/v1/recommendations", { ...opts });
  }

  /** Queue counts by status and the engine's state. */
  stats(): Promise<Json> {
    return this.get("/api/v1/stats");
  }

  /** `/health`; a server that is not ready rejects with {@link Unavailable}. */
  health(): Promise<Json> {
    return this.get("/health");
  }

  /** Task and workflow events as they happen (`GET /events`, SSE). Ends
   * when the server closes the stream or `signal` aborts it; a stream that
   * breaks rejects with {@link Unavailable}. `timeout` (seconds, default
   * the client's) bounds the connection and each wait for data, as the
   * Python client's does: the server sends a keep-alive every 15 s, so a
   * stream quiet for longer than that is broken (code `timeout`). `null`
   * waits for data without a bound. */
  async *events(
    opts: {
      after?: number;
      workflowId?: string;
      project?: string;
      signal?: AbortSignal;
      timeout?: number | null;
    } = {},
  ): AsyncGenerator<QueueEvent> {
    const url = new URL(this.baseUrl + "/api/v1/events");
    if (opts.after !== undefined) url.searchParams.set("after", String(opts.after));
    if (opts.workflowId) url.searchParams.set("workflow_id", opts.workflowId);
    if (opts.project) url.searchParams.set("project", opts.project);
    const headers: Record<string, string> = { Accept: "text/event-stream" };
    if (this.token) headers.Authorization = `Bearer ${this.token}`;
    const limit = opts.timeout === undefined ? this.timeout : opts.timeout;
    if (opts.signal?.aborted) return;
    // One controller for the request and its body: the caller's signal
    // aborts it, and so does a wait that outlasts `limit`.
    const ctl = new AbortController();
    const onAbort = () => ctl.abort();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    let timedOut = false;
    const bounded = <T>(p: Promise<T>): Promise<T> => {
      if (limit === null) return p;
      const timer = setTimeout(() => {
        timedOut = true;
        ctl.abort();
      }, limit * 1000);
      return p.finally(() => clearTimeout(timer));
    };
    const failure = (e: unknown, what: string): Unavailable =>
      timedOut
        ? new Unavailable(0, "timeout", `${this.baseUrl} ${what} within ${limit} s`)
        : this.noAnswer(e);
    let resp: Response;
    try {
      resp = await bounded(fetch(url, { headers, signal: ctl.signal }));
    } catch (e) {
      opts.signal?.removeEventListener("abort", onAbort);
      if (opts.signal?.aborted) return;
      throw failure(e, "did not answer");
    }
    if (!resp.ok || !resp.body) {
      opts.signal?.removeEventListener("abort", onAbort);
      if (!resp.ok) throw await errorOf(resp);
      return;
    }
    const decoder = new TextDecoder();
    let buffer = "";
    let event: Partial<QueueEvent> = {};
    let data: string[] = [];
    const reader = resp.body.getReader();
    try {
      for (;;) {
        let chunk: ReadableStreamReadResult<Uint8Array>;
        try {
          chunk = await bounded(reader.read());
        } catch (e) {
          if (opts.signal?.aborted) return;
          throw failure(e, "sent nothing on the event stream");
        }
        const { value, done } = chunk;
        if (done) return;
        buffer += decoder.decode(value, { stream: true });
        let nl: number;
        while ((nl = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, nl).replace(/\r$/, "");
          buffer = buffer.slice(nl + 1);
          if (line === "") {
            if (data.length) {
              const text = data.join("\n");
              let parsed: Json;
              try {
                parsed = JSON.parse(text);
              } catch {
                parsed = { text };
              }
              yield { id: event.id, event: event.event ?? "message", data: parsed };
            }
            event = {};
            data = [];
            continue;
          }
          if (line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const key = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (key === "data") data.push(value);
          else if (key === "id") event.id = /^\d+$/.test(value) ? Number(value) : undefined;
          else if (key === "event") event.event = value;
        }
      }
    } finally {
      opts.signal?.removeEventListener("abort", onAbort);
      await reader.cancel().catch(() => undefined);
    }
  }
}

/** The server's `{"error": {code, message, details}}` as an error. */
async function errorOf(resp: Response): Promise<TaskQueueError> {
  let err: Json = {};
  try {
    const body = await resp.json();
    if (body && typeof body.error === "object" && body.error !== null) err = body.error;
  } catch {
    // not JSON: keep the status
  }
  const Cls = BY_STATUS[resp.status] ?? TaskQueueError;
  const details: Json = typeof err.details === "object" && err.details !== null ? err.details : {};
  return new Cls(resp.status, String(err.code ?? "http"), String(err.message ?? `HTTP ${resp.status}`), details);
}
