-- A workflow's idempotency key (as migrations/sqlite/0008): a second
-- submission with the same key is answered by the first workflow. Unique,
-- so two nodes cannot both store one: the later batch fails on the index,
-- is rolled back and applied again, and then finds the first.
ALTER TABLE workflows ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX workflows_idempotency ON workflows (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
