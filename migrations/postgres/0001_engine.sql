-- The PostgreSQL schema mirrors migrations/sqlite step for step: the same
-- tables, columns and meanings, with PostgreSQL types. Integers are BIGINT
-- (milliseconds, counters, 0/1 flags) so both stores read them alike.

-- Tasks: one row per submitted task. `seq` orders submissions (FIFO within a
-- priority); `id` is the public UUIDv7.
CREATE TABLE tasks (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id               TEXT    NOT NULL UNIQUE,
    name             TEXT    NOT NULL,
    kind             TEXT    NOT NULL,
    project          TEXT,
    tags             TEXT    NOT NULL DEFAULT '[]',
    status           TEXT    NOT NULL,
    priority         BIGINT  NOT NULL DEFAULT 0,
    attempts         BIGINT  NOT NULL DEFAULT 0,
    max_attempts     BIGINT  NOT NULL,
    run_at           BIGINT  NOT NULL,
    created_at       BIGINT  NOT NULL,
    updated_at       BIGINT  NOT NULL,
    started_at       BIGINT,
    finished_at      BIGINT,
    lease_owner      TEXT,
    lease_expires_at BIGINT,
    idempotency_key  TEXT,
    spec             TEXT    NOT NULL,
    spec_hash        TEXT    NOT NULL,
    result           TEXT,
    error            TEXT
);

-- The claim query: ready tasks, highest priority first, then oldest.
-- Partial, so finished history never makes a claim slower.
CREATE INDEX tasks_ready ON tasks (priority DESC, seq)
    WHERE status IN ('queued', 'retrying');
-- Lease expiry scan.
CREATE INDEX tasks_running ON tasks (lease_expires_at)
    WHERE status = 'running';
CREATE INDEX tasks_lease_owner ON tasks (lease_owner)
    WHERE status = 'running';
-- Idempotency keys are rare: index only the tasks that have one.
CREATE UNIQUE INDEX tasks_idempotency ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_status ON tasks (status, seq);
CREATE INDEX tasks_project ON tasks (project, seq);

-- Attempts: one row per finished (or lost) execution.
CREATE TABLE attempts (
    task_id     TEXT    NOT NULL,
    attempt     BIGINT  NOT NULL,
    worker_id   TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    started_at  BIGINT  NOT NULL,
    finished_at BIGINT  NOT NULL,
    exit_code   BIGINT,
    signal      BIGINT,
    duration_ms BIGINT  NOT NULL,
    error       TEXT,
    result      TEXT    NOT NULL,
    PRIMARY KEY (task_id, attempt)
);

-- Captured output, up to the task's max_output_bytes per stream.
CREATE TABLE task_logs (
    task_id       TEXT    NOT NULL,
    attempt       BIGINT  NOT NULL,
    stream        TEXT    NOT NULL,
    data          BYTEA   NOT NULL,
    dropped_bytes BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (task_id, attempt, stream)
);

-- Append-only, hash-chained record of every state transition. `seq` is
-- assigned by the writer while it holds the chain lock, so it is gap-free
-- and in commit order across nodes.
CREATE TABLE audit_events (
    seq         BIGINT  PRIMARY KEY,
    at          BIGINT  NOT NULL,
    task_id     TEXT    NOT NULL,
    kind        TEXT    NOT NULL,
    from_status TEXT,
    to_status   TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    prev_hash   TEXT    NOT NULL,
    hash        TEXT    NOT NULL
);
CREATE INDEX audit_events_task ON audit_events (task_id, seq);

-- Engine instances, so a restarted engine can tell a dead local peer's
-- leases from a live one's.
CREATE TABLE workers (
    id         TEXT    PRIMARY KEY,
    host       TEXT    NOT NULL,
    pid        BIGINT  NOT NULL,
    pid_start  BIGINT  NOT NULL,
    started_at BIGINT  NOT NULL,
    last_seen  BIGINT  NOT NULL
);
