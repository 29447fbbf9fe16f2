-- Dependencies, workflows, schedules and approvals.

-- The workflow a task belongs to, the schedule that created it, how many
-- of its dependencies are still unresolved, and whether it waits for an
-- approval once they are met.
ALTER TABLE tasks ADD COLUMN workflow_id TEXT;
ALTER TABLE tasks ADD COLUMN schedule_id TEXT;
ALTER TABLE tasks ADD COLUMN deps_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN needs_approval INTEGER NOT NULL DEFAULT 0;
-- JSON: {"approved": bool, "comment": ..., "by": ..., "at": ms}.
ALTER TABLE tasks ADD COLUMN approval TEXT;

CREATE INDEX tasks_workflow ON tasks (workflow_id, seq) WHERE workflow_id IS NOT NULL;
CREATE INDEX tasks_schedule ON tasks (schedule_id, seq) WHERE schedule_id IS NOT NULL;
-- Pending tasks whose dependencies are met and that wait only for their
-- time (`schedule.at`, or the slot of a scheduled run).
CREATE INDEX tasks_timer ON tasks (run_at) WHERE status = 'pending' AND deps_pending = 0;

-- One row per dependency edge: `task_id` waits for `dep_id` to meet `condition`.
-- state: waiting, met (condition held) or unmet (it can no longer hold).
CREATE TABLE task_deps (
    dep_id    TEXT NOT NULL,
    task_id   TEXT NOT NULL,
    condition TEXT NOT NULL,
    state     TEXT NOT NULL DEFAULT 'waiting',
    PRIMARY KEY (dep_id, task_id)
) WITHOUT ROWID;
CREATE INDEX task_deps_task ON task_deps (task_id);

-- A workflow: tasks submitted together. The counters move in the same
-- transaction as the task transitions, so the status never lags.
CREATE TABLE workflows (
    seq             INTEGER PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    name            TEXT    NOT NULL,
    project         TEXT,
    tags            TEXT    NOT NULL DEFAULT '[]',
    description     TEXT,
    status          TEXT    NOT NULL,
    schedule_id     TEXT,
    tasks_total     INTEGER NOT NULL,
    tasks_done      INTEGER NOT NULL DEFAULT 0,
    tasks_failed    INTEGER NOT NULL DEFAULT 0,
    tasks_cancelled INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    finished_at     INTEGER
);
CREATE INDEX workflows_status ON workflows (status, seq);
CREATE INDEX workflows_schedule ON workflows (schedule_id, seq) WHERE schedule_id IS NOT NULL;

-- Recurring schedules. The upcoming run exists as pending tasks (run_at =
-- next_fire_at); when it comes due, one engine creates the run after it,
-- compare-and-set on next_fire_at so each slot fires once.
CREATE TABLE schedules (
    seq           INTEGER PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    project       TEXT,
    cron          TEXT    NOT NULL,
    timezone      TEXT,
    -- JSON of the submission each firing repeats (a task list or a workflow).
    template      TEXT    NOT NULL,
    paused        INTEGER NOT NULL DEFAULT 0,
    next_fire_at  INTEGER,
    -- Task id (task schedules) or workflow id of the upcoming run.
    upcoming_run  TEXT,
    last_fired_at INTEGER,
    runs          INTEGER NOT NULL DEFAULT 0,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0 AND next_fire_at IS NOT NULL;
