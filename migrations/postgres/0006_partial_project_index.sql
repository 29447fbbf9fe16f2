-- Most tasks have no project. Index only those that do, as with
-- idempotency keys: a submit writes one index entry less, and on
-- PostgreSQL so does every status change (an update that changes an
-- indexed column adds an entry to every index whose condition the new
-- row meets). The index serves lookups by project (`project = ?`) and the
-- per-project counts (`project IS NOT NULL`); both imply its condition.
DROP INDEX tasks_project;
CREATE INDEX tasks_project ON tasks (project, seq) WHERE project IS NOT NULL;
