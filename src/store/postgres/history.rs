//! History in PostgreSQL: interaction records written by the writer in the
//! transaction that records the attempt, a weighted `tsvector` (GIN) for
//! words, pg_trgm indexes for pieces of words, vectors and the Vectorizer
//! outbox (see `migrations/postgres/0004_search.sql`).
//!
//! User text only ever reaches PostgreSQL as bound parameters: each word
//! goes through `plainto_tsquery`, each substring is matched with `LIKE`
//! after its wildcards are escaped.

use async_trait::async_trait;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::PgStore;
use crate::error::Result;
use crate::store::history::{
    Candidate, HistoryChange, HistoryFilter, HistoryStore, Interaction, MATCH_WINDOW, OutboxState,
    best_run_per_task,
};

/// The interaction records of the rows of a CTE `src` (one row per
/// attempt, with `ord`, the attempt's columns, the task's, its spec as
/// `s` and its result as `r`), each put in the Vectorizer outbox.
const RECORD_FROM_SRC: &str = "\
         ins AS (INSERT INTO interactions (task_id, attempt, name, project, workflow_id, kind, tags, \
                 outcome, task_status, exit_code, duration_ms, started_at, finished_at, description, \
                 command, parameters, dependencies, error, output, artifacts, stdout_tail, stderr_tail) \
                 SELECT task_id, attempt, name, project, workflow_id, kind, tags, status, task_status, \
                 exit_code, duration_ms, started_at, finished_at, s ->> 'description', \
                 CASE WHEN s ->> 'command' IS NOT NULL THEN s ->> 'command' \
                      WHEN jsonb_typeof(s -> 'argv') = 'array' \
                           THEN (SELECT string_agg(x, ' ') FROM jsonb_array_elements_text(s -> 'argv') AS x) \
                      WHEN jsonb_typeof(s -> 'http') = 'object' \
                           THEN concat_ws(' ', coalesce(s #>> '{http,method}', 'GET'), s #>> '{http,url}') \
                 END, \
                 nullif(s -> 'parameters', 'null'::jsonb)::text, \
                 (SELECT coalesce(jsonb_agg(d.name ORDER BY d.name), '[]'::jsonb) FROM task_deps td \
                  JOIN tasks d ON d.id = td.dep_id WHERE td.task_id = src.task_id), \
                 error, nullif(r -> 'output', 'null'::jsonb)::text, \
                 CASE WHEN jsonb_typeof(r -> 'artifacts') = 'array' THEN r -> 'artifacts' ELSE '[]'::jsonb END, \
                 coalesce(r ->> 'stdout_tail', ''), coalesce(r ->> 'stderr_tail', '') \
                 FROM src ORDER BY ord \
                 ON CONFLICT (task_id, attempt) DO NOTHING RETURNING id) \
         INSERT INTO vectorizer_outbox (interaction_id) SELECT id FROM ins";

