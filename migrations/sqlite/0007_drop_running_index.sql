-- The lease scans (expired leases, a worker's leases, leases per worker)
-- read the running tasks, which are at most the slots of the live
-- workers: `tasks_status` finds them by its `status` prefix. A separate
-- index on the lease expiry cost an entry added and removed for every
-- attempt and rewritten by every lease renewal.
DROP INDEX tasks_running;
