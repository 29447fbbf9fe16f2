-- A workflow's idempotency key: a second submission with the same key is
-- answered by the first workflow. Unique, so two writers cannot both
-- store one; most workflows have none, so the index holds only the keyed.
ALTER TABLE workflows ADD COLUMN idempotency_key TEXT;
CREATE UNIQUE INDEX workflows_idempotency ON workflows (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