/// Inserts attempt rows (`$1`: a JSON array of `[task_id, attempt,
/// worker_id, status, started_at, finished_at, exit_code, signal,
/// duration_ms, error, result]`) and, in the same statement, marks each
/// attempt it inserted for an interaction record (`records_pending`, with
/// the task's status as of this transaction). An attempt that was already
/// recorded (a late finish of a reclaimed attempt) is left alone.
pub(super) async fn insert_attempts(conn: &mut PgConnection, rows_json: String) -> Result<()> {
    sqlx::query(
        "WITH a AS (INSERT INTO attempts (task_id, attempt, worker_id, status, started_at, finished_at, \
                    exit_code, signal, duration_ms, error, result) \
                    SELECT v ->> 0, (v ->> 1)::bigint, v ->> 2, v ->> 3, (v ->> 4)::bigint, (v ->> 5)::bigint, \
                    (v ->> 6)::bigint, (v ->> 7)::bigint, (v ->> 8)::bigint, v ->> 9, v ->> 10 \
                    FROM jsonb_array_elements($1::jsonb) WITH ORDINALITY AS e(v, ord) ORDER BY ord \
                    ON CONFLICT DO NOTHING \
                    RETURNING task_id, attempt) \
         INSERT INTO records_pending (task_id, attempt, task_status) \
         SELECT a.task_id, a.attempt, t.status FROM a JOIN tasks t ON t.id = a.task_id"
    )
    .bind(rows_json)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Pending records past which a node writes them (in a transaction of its
/// own, beside its writers).
pub(super) const RECORDS_PER_WRITE: usize = 512;

/// The statement that writes the records of the marks whose `id` meets
/// `{which}`.
///
/// The marks of a bulk write are picked by `id = ANY (ARRAY(SELECT id …
/// FOR UPDATE …))`, not `id IN (SELECT …)`: the locking subquery then runs
/// once (an InitPlan) and the delete checks each mark against its array.
/// `records_pending` holds a few hundred rows at most and is often empty
/// when autovacuum analyzes it (a queue that drained leaves it so); with
/// that estimate the planner turned `IN (SELECT …)` into a nested-loop
/// semi join that ran the locking subquery again for every mark: 47–52 ms
/// for the delete of 512 marks against 1.7–3 ms this way (`EXPLAIN
/// ANALYZE` after `ANALYZE` of the empty table).
fn record_sql(which: &str) -> String {
    format!(
        "WITH k AS (DELETE FROM records_pending WHERE {which} \
                    RETURNING id, task_id, attempt, task_status), \
         src AS (SELECT row_number() OVER (ORDER BY k.id) AS ord, a.task_id, a.attempt, t.name, \
                 t.project, t.workflow_id, t.kind, t.tags::jsonb AS tags, a.status, k.task_status, \
                 a.exit_code, a.duration_ms, a.started_at, a.finished_at, t.spec::jsonb AS s, a.error, \
                 a.result::jsonb AS r \
                 FROM k JOIN attempts a ON a.task_id = k.task_id AND a.attempt = k.attempt \
                 JOIN tasks t ON t.id = a.task_id), {RECORD_FROM_SRC}"
    )
}

/// The condition of a bulk write: every mark, locked (`skip` is `""` or
/// `" SKIP LOCKED"`).
fn every_mark(skip: &str) -> String {
    format!("id = ANY (ARRAY(SELECT id FROM records_pending ORDER BY id FOR UPDATE{skip}))")
}

/// The plan (`EXPLAIN`, nothing is run) of the statement that writes the
/// pending records in bulk, for diagnostics.
pub async fn explain_records_write(pool: &sqlx::PgPool) -> Result<Vec<String>> {
    let sql = format!("EXPLAIN {}", record_sql(&every_mark(" SKIP LOCKED")));
    Ok(sqlx::query_scalar(AssertSqlSafe(sql))
        .fetch_all(pool)
        .await?)
}

/// Writes the interaction records of the attempts in `records_pending` and
/// removes them from it; returns how many records it wrote. With
/// `skip_locked`, marks another node is writing right now are left to it;
/// without, it waits for that node to commit, so that a read after it sees
/// those records too.
///
/// If the statement for all of them fails (a record that cannot be built,
/// say a task row edited by hand into invalid JSON), they are written one
/// at a time instead: each record that fails is logged and left out, so
/// one bad row never holds up the others or the readers.
pub(super) async fn write_pending_records(
    conn: &mut PgConnection,
    skip_locked: bool,
) -> Result<u64> {
    let skip = if skip_locked { " SKIP LOCKED" } else { "" };
    sqlx::query("SAVEPOINT records").execute(&mut *conn).await?;
    let all = sqlx::query(AssertSqlSafe(record_sql(&every_mark(skip))))
        .execute(&mut *conn)
        .await;
    match all {
        Ok(done) => {
            sqlx::query("RELEASE SAVEPOINT records")
                .execute(&mut *conn)
                .await?;
            Ok(done.rows_affected())
        }
        Err(e) => {
            sqlx::query("ROLLBACK TO SAVEPOINT records")
                .execute(&mut *conn)
                .await?;
            tracing::warn!(error = %e, "writing interaction records together failed; writing them one at a time");
            write_pending_records_one_by_one(conn, skip).await
        }
    }
}

async fn write_pending_records_one_by_one(conn: &mut PgConnection, skip: &str) -> Result<u64> {
    let marks: Vec<(i64, String, i64)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT id, task_id, attempt FROM records_pending ORDER BY id FOR UPDATE{skip}"
    )))
    .fetch_all(&mut *conn)
    .await?;
    let one = record_sql("id = $1");
    let mut written = 0;
    for (id, task_id, attempt) in marks {
        sqlx::query("SAVEPOINT record").execute(&mut *conn).await?;
        match sqlx::query(AssertSqlSafe(one.as_str()))
            .bind(id)
            .execute(&mut *conn)
            .await
        {
            Ok(done) => written += done.rows_affected(),
            Err(e) => {
                sqlx::query("ROLLBACK TO SAVEPOINT record")
                    .execute(&mut *conn)
                    .await?;
                tracing::error!(
                    error = %e,
                    task = %task_id,
                    attempt,
                    "the interaction record of this attempt cannot be written; it is left out of the history"
                );
                sqlx::query("DELETE FROM records_pending WHERE id = $1")
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
        }
        sqlx::query("RELEASE SAVEPOINT record")
            .execute(&mut *conn)
            .await?;
    }
    sqlx::query("RELEASE SAVEPOINT records")
        .execute(&mut *conn)
        .await?;
    Ok(written)
}

