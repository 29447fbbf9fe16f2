-- Dependencies, workflows, schedules and approvals.

ALTER TABLE tasks ADD COLUMN workflow_id TEXT;
ALTER TABLE tasks ADD COLUMN schedule_id TEXT;
ALTER TABLE tasks ADD COLUMN deps_pending BIGINT NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN needs_approval BIGINT NOT NULL DEFAULT 0;
-- JSON: {"approved": bool, "comment": ..., "by": ..., "at": ms}.
ALTER TABLE tasks ADD COLUMN approval TEXT;

CREATE INDEX tasks_workflow ON tasks (workflow_id, seq) WHERE workflow_id IS NOT NULL;
CREATE INDEX tasks_schedule ON tasks (schedule_id, seq) WHERE schedule_id IS NOT NULL;
CREATE INDEX tasks_timer ON tasks (run_at) WHERE status = 'pending' AND deps_pending = 0;

-- One row per dependency edge: `task_id` waits for `dep_id` to meet `condition`.
-- state: waiting, met (condition held) or unmet (it can no longer hold).
CREATE TABLE task_deps (
    dep_id    TEXT NOT NULL,
    task_id   TEXT NOT NULL,
    condition TEXT NOT NULL,
    state     TEXT NOT NULL DEFAULT 'waiting',
    PRIMARY KEY (dep_id, task_id)
);
CREATE INDEX task_deps_task ON task_deps (task_id);

-- A workflow: tasks submitted together. The counters move in the same
-- transaction as the task transitions, so the status never lags.
CREATE TABLE workflows (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id              TEXT    NOT NULL UNIQUE,
    name            TEXT    NOT NULL,
    project         TEXT,
    tags            TEXT    NOT NULL DEFAULT '[]',
    description     TEXT,
    status          TEXT    NOT NULL,
    schedule_id     TEXT,
    tasks_total     BIGINT  NOT NULL,
    tasks_done      BIGINT  NOT NULL DEFAULT 0,
    tasks_failed    BIGINT  NOT NULL DEFAULT 0,
    tasks_cancelled BIGINT  NOT NULL DEFAULT 0,
    created_at      BIGINT  NOT NULL,
    updated_at      BIGINT  NOT NULL,
    finished_at     BIGINT
);
CREATE INDEX workflows_status ON workflows (status, seq);
CREATE INDEX workflows_schedule ON workflows (schedule_id, seq) WHERE schedule_id IS NOT NULL;

-- Recurring schedules. The upcoming run exists as pending tasks (run_at =
-- next_fire_at); when it comes due, one engine creates the run after it,
-- compare-and-set on next_fire_at (under a row lock) so each slot fires once.
CREATE TABLE schedules (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            TEXT    NOT NULL UNIQUE,
    name          TEXT    NOT NULL,
    project       TEXT,
    cron          TEXT    NOT NULL,
    timezone      TEXT,
    template      TEXT    NOT NULL,
    paused        BIGINT  NOT NULL DEFAULT 0,
    next_fire_at  BIGINT,
    upcoming_run  TEXT,
    last_fired_at BIGINT,
    runs          BIGINT  NOT NULL DEFAULT 0,
    created_at    BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_fire_at) WHERE paused = 0 AND next_fire_at IS NOT NULL;
