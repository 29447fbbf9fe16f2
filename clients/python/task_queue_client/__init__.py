"""A Python client for the task-queue REST API (``/api/v1``).

Standard library only. Every method is one HTTP request (``wait_for_task``
polls, ``iter_tasks`` pages, ``events`` streams) and returns the server's
JSON as plain ``dict``/``list`` values, as docs/API.md describes them.
Errors come back as :class:`TaskQueueError` subclasses that carry the
server's ``code``, ``message`` and ``details``::

    from task_queue_client import Client

    q = Client("http://127.0.0.1:16080", token=None)
    t = q.submit_task({"name": "hello", "command": "echo hello"})
    done = q.wait_for_task(t["id"], timeout=30)
    print(done["status"], q.task_logs(t["id"], stream="stdout")["logs"][0]["text"])
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterator, List, Optional

__all__ = [
    "Client",
    "TaskQueueError",
    "InvalidInput",
    "Unauthorized",
    "Forbidden",
    "NotFound",
    "Conflict",
    "Unavailable",
    "TERMINAL_STATUSES",
]

__version__ = "0.1.0"

#: Task statuses that do not change any more (unless the task is retried).
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "timed_out", "cancelled", "skipped"})


class TaskQueueError(Exception):
    """An error answer from the server (or none at all: ``status`` 0).

    ``code`` is the server's stable error code (``invalid_input``,
    ``not_found``, ``conflict``, ...), ``details`` its details object (for
    ``invalid_input``, ``details["field"]`` names the field at fault).
    """

    def __init__(self, status: int, code: str, message: str, details: Optional[Dict[str, Any]] = None):
        super().__init__(f"{message} (HTTP {status}, {code})")
        self.status = status
        self.code = code
        self.message = message
        self.details = details or {}

    @property
    def field(self) -> Optional[str]:
        """The field an ``invalid_input`` error names, if any."""
        f = self.details.get("field")
        return f if isinstance(f, str) else None


class InvalidInput(TaskQueueError):
    """400: the request named a field wrongly (see :attr:`field`)."""


class Unauthorized(TaskQueueError):
    """401: no token, or one the server does not know."""


class Forbidden(TaskQueueError):
    """403: the token's role does not allow this."""


class NotFound(TaskQueueError):
    """404: no such task, workflow or endpoint."""


class Conflict(TaskQueueError):
    """409: the object is not in a state that allows this."""


class Unavailable(TaskQueueError):
    """503 (or no answer): the server or its store cannot serve now; retry."""


_BY_STATUS = {
    400: InvalidInput,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    502: Unavailable,
    503: Unavailable,
    504: Unavailable,
}

# What a request that got no usable answer raises below the HTTP layer.
_NO_ANSWER = (OSError, http.client.HTTPException)


def _seg(s: str) -> str:
    """One path segment, percent-encoded so an id cannot change the route
    (``.`` and ``..`` included)."""
    out = urllib.parse.quote(str(s), safe="")
    return out.replace(".", "%2E") if out in (".", "..") else out