/// [`write_pending_records`] in a transaction of its own.
pub(super) async fn write_pending_records_now(
    pool: &sqlx::PgPool,
    skip_locked: bool,
) -> Result<u64> {
    let mut tx = pool.begin().await?;
    let n = write_pending_records(&mut tx, skip_locked).await?;
    tx.commit().await?;
    Ok(n)
}

/// Applies a history change in one transaction.
async fn apply(conn: &mut PgConnection, change: &HistoryChange) -> Result<u64> {
    match change {
        HistoryChange::Prune { before, limit } => {
            // One node prunes at a time; the others find nothing to do
            // this round rather than delete the same rows in another order.
            let mine: bool = sqlx::query_scalar(
                "SELECT pg_try_advisory_xact_lock(hashtext('task-queue history prune'))",
            )
            .fetch_one(&mut *conn)
            .await?;
            if !mine {
                return Ok(0);
            }
            // Records still pending belong to the history being pruned too.
            write_pending_records(&mut *conn, false).await?;
            let ids: Vec<String> = sqlx::query_scalar(
                "SELECT t.id FROM tasks t WHERE t.finished_at < $1 AND \
                 (EXISTS (SELECT 1 FROM interactions i WHERE i.task_id = t.id) \
                  OR EXISTS (SELECT 1 FROM task_logs l WHERE l.task_id = t.id)) LIMIT $2",
            )
            .bind(before)
            .bind(*limit as i64)
            .fetch_all(&mut *conn)
            .await?;
            if ids.is_empty() {
                return Ok(0);
            }
            // Vectors and outbox entries go with their records (ON DELETE CASCADE).
            for sql in [
                "DELETE FROM interactions WHERE task_id = ANY($1)",
                "DELETE FROM task_logs WHERE task_id = ANY($1)",
            ] {
                sqlx::query(sql).bind(&ids).execute(&mut *conn).await?;
            }
            Ok(ids.len() as u64)
        }
        HistoryChange::PutVectors { model, dim, rows } => {
            for (id, v) in rows {
                sqlx::query(
                    "INSERT INTO interaction_vectors (interaction_id, model, dim, vector) \
                     SELECT $1, $2, $3, $4 WHERE EXISTS (SELECT 1 FROM interactions WHERE id = $1) \
                     ON CONFLICT (model, interaction_id) DO UPDATE SET dim = EXCLUDED.dim, \
                     vector = EXCLUDED.vector",
                )
                .bind(id)
                .bind(model)
                .bind(*dim as i64)
                .bind(to_blob(v))
                .execute(&mut *conn)
                .await?;
            }
            Ok(rows.len() as u64)
        }
        HistoryChange::Delivered { ids } => {
            let r = sqlx::query("DELETE FROM vectorizer_outbox WHERE interaction_id = ANY($1)")
                .bind(ids)
                .execute(&mut *conn)
                .await?;
            Ok(r.rows_affected())
        }
        HistoryChange::DeliveryFailed {
            ids,
            next_at,
            error,
        } => {
            let r = sqlx::query(
                "UPDATE vectorizer_outbox SET attempts = attempts + 1, next_at = $2, last_error = $3 \
                 WHERE interaction_id = ANY($1)",
            )
            .bind(ids)
            .bind(next_at)
            .bind(error)
            .execute(&mut *conn)
            .await?;
            Ok(r.rows_affected())
        }
    }
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

const COLUMNS: &str = "i.id, i.task_id, i.attempt, i.name, i.project, i.workflow_id, i.kind, \
    i.tags::text, i.outcome, i.exit_code, i.duration_ms, i.started_at, i.finished_at, i.description, \
    i.command, i.parameters, i.dependencies::text, i.error, i.output, i.artifacts::text, \
    i.stdout_tail, i.stderr_tail";

/// The filter as SQL over `i` (`interactions`), parameters `$2`..`$6`.
const FILTER: &str = "($2::text IS NULL OR i.project = $2) \
    AND (cardinality($3::text[]) = 0 OR i.outcome = ANY($3)) \
    AND i.tags @> to_jsonb($4::text[]) \
    AND ($5::bigint IS NULL OR i.finished_at >= $5) AND ($6::bigint IS NULL OR i.finished_at < $6)";

/// Field weights for `ts_rank`, `{D, C, B, A}`: the name says most about a
/// task, then what it is for, then how it runs; output and logs least
/// (SQLite's bm25 weights 8 / 4 / 2 / 0.5, relative to the name).
/// The tsquery of `$1`: any of the words; words that are stopwords to the
/// parser become empty queries and are left out.
const TSQUERY: &str = "SELECT tsquery_any(w) AS q FROM \
     (SELECT plainto_tsquery('english', t) AS w FROM unnest($1::text[]) AS t) AS x \
     WHERE numnode(w) > 0";

const WEIGHTS: &str = "'{0.0625, 0.25, 0.5, 1.0}'::float4[]";

fn interaction_from(row: &PgRow) -> Interaction {
    let list = |s: String| serde_json::from_str::<Vec<String>>(&s).unwrap_or_default();
    let artifacts: String = row.get(19);
    let artifacts = serde_json::from_str::<Vec<serde_json::Value>>(&artifacts)
        .unwrap_or_default()
        .iter()
        .filter_map(|a| a.get("path").and_then(|p| p.as_str()).map(str::to_string))
        .collect();
    Interaction {
        id: row.get(0),
        task_id: row.get(1),
        attempt: row.get::<i64, _>(2) as u32,
        name: row.get(3),
        project: row.get(4),
        workflow_id: row.get(5),
        kind: row.get(6),
        tags: list(row.get(7)),
        outcome: row.get(8),
        exit_code: row.get(9),
        duration_ms: row.get(10),
        started_at: row.get(11),
        finished_at: row.get(12),
        description: row.get(13),
        command: row.get(14),
        parameters: row.get(15),
        dependencies: list(row.get(16)),
        error: row.get(17),
        output: row.get(18),
        artifacts,
        stdout_tail: row.get(20),
        stderr_tail: row.get(21),
    }
}

/// `LIKE` pattern for "contains `s`", its wildcards taken literally.
fn contains_pattern(s: &str) -> String {
    let escaped = s
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

impl PgStore {
    async fn candidates(
        &self,
        sql: &str,
        terms: Vec<String>,
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        let rows = sqlx::query(AssertSqlSafe(sql.to_string()))
            .bind(terms)
            .bind(f.project.as_deref())
            .bind(&f.outcomes)
            .bind(&f.tags)
            .bind(f.since)
            .bind(f.until)
            .bind(limit as i64)
            .bind(MATCH_WINDOW as i64)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows
            .iter()
            .map(|r| Candidate {
                id: r.get(0),
                bm25: r.get(1),
                runs: r.get::<i64, _>(2).max(0) as u64,
            })
            .collect())
    }

    /// Writes the pending interaction records (of every node) before a
    /// read of the history, so the read sees every finished attempt.
    async fn records_current(&self) -> Result<()> {
        let pending: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM records_pending)")
            .fetch_one(&self.pool)
            .await?;
        if pending {
            write_pending_records_now(&self.pool, false).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for PgStore {
    async fn change_history(&self, change: HistoryChange) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let n = apply(&mut tx, &change).await?;
        tx.commit().await?;
        Ok(n)
    }

    async fn words(
        &self,
        words: &[String],
        every: bool,
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        self.records_current().await?;
        // Any of the words: each one's tsquery OR-ed; words that are
        // stopwords to the parser become empty queries and are left out.
        // Ranked among the newest MATCH_WINDOW matches, as on SQLite; with
        // `every`, also among the newest that match all the words (the
        // words joined, as plainto_tsquery ANDs them). Every record is
        // ranked against the OR-ed query, so scores compare.
        let newest_any = format!(
            "SELECT i.id FROM interactions i, q \
             WHERE q.q IS NOT NULL AND i.words @@ q.q AND {FILTER} \
             ORDER BY i.id DESC LIMIT $8"
        );
        let ids = if every && words.len() > 1 {
            format!(
                "({newest_any}) UNION (SELECT i.id FROM interactions i, \
                 (SELECT plainto_tsquery('english', array_to_string($1::text[], ' ')) AS q) AS qa \
                 WHERE numnode(qa.q) > 0 AND i.words @@ qa.q AND {FILTER} \
                 ORDER BY i.id DESC LIMIT $8)"
            )
        } else {
            newest_any
        };
        let sql = format!(
            "WITH q AS ({TSQUERY}), ids AS ({ids}), \
             recent AS (SELECT i.id, i.words, i.project, i.name FROM interactions i \
                 WHERE i.id IN (SELECT id FROM ids)) {}",
            best_run_per_task(
                &format!(
                    "SELECT w.id, -ts_rank({WEIGHTS}, w.words, q.q)::float8 AS r, w.project, w.name \
                     FROM recent w, q"
                ),
                "$7"
            )
        );
        self.candidates(&sql, words.to_vec(), f, limit).await
    }

    async fn substrings(
        &self,
        parts: &[String],
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        self.records_current().await?;
        // Like SQLite's trigram table: name, command and tags, weighted
        // 4 / 1 / 2; a shorter name containing the piece comes first.
        let patterns: Vec<String> = parts
            .iter()
            .map(|p| contains_pattern(&p.to_lowercase()))
            .collect();
        let sql = best_run_per_task(
            &format!(
                "SELECT m.id, -(SELECT sum(CASE WHEN lower(m.name) LIKE p THEN 4 ELSE 0 END \
                           + CASE WHEN lower(coalesce(m.command, '')) LIKE p THEN 1 ELSE 0 END \
                           + CASE WHEN lower(m.tags::text) LIKE p THEN 2 ELSE 0 END) \
                           FROM unnest($1::text[]) AS p)::float8 \
                           + length(m.name) / 10000.0 AS r, m.project, m.name \
                     FROM (SELECT i.id, i.name, i.project, i.command, i.tags FROM interactions i \
                         WHERE (lower(i.name) LIKE ANY($1) OR lower(coalesce(i.command, '')) LIKE ANY($1) \
                                OR lower(i.tags::text) LIKE ANY($1)) AND {FILTER} \
                         ORDER BY i.id DESC LIMIT $8) AS m"
            ),
            "$7",
        );
        self.candidates(&sql, patterns, f, limit).await
    }

    async fn interactions(&self, ids: &[i64]) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM interactions i WHERE i.id = ANY($1)"
        )))
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn interactions_named(
        &self,
        name: &str,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM interactions i WHERE i.name = $1 \
             AND ($2::text IS NULL OR i.project = $2) ORDER BY i.finished_at DESC, i.id DESC LIMIT $3"
        )))
        .bind(name)
        .bind(project)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn filter_ids(&self, f: &HistoryFilter) -> Result<Vec<i64>> {
        self.records_current().await?;
        let ids = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT i.id FROM interactions i WHERE $1::text IS NULL AND {FILTER} ORDER BY i.id LIMIT $7"
        )))
        .bind(None::<String>)
        .bind(f.project.as_deref())
        .bind(&f.outcomes)
        .bind(&f.tags)
        .bind(f.since)
        .bind(f.until)
        .bind(i64::MAX)
        .fetch_all(&self.pool)
        .await?;
        Ok(ids)
    }

    async fn follow_ups(&self, task_ids: &[String]) -> Result<Vec<(String, u64)>> {
        self.records_current().await?;
        if task_ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT t.name, count(DISTINCT t.id) AS n FROM task_deps d JOIN tasks t ON t.id = d.task_id \
             WHERE d.dep_id = ANY($1) GROUP BY t.name ORDER BY n DESC, t.name",
        )
        .bind(task_ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(n, c)| (n, c as u64)).collect())
    }

    async fn vectors(&self, model: &str, after: i64) -> Result<Vec<(i64, Vec<f32>)>> {
        self.records_current().await?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT interaction_id, vector FROM interaction_vectors WHERE model = $1 \
             AND interaction_id > $2 ORDER BY interaction_id",
        )
        .bind(model)
        .bind(after)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, b)| (id, from_blob(&b)))
            .collect())
    }

    async fn missing_vectors(&self, model: &str, limit: usize) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM interactions i WHERE NOT EXISTS \
             (SELECT 1 FROM interaction_vectors v WHERE v.model = $1 AND v.interaction_id = i.id) \
             ORDER BY i.id LIMIT $2"
        )))
        .bind(model)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn outbox_due(&self, now: i64, limit: usize) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM vectorizer_outbox o JOIN interactions i ON i.id = o.interaction_id \
             WHERE o.next_at <= $1 ORDER BY o.interaction_id LIMIT $2"
        )))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn outbox_state(&self) -> Result<OutboxState> {
        self.records_current().await?;
        let (pending, oldest, max_attempts): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(i.finished_at), max(o.attempts) FROM vectorizer_outbox o \
             JOIN interactions i ON i.id = o.interaction_id",
        )
        .fetch_one(&self.pool)
        .await?;
        let last_error: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM vectorizer_outbox WHERE last_error IS NOT NULL \
             ORDER BY attempts DESC, interaction_id DESC LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?
        .flatten();
        Ok(OutboxState {
            pending: pending as u64,
            oldest_finished_at: oldest,
            max_attempts: max_attempts.unwrap_or(0) as u64,
            last_error,
        })
    }

    async fn interaction_count(&self) -> Result<u64> {
        self.records_current().await?;
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM interactions")
            .fetch_one(&self.pool)
            .await?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::contains_pattern;

    #[test]
    fn like_wildcards_are_taken_literally() {
        assert_eq!(contains_pattern("ploy"), "%ploy%");
        assert_eq!(contains_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }
}
