-- Attempts whose interaction record is still to be written. The writer
-- adds a row here in the transaction that records the attempt (a cheap
-- append) and writes the records in bulk: once enough are pending, before
-- any read of the history (from any process), and when it closes.
CREATE TABLE records_pending (
    id      INTEGER PRIMARY KEY,
    task_id TEXT    NOT NULL,
    attempt INTEGER NOT NULL,
    -- The task's status right after the attempt was recorded.
    task_status TEXT NOT NULL
);