class Client:
    """A connection to one task-queue server.

    ``base_url`` is the server's address (``http://host:port``; a trailing
    ``/api/v1`` is accepted). ``token`` is an API token (``task-queue token
    create``), sent as ``Authorization: Bearer``; a server bound to
    127.0.0.1 without auth needs none. ``timeout`` bounds each request, in
    seconds.
    """

    def __init__(self, base_url: str, token: Optional[str] = None, timeout: float = 30.0):
        url = base_url.rstrip("/")
        if url.endswith("/api/v1"):
            url = url[: -len("/api/v1")]
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"base_url must be http(s)://host[:port], got {base_url!r}")
        self.base_url = url
        self.token = token
        self.timeout = timeout

    # -- plumbing ---------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        query: Optional[Dict[str, Any]] = None,
        body: Any = None,
        headers: Optional[Dict[str, str]] = None,
        timeout: Optional[float] = None,
    ):
        url = self.base_url + path
        if query:
            pairs = []
            for k, v in query.items():
                if v is None:
                    continue
                if isinstance(v, (list, tuple)):
                    pairs.extend((k, str(x)) for x in v)
                elif isinstance(v, bool):
                    pairs.append((k, "true" if v else "false"))
                else:
                    pairs.append((k, str(v)))
            if pairs:
                url += "?" + urllib.parse.urlencode(pairs)
        data = None
        req_headers = {"Accept": "application/json"}
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            req_headers["Content-Type"] = "application/json"
        if self.token:
            req_headers["Authorization"] = f"Bearer {self.token}"
        req_headers.update(headers or {})
        req = urllib.request.Request(url, data=data, method=method, headers=req_headers)
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as e:
            raise self._error(e.code, e.read()) from None
        except urllib.error.URLError as e:
            raise self._no_answer(e.reason) from None
        except _NO_ANSWER as e:
            raise self._no_answer(e) from None

    def _no_answer(self, why) -> "Unavailable":
        if isinstance(why, (socket.timeout, TimeoutError)):
            return Unavailable(0, "timeout", f"{self.base_url} did not answer within the timeout")
        return Unavailable(0, "unreachable", f"cannot reach {self.base_url}: {why}")

    @staticmethod
    def _error(status: int, raw: bytes) -> TaskQueueError:
        try:
            err = json.loads(raw.decode("utf-8")).get("error", {})
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {}
        cls = _BY_STATUS.get(status, TaskQueueError)
        details = err.get("details") if isinstance(err.get("details"), dict) else {}
        return cls(status, str(err.get("code", "http")), str(err.get("message", f"HTTP {status}")), details)

    def _json(self, method: str, path: str, query=None, body=None, headers=None):
        with self._request(method, path, query, body, headers) as resp:
            status = resp.status
            try:
                raw = resp.read()
            except _NO_ANSWER as e:
                raise self._no_answer(e) from None
        try:
            value = json.loads(raw.decode("utf-8")) if raw else None
        except ValueError:
            raise TaskQueueError(status, "bad_response", f"the answer to {method} {path} is not JSON") from None
        return status, value

    def _get(self, path: str, query=None):
        return self._json("GET", path, query)[1]

    def _post(self, path: str, body=None, headers=None):
        return self._json("POST", path, body=body if body is not None else {}, headers=headers)[1]

    # -- tasks ------------------------------------------------------------

    def submit_task(self, spec: Dict[str, Any], idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """Submits one task spec (docs/API.md). Returns ``{id, name, created,
        status, ...}``; with an ``idempotency_key`` (argument or spec field)
        a repeat returns the first task with ``created`` false."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._post("/api/v1/tasks", spec, headers)

    def submit_tasks(self, specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Submits tasks atomically (they may depend on each other by name)."""
        return self._post("/api/v1/tasks/batch", {"tasks": list(specs)})["tasks"]

    def get_task(self, task_id: str) -> Dict[str, Any]:
        """``{task, attempts}`` for one task."""
        return self._get(f"/api/v1/tasks/{_seg(task_id)}")

    def list_tasks(
        self,
        status: Optional[List[str]] = None,
        project: Optional[str] = None,
        workflow_id: Optional[str] = None,
        tag: Optional[str] = None,
        name: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Dict[str, Any]:
        """One page, newest first: ``{tasks, next_cursor?}``."""
        return self._get(
            "/api/v1/tasks",
            {
                "status": status,
                "project": project,
                "workflow_id": workflow_id,
                "tag": tag,
                "name": name,
                "limit": limit,
                "cursor": cursor,
            },
        )

    def iter_tasks(self, page_size: int = 100, **filters: Any) -> Iterator[Dict[str, Any]]:
        """Every task matching the filters of :meth:`list_tasks`, page by page."""
        cursor = None
        while True:
            page = self.list_tasks(limit=page_size, cursor=cursor, **filters)
            yield from page["tasks"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def task_logs(
        self,
        task_id: str,
        attempt: Optional[int] = None,
        stream: Optional[str] = None,
        tail: Optional[int] = None,
        offset: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Captured output: ``{task_id, logs: [{attempt, stream, text, ...}]}``."""
        return self._get(
            f"/api/v1/tasks/{_seg(task_id)}/logs",
            {"attempt": attempt, "stream": stream, "tail": tail, "offset": offset, "limit": limit},
        )

    def wait_for_task(self, task_id: str, timeout: float = 60.0) -> Dict[str, Any]:
        """Polls until the task is finished or ``timeout`` seconds pass;
        returns its last state either way (check ``status``)."""
        deadline = time.monotonic() + timeout
        pause = 0.05
        while True:
            task = self.get_task(task_id)["task"]
            left = deadline - time.monotonic()
            if task["status"] in TERMINAL_STATUSES or left <= 0:
                return task
            time.sleep(min(pause, left))
            pause = min(pause * 2, 1.0)

    def cancel_task(self, task_id: str) -> Dict[str, Any]:
        """Cancels an unfinished task (its processes are stopped)."""
        return self._post(f"/api/v1/tasks/{_seg(task_id)}/cancel")["task"]

    def retry_task(self, task_id: str) -> Dict[str, Any]:
        """Runs a failed, timed-out or cancelled task again."""
        return self._post(f"/api/v1/tasks/{_seg(task_id)}/retry")["task"]

    def approve_task(self, task_id: str, comment: Optional[str] = None, by: Optional[str] = None) -> Dict[str, Any]:
        """Approves a task waiting in ``awaiting_approval``."""
        return self._decide(task_id, "approve", comment, by)

    def reject_task(self, task_id: str, comment: Optional[str] = None, by: Optional[str] = None) -> Dict[str, Any]:
        """Rejects a task waiting in ``awaiting_approval`` (it fails)."""
        return self._decide(task_id, "reject", comment, by)

    def _decide(self, task_id, op, comment, by):
        body = {k: v for k, v in (("comment", comment), ("by", by)) if v is not None}
        return self._post(f"/api/v1/tasks/{_seg(task_id)}/{op}", body)["task"]

    # -- external workers -------------------------------------------------

    def claim(
        self,
        worker_id: str,
        names: Optional[List[str]] = None,
        project: Optional[str] = None,
        tags: Optional[List[str]] = None,
        lease_seconds: int = 300,
        limit: int = 1,
    ) -> List[Dict[str, Any]]:
        """Takes up to ``limit`` external tasks for ``worker_id``; each comes
        with its ``spec``, ``attempt`` and ``lease_expires_at``."""
        body: Dict[str, Any] = {"worker_id": worker_id, "lease_seconds": lease_seconds, "limit": limit}
        if names:
            body["names"] = list(names)
        if tags:
            body["tags"] = list(tags)
        if project is not None:
            body["project"] = project
        return self._post("/api/v1/workers/claim", body)["tasks"]

    def heartbeat(self, task_id: str, worker_id: str, lease_seconds: int = 300) -> str:
        """Extends a claimed task's lease; returns when it now expires."""
        out = self._post(
            f"/api/v1/tasks/{_seg(task_id)}/heartbeat",
            {"worker_id": worker_id, "lease_seconds": lease_seconds},
        )
        return out["lease_expires_at"]

    def complete(self, task_id: str, worker_id: str, output: Any = None) -> Dict[str, Any]:
        """Reports a claimed task done with its output (checked against the
        task's ``validation`` schema)."""
        body: Dict[str, Any] = {"worker_id": worker_id}
        if output is not None:
            body["output"] = output
        return self._post(f"/api/v1/tasks/{_seg(task_id)}/complete", body)["task"]

    def fail(self, task_id: str, worker_id: str, error: str, retryable: bool = True) -> Dict[str, Any]:
        """Reports a claimed task failed; ``retryable`` lets its retry policy
        run it again."""
        return self._post(
            f"/api/v1/tasks/{_seg(task_id)}/fail",
            {"worker_id": worker_id, "error": error, "retryable": retryable},
        )["task"]

    # -- workflows --------------------------------------------------------

    def submit_workflow(self, spec: Dict[str, Any], idempotency_key: Optional[str] = None) -> Dict[str, Any]:
        """Submits a workflow (``{name, tasks, ...}``; checked as a whole).
        Returns ``{workflow_id, name, status, created, tasks}``; with an
        ``idempotency_key`` a repeat returns the first workflow with
        ``created`` false."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._post("/api/v1/workflows", spec, headers)

    def get_workflow(self, workflow_id: str) -> Dict[str, Any]:
        """The workflow with ``counts``, ``tasks`` and ``edges``."""
        return self._get(f"/api/v1/workflows/{_seg(workflow_id)}")

    def list_workflows(
        self,
        status: Optional[List[str]] = None,
        project: Optional[str] = None,
        limit: Optional[int] = None,
        cursor: Optional[str] = None,
    ) -> Dict[str, Any]:
        """One page, newest first: ``{workflows, next_cursor?}``."""
        return self._get(
            "/api/v1/workflows",
            {"status": status, "project": project, "limit": limit, "cursor": cursor},
        )

    def workflow_graph(self, workflow_id: str, format: str = "mermaid") -> str:
        """The workflow's graph as Mermaid or DOT text."""
        with self._request(
            "GET", f"/api/v1/workflows/{_seg(workflow_id)}/graph", {"format": format}
        ) as resp:
            try:
                return resp.read().decode("utf-8")
            except _NO_ANSWER as e:
                raise self._no_answer(e) from None

    def cancel_workflow(self, workflow_id: str) -> Dict[str, Any]:
        """Cancels every unfinished task of a workflow."""
        return self._post(f"/api/v1/workflows/{_seg(workflow_id)}/cancel")

    # -- history, stats, events ------------------------------------------

    def search(
        self,
        q: str,
        project: Optional[str] = None,
        status: Optional[str] = None,
        tag: Optional[str] = None,
        since: Optional[str] = None,
        until: Optional[str] = None,
        limit: Optional[int] = None,
    ) -> Dict[str, Any]:
        """Past tasks ranked for ``q``: ``{hits: [{score, why, ...}], ...}``."""
        return self._get(
            "/api/v1/search",
            {"q": q, "project": project, "status": status, "tag": tag, "since": since, "until": until, "limit": limit},
        )

    def recommend(
        self,
        name: Optional[str] = None,
        command: Optional[str] = None,
        description: Optional[str] = None,
        project: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Advice from similar past tasks (timeout, retry policy, usual
        dependencies, common failures)."""
        return self._get(
            "/api/v1/recommendations",
            {"name": name, "command": command, "description": description, "project": project},
        )

    def stats(self) -> Dict[str, Any]:
        """Queue counts by status and the engine's state."""
        return self._get("/api/v1/stats")

    def health(self) -> Dict[str, Any]:
        """``/health``: liveness and readiness of store, executor, scheduler.
        A server that is not ready answers 503, raised as :class:`Unavailable`."""
        return self._get("/health")

    def events(
        self,
        after: Optional[int] = None,
        workflow_id: Optional[str] = None,
        project: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Task and workflow events as they happen (``GET /events``, SSE).
        Each item is ``{"id", "event", "data"}`` with ``data`` decoded from
        JSON; ``id`` can be passed as ``after`` to resume. Stops when the
        server closes the stream. ``timeout`` bounds each wait for data;
        the server sends a keep-alive comment every 15 s, so it should be
        longer than that. A stream that breaks or goes quiet for longer
        raises :class:`Unavailable`."""
        resp = self._request(
            "GET",
            "/api/v1/events",
            {"after": after, "workflow_id": workflow_id, "project": project},
            headers={"Accept": "text/event-stream"},
            timeout=timeout,
        )
        with resp:
            yield from self._parse_events(resp)

    def _parse_events(self, resp) -> Iterator[Dict[str, Any]]:
        try:
            yield from _sse(resp)
        except _NO_ANSWER as e:
            raise self._no_answer(e) from None


def _sse(resp) -> Iterator[Dict[str, Any]]:
    """Server-sent events from a response, one dict per event."""
    event: Dict[str, Any] = {}
    data: List[str] = []
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    event["data"] = json.loads(text)
                except ValueError:
                    event["data"] = text
                event.setdefault("event", "message")
                yield event
            event, data = {}, []
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data":
            data.append(value)
        elif key == "id":
            event["id"] = int(value) if value.isdigit() else value
        elif key == "event":
            event["event"] = value
