-- Attempts whose interaction record is still to be written (as
-- migrations/sqlite/0005): a row is added in the statement that records
-- the attempt; the records are written in bulk, by whichever node gets
-- there first, and before any read of the history.
CREATE TABLE records_pending (
    id          BIGSERIAL PRIMARY KEY,
    task_id     TEXT   NOT NULL,
    attempt     BIGINT NOT NULL,
    -- The task's status right after the attempt was recorded.
    task_status TEXT   NOT NULL
);
