"""The Python client against a running task-queue server.

    TASK_QUEUE_URL=http://127.0.0.1:PORT TASK_QUEUE_TOKEN=tq_... \\
    TASK_QUEUE_VIEWER_TOKEN=tq_... python3 -m unittest discover -s tests

`TASK_QUEUE_TOKEN` must allow everything (admin); `TASK_QUEUE_VIEWER_TOKEN`
is optional (a viewer token, to check that roles hold). The Rust test
`sdk::python_client_against_the_server` starts the server and runs this.
"""

import os
import socket
import sys
import threading
import unittest
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import task_queue_client as tq  # noqa: E402

URL = os.environ.get("TASK_QUEUE_URL", "http://127.0.0.1:16080")
TOKEN = os.environ.get("TASK_QUEUE_TOKEN")
VIEWER = os.environ.get("TASK_QUEUE_VIEWER_TOKEN")


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class ClientTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.q = tq.Client(URL, token=TOKEN, timeout=30)

    def test_submit_wait_logs_and_idempotency(self):
        project = unique("py")
        key = unique("key")
        spec = {
            "name": "py-hello",
            "project": project,
            "tags": ["sdk"],
            "command": 'echo hello from python; echo \'{"answer": 42}\' > "$TASK_QUEUE_RESULT"',
        }
        first = self.q.submit_task(spec, idempotency_key=key)
        self.assertTrue(first["created"])
        again = self.q.submit_task(spec, idempotency_key=key)
        self.assertEqual(again["id"], first["id"])
        self.assertFalse(again["created"])
        done = self.q.wait_for_task(first["id"], timeout=30)
        self.assertEqual(done["status"], "succeeded", done)
        self.assertEqual(done["result"]["output"], {"answer": 42})
        detail = self.q.get_task(first["id"])
        self.assertEqual(detail["task"]["id"], first["id"])
        self.assertEqual(len(detail["attempts"]), 1)
        logs = self.q.task_logs(first["id"], stream="stdout")
        self.assertIn("hello from python", logs["logs"][0]["text"])
        page = self.q.list_tasks(project=project)
        self.assertEqual([t["id"] for t in page["tasks"]], [first["id"]])

    def test_batch_and_paging(self):
        project = unique("batch")
        specs = [{"name": f"b{i}", "project": project, "command": "true"} for i in range(7)]
        specs[6]["depends_on"] = ["b0"]
        out = self.q.submit_tasks(specs)
        self.assertEqual(len(out), 7)
        ids = {t["id"] for t in self.q.iter_tasks(page_size=3, project=project)}
        self.assertEqual(ids, {t["id"] for t in out})
        for t in out:
            self.assertEqual(self.q.wait_for_task(t["id"], timeout=30)["status"], "succeeded")

    def test_bad_input_names_the_field(self):
        with self.assertRaises(tq.InvalidInput) as e:
            self.q.submit_task({"name": "bad", "command": "true", "priority": "high"})
        self.assertEqual(e.exception.status, 400)
        self.assertEqual(e.exception.code, "invalid_input")
        self.assertEqual(e.exception.field, "priority")
        with self.assertRaises(tq.InvalidInput) as e:
            self.q.submit_workflow({"name": "cyc", "tasks": [
                {"name": "a", "command": "true", "depends_on": ["b"]},
                {"name": "b", "command": "true", "depends_on": ["a"]}]})
        self.assertIn("cycle", e.exception.message)

    def test_unknown_ids_are_not_found(self):
        missing = str(uuid.uuid4())
        with self.assertRaises(tq.NotFound) as e:
            self.q.get_task(missing)
        self.assertEqual(e.exception.code, "not_found")
        with self.assertRaises(tq.NotFound):
            self.q.get_workflow(missing)
        # An id cannot change the route.
        with self.assertRaises(tq.TaskQueueError):
            self.q.get_task("../stats")

    def test_workflow_with_approval_key_graph_and_events(self):
        project = unique("wf")
        key = unique("release")
        spec = {
            "name": "py-release",
            "project": project,
            "tasks": [
                {"name": "build", "command": "echo build"},
                {"name": "gate", "command": "true", "requires_approval": True, "depends_on": ["build"]},
                {"name": "ship", "command": "echo ship", "depends_on": ["gate"]},
            ],
        }
        w = self.q.submit_workflow(spec, idempotency_key=key)
        self.assertTrue(w["created"])
        # Submitted again with the key, even with other tasks: the same workflow.
        again = self.q.submit_workflow({"name": "py-release", "tasks": [{"name": "x", "command": "true"}]},
                                       idempotency_key=key)
        self.assertFalse(again["created"])
        self.assertEqual(again["workflow_id"], w["workflow_id"])
        self.assertEqual([t["name"] for t in again["tasks"]], ["build", "gate", "ship"])
        ids = {t["name"]: t["id"] for t in w["tasks"]}

        # Collect the workflow's events from the start while it runs.
        seen = []

        def listen():
            try:
                for ev in self.q.events(after=0, workflow_id=w["workflow_id"], timeout=30):
                    seen.append(ev)
                    if ev["event"] == "workflow" and ev["data"].get("to") == "succeeded":
                        return
            except Exception as e:  # reported by the assertion below
                seen.append({"error": repr(e)})

        listener = threading.Thread(target=listen, daemon=True)
        listener.start()

        for _ in range(300):
            if self.q.get_task(ids["gate"])["task"]["status"] == "awaiting_approval":
                break
            threading.Event().wait(0.1)
        gate = self.q.approve_task(ids["gate"], comment="ok from python", by="sdk-test")
        self.assertEqual(gate["approval"]["comment"], "ok from python")
        with self.assertRaises(tq.Conflict):
            self.q.approve_task(ids["gate"])
        self.assertEqual(self.q.wait_for_task(ids["ship"], timeout=30)["status"], "succeeded")
        listener.join(timeout=30)
        kinds = [(e.get("event"), e.get("data", {}).get("to")) for e in seen]
        self.assertIn(("workflow", "succeeded"), kinds, seen)
        self.assertTrue(all(isinstance(e.get("id"), int) for e in seen), seen)

        detail = self.q.get_workflow(w["workflow_id"])
        self.assertEqual(detail["status"], "succeeded")
        self.assertEqual(detail["idempotency_key"], key)
        self.assertIn("flowchart", self.q.workflow_graph(w["workflow_id"]))
        self.assertIn("digraph", self.q.workflow_graph(w["workflow_id"], format="dot"))
        listed = self.q.list_workflows(project=project)
        self.assertEqual([x["id"] for x in listed["workflows"]], [w["workflow_id"]])

    def test_reject_cancel_and_retry(self):
        w = self.q.submit_workflow({"name": unique("rej"), "tasks": [
            {"name": "gate", "command": "true", "requires_approval": True}]})
        gate = w["tasks"][0]["id"]
        for _ in range(300):
            if self.q.get_task(gate)["task"]["status"] == "awaiting_approval":
                break
            threading.Event().wait(0.1)
        self.assertEqual(self.q.reject_task(gate, comment="not now")["status"], "failed")
        self.assertEqual(self.q.retry_task(gate)["status"], "awaiting_approval")
        sleeper = self.q.submit_task({"name": "py-sleep", "command": "sleep 30"})
        cancelled = self.q.cancel_task(sleeper["id"])
        self.assertEqual(cancelled["status"], "cancelled")
        # Cancelling again changes nothing; cancelling a succeeded task is a conflict.
        self.assertEqual(self.q.cancel_task(sleeper["id"])["status"], "cancelled")
        quick = self.q.submit_task({"name": "py-quick", "command": "true"})
        self.q.wait_for_task(quick["id"], timeout=30)
        with self.assertRaises(tq.Conflict):
            self.q.cancel_task(quick["id"])
        out = self.q.cancel_workflow(w["workflow_id"])
        self.assertEqual(out["status"], "cancelled", out)

    def test_external_worker_claims_heartbeats_completes_and_fails(self):
        name = unique("review")
        ok = self.q.submit_task({"name": name, "kind": "external",
                                 "validation": {"type": "object", "required": ["verdict"]}})
        flaky = self.q.submit_task({"name": name, "kind": "external",
                                    "retry": {"max_attempts": 2, "initial_delay": "100ms"}})
        worker = unique("py-worker")
        got = self.q.claim(worker, names=[name], lease_seconds=60, limit=5)
        self.assertEqual({t["task_id"] for t in got}, {ok["id"], flaky["id"]})
        self.assertTrue(self.q.heartbeat(ok["id"], worker, lease_seconds=120))
        with self.assertRaises(tq.Conflict):
            self.q.heartbeat(ok["id"], "someone-else")
        with self.assertRaises(tq.InvalidInput):
            self.q.complete(ok["id"], worker, output={"no": "verdict"})
        done = self.q.complete(ok["id"], worker, output={"verdict": "ship it"})
        self.assertEqual(done["status"], "succeeded")
        self.assertEqual(done["result"]["output"], {"verdict": "ship it"})
        failed = self.q.fail(flaky["id"], worker, "flaky dependency", retryable=True)
        self.assertEqual(failed["status"], "retrying")
        for _ in range(100):
            again = self.q.claim(worker, names=[name], lease_seconds=60)
            if again:
                break
            threading.Event().wait(0.1)
        self.assertEqual(again[0]["task_id"], flaky["id"])
        self.assertEqual(again[0]["attempt"], 2)
        self.assertEqual(self.q.fail(flaky["id"], worker, "still flaky", retryable=False)["status"], "failed")

    def test_search_recommend_stats_and_health(self):
        project = unique("hist")
        t = self.q.submit_task({"name": "deploy-api", "project": project, "command": "echo deploying the api"})
        self.q.wait_for_task(t["id"], timeout=30)
        found = None
        for _ in range(100):
            found = self.q.search("ship the backend", project=project)
            if found["hits"]:
                break
            threading.Event().wait(0.1)
        self.assertEqual(found["hits"][0]["task_id"], t["id"], found)
        rec = self.q.recommend(name="deploy-api", project=project)
        self.assertIn(t["id"], [x.get("task_id") for x in rec["similar"]], rec)
        stats = self.q.stats()
        self.assertIn("tasks", stats)
        self.assertIn(self.q.health()["status"], ("ok", "degraded"))

    def test_base_url_and_unreachable_server(self):
        self.assertEqual(tq.Client(URL + "/api/v1/").base_url, URL)
        with self.assertRaises(ValueError):
            tq.Client("127.0.0.1:8080")
        with self.assertRaises(tq.Unavailable) as e:
            tq.Client("http://127.0.0.1:9", timeout=2).stats()
        self.assertEqual(e.exception.status, 0)
        # A server that accepts the connection and never answers: a timeout.
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        try:
            port = silent.getsockname()[1]
            with self.assertRaises(tq.Unavailable) as e:
                tq.Client(f"http://127.0.0.1:{port}", timeout=0.5).stats()
            self.assertEqual((e.exception.status, e.exception.code), (0, "timeout"))
        finally:
            silent.close()
        # `.` and `..` are ids like any other, not path steps.
        for odd in (".", ".."):
            with self.assertRaises(tq.TaskQueueError) as e:
                self.q.get_task(odd)
            self.assertIn(e.exception.status, (400, 404), e.exception)


@unittest.skipUnless(TOKEN and VIEWER, "needs TASK_QUEUE_TOKEN and TASK_QUEUE_VIEWER_TOKEN")
class RolesTest(unittest.TestCase):
    def test_roles_hold(self):
        viewer = tq.Client(URL, token=VIEWER)
        self.assertIn("tasks", viewer.list_tasks(limit=1))
        with self.assertRaises(tq.Forbidden) as e:
            viewer.submit_task({"name": "nope", "command": "true"})
        self.assertEqual(e.exception.status, 403)
        with self.assertRaises(tq.Unauthorized):
            tq.Client(URL).list_tasks(limit=1)
        with self.assertRaises(tq.Unauthorized):
            tq.Client(URL, token="tq_not_a_token").list_tasks(limit=1)


if __name__ == "__main__":
    unittest.main(verbosity=2)
