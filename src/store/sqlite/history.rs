//! History in SQLite: interaction records written by the writer, the FTS5
//! word and trigram indexes (kept in step by triggers, see
//! `migrations/sqlite/0004_search.sql`; contentless since
//! `0009_contentless_search.sql`), vectors and the Vectorizer outbox.

use async_trait::async_trait;
use rusqlite::params;
use sqlx::sqlite::SqliteRow;
use sqlx::{AssertSqlSafe, Row};

use super::SqliteStore;
use super::writer::{Conn, Op, exec, scalars};
use crate::error::Result;
use crate::search::query;
use crate::store::history::{
    Candidate, HistoryChange, HistoryFilter, HistoryStore, Interaction, MATCH_WINDOW, OutboxState,
    best_run_per_task,
};

/// The statement that writes the interaction records of every attempt in
/// `records_pending` (see [`write_pending_records`]).
///
/// One statement for many records, not one per record: FTS5 writes its
/// pending index to disk at every statement's savepoint, so a statement
/// per record would make a segment per record, and merging them would be
/// most of the writer's work.
pub(super) const RECORD_SQL: &str = "INSERT OR IGNORE INTO interactions (task_id, attempt, name, project, \
     workflow_id, kind, tags, outcome, task_status, exit_code, duration_ms, started_at, finished_at, \
     description, command, parameters, dependencies, error, output, artifacts, stdout_tail, stderr_tail) \
     SELECT a.task_id, a.attempt, t.name, t.project, t.workflow_id, t.kind, t.tags, a.status, k.task_status, \
     a.exit_code, a.duration_ms, a.started_at, a.finished_at, t.spec ->> '$.description', \
     CASE WHEN t.spec ->> '$.command' IS NOT NULL THEN t.spec ->> '$.command' \
          WHEN json_type(t.spec, '$.argv') = 'array' \
               THEN (SELECT group_concat(value, ' ') FROM json_each(t.spec, '$.argv')) \
          WHEN json_type(t.spec, '$.http') = 'object' \
               THEN concat_ws(' ', coalesce(t.spec ->> '$.http.method', 'GET'), t.spec ->> '$.http.url') \
     END, \
     nullif(t.spec -> '$.parameters', 'null'), \
     (SELECT json_group_array(d.name) FROM task_deps td JOIN tasks d ON d.id = td.dep_id \
      WHERE td.task_id = a.task_id), \
     a.error, nullif(a.result -> '$.output', 'null'), coalesce(a.result -> '$.artifacts', '[]'), \
     coalesce(a.result ->> '$.stdout_tail', ''), coalesce(a.result ->> '$.stderr_tail', '') \
     FROM records_pending k \
     JOIN attempts a ON a.task_id = k.task_id AND a.attempt = k.attempt \
     JOIN tasks t ON t.id = a.task_id ORDER BY k.id";

/// Pending records past which the writer writes them in the same batch.
/// Larger runs make fewer, larger full-text segments; the cost is one
/// batch in this many carrying the records of the others.
pub(super) const RECORDS_PER_WRITE: usize = 512;

/// Writes the interaction records of every pending attempt and empties
/// `records_pending`; returns how many it wrote. Inside the writer's
/// transaction, so a record is written once or not at all, and under a
/// savepoint: if it fails, it leaves the transaction as it found it (the
/// marks stay pending) and the rest of the batch can still commit.
///
/// If the statement for all of them fails (a record that cannot be built,
/// say a task row edited by hand into invalid JSON), they are written one
/// at a time instead: each record that fails is logged and left out, so
/// one bad row never holds up the others or the readers.
pub(super) fn write_pending_records(conn: &Conn) -> Result<u64> {
    conn.execute_batch("SAVEPOINT records")?;
    let all = exec(conn, RECORD_SQL, [])
        .and_then(|n| exec(conn, "DELETE FROM records_pending", []).map(|_| n as u64));
    match all {
        Ok(n) => {
            conn.execute_batch("RELEASE records")?;
            Ok(n)
        }
        Err(e) => {
            conn.execute_batch("ROLLBACK TO records; RELEASE records")?;
            tracing::warn!(error = %e, "writing interaction records together failed; writing them one at a time");
            write_pending_records_one_by_one(conn)
        }
    }
}

fn write_pending_records_one_by_one(conn: &Conn) -> Result<u64> {
    let one = RECORD_SQL.replace("ORDER BY k.id", "WHERE k.id = ?1");
    let marks: Vec<(i64, String, i64)> = {
        let mut st =
            conn.prepare("SELECT id, task_id, attempt FROM records_pending ORDER BY id")?;
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?
    };
    let mut written = 0;
    for (id, task_id, attempt) in marks {
        // A statement is atomic: a failed record leaves nothing behind.
        match exec(conn, &one, params![id]) {
            Ok(n) => written += n as u64,
            Err(e) => tracing::error!(
                error = %e,
                task = %task_id,
                attempt,
                "the interaction record of this attempt cannot be written; it is left out of the history"
            ),
        }
        exec(
            conn,
            "DELETE FROM records_pending WHERE id = ?1",
            params![id],
        )?;
    }
    Ok(written)
}

/// Applies a history change inside the writer's transaction.
pub(super) fn apply(conn: &Conn, change: &HistoryChange) -> Result<u64> {
    match change {
        HistoryChange::Prune { before, limit } => {
            // Records still pending belong to the history being pruned too.
            write_pending_records(conn)?;
            let ids: Vec<String> = scalars(
                conn,
                "SELECT t.id FROM tasks t WHERE t.finished_at < ?1 AND \
                 (EXISTS (SELECT 1 FROM interactions i WHERE i.task_id = t.id) \
                  OR EXISTS (SELECT 1 FROM task_logs l WHERE l.task_id = t.id)) LIMIT ?2",
                params![before, *limit as i64],
            )?;
            if ids.is_empty() {
                return Ok(0);
            }
            let json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
            exec(
                conn,
                "DELETE FROM interactions WHERE task_id IN (SELECT value FROM json_each(?1))",
                params![json],
            )?;
            exec(
                conn,
                "DELETE FROM task_logs WHERE task_id IN (SELECT value FROM json_each(?1))",
                params![json],
            )?;
            Ok(ids.len() as u64)
        }
        HistoryChange::PutVectors { model, dim, rows } => {
            for (id, v) in rows {
                exec(
                    conn,
                    "INSERT OR REPLACE INTO interaction_vectors (interaction_id, model, dim, vector) \
                     SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM interactions WHERE id = ?1)",
                    params![id, model, *dim as i64, to_blob(v)],
                )?;
            }
            Ok(rows.len() as u64)
        }
        HistoryChange::Delivered { ids } => {
            let n = exec(
                conn,
                "DELETE FROM vectorizer_outbox WHERE interaction_id IN (SELECT value FROM json_each(?1))",
                params![serde_json::to_string(ids).unwrap_or_default()],
            )?;
            Ok(n as u64)
        }
        HistoryChange::DeliveryFailed {
            ids,
            next_at,
            error,
        } => {
            let n = exec(
                conn,
                "UPDATE vectorizer_outbox SET attempts = attempts + 1, next_at = ?2, last_error = ?3 \
                 WHERE interaction_id IN (SELECT value FROM json_each(?1))",
                params![
                    serde_json::to_string(ids).unwrap_or_default(),
                    next_at,
                    error
                ],
            )?;
            Ok(n as u64)
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

const COLUMNS: &str = "i.id, i.task_id, i.attempt, i.name, i.project, i.workflow_id, i.kind, i.tags, \
    i.outcome, i.exit_code, i.duration_ms, i.started_at, i.finished_at, i.description, i.command, \
    i.parameters, i.dependencies, i.error, i.output, i.artifacts, i.stdout_tail, i.stderr_tail";

/// The filter as SQL over `i` (`interactions`), parameters `?2`..`?6`.
const FILTER: &str = "(?2 IS NULL OR i.project = ?2) \
    AND (?3 = '[]' OR i.outcome IN (SELECT value FROM json_each(?3))) \
    AND (?4 = '[]' OR NOT EXISTS (SELECT 1 FROM json_each(?4) w \
         WHERE w.value NOT IN (SELECT value FROM json_each(i.tags)))) \
    AND (?5 IS NULL OR i.finished_at >= ?5) AND (?6 IS NULL OR i.finished_at < ?6)";

fn interaction_from(row: &SqliteRow) -> Interaction {
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

impl SqliteStore {
    /// Runs a candidate query: `?1` the MATCH expression, `?2`–`?6` the
    /// filter, `?7` the limit, `?8` the window and, when given, `?9` a
    /// second MATCH expression.
    async fn candidates(
        &self,
        sql: &str,
        expr: &str,
        second: Option<&str>,
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        let mut q = sqlx::query(AssertSqlSafe(sql.to_string()))
            .bind(expr)
            .bind(f.project.as_deref())
            .bind(serde_json::to_string(&f.outcomes).unwrap_or_default())
            .bind(serde_json::to_string(&f.tags).unwrap_or_default())
            .bind(f.since)
            .bind(f.until)
            .bind(limit as i64)
            .bind(MATCH_WINDOW as i64);
        if let Some(second) = second {
            q = q.bind(second);
        }
        let rows = q.fetch_all(&self.read).await?;
        Ok(rows
            .iter()
            .map(|r| Candidate {
                id: r.get(0),
                bm25: r.get(1),
                runs: r.get::<i64, _>(2).max(0) as u64,
            })
            .collect())
    }

    /// Has the writer write the pending interaction records (of any
    /// process on this file) before a read of the history, so the read
    /// sees every finished attempt.
    async fn records_current(&self) -> Result<()> {
        let pending: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM records_pending)")
            .fetch_one(&self.read)
            .await?;
        if pending {
            self.call(|reply| Op::FlushRecords { reply }).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl HistoryStore for SqliteStore {
    async fn change_history(&self, change: HistoryChange) -> Result<u64> {
        self.call(|reply| Op::History {
            change: Box::new(change),
            reply,
        })
        .await
    }

    async fn words(
        &self,
        words: &[String],
        every: bool,
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        self.records_current().await?;
        // Column weights: the name says most about a task, then what it
        // is for and how it runs; output and logs least.
        // Ranked among the newest MATCH_WINDOW matches (FTS5 walks its
        // doclists in descending rowid order, so the cost is bounded).
        let newest = |expr: &str| {
            format!(
                "SELECT * FROM (SELECT interactions_fts.rowid AS id, \
                 bm25(interactions_fts, 8.0, 4.0, 2.0, 3.0, 1.0, 1.0, 0.5, 0.5) AS r, \
                 i.project, i.name \
                 FROM interactions_fts JOIN interactions i ON i.id = interactions_fts.rowid \
                 WHERE interactions_fts MATCH {expr} AND {FILTER} \
                 ORDER BY interactions_fts.rowid DESC LIMIT ?8)"
            )
        };
        let every = every && words.len() > 1;
        // BM25 sums over the query's words, whichever operator joins them,
        // so a record has the same score in both windows.
        let window = if every {
            format!(
                "SELECT id, MIN(r) AS r, project, name FROM ({} UNION ALL {}) GROUP BY id",
                newest("?1"),
                newest("?9")
            )
        } else {
            newest("?1")
        };
        let sql = best_run_per_task(&window, "?7");
        let all = every.then(|| query::fts5_all(words));
        self.candidates(&sql, &query::fts5_any(words), all.as_deref(), f, limit)
            .await
    }

    async fn substrings(
        &self,
        parts: &[String],
        f: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>> {
        self.records_current().await?;
        let sql = best_run_per_task(
            &format!(
                "SELECT interactions_trigram.rowid AS id, \
                 bm25(interactions_trigram, 4.0, 1.0, 2.0) AS r, i.project, i.name \
                 FROM interactions_trigram JOIN interactions i ON i.id = interactions_trigram.rowid \
                 WHERE interactions_trigram MATCH ?1 AND {FILTER} \
                 ORDER BY interactions_trigram.rowid DESC LIMIT ?8"
            ),
            "?7",
        );
        self.candidates(&sql, &query::fts5_any(parts), None, f, limit)
            .await
    }

    async fn interactions(&self, ids: &[i64]) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM interactions i WHERE i.id IN (SELECT value FROM json_each(?1))"
        )))
        .bind(serde_json::to_string(ids).unwrap_or_default())
        .fetch_all(&self.read)
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
            "SELECT {COLUMNS} FROM interactions i WHERE i.name = ?1 \
             AND (?2 IS NULL OR i.project = ?2) ORDER BY i.finished_at DESC, i.id DESC LIMIT ?3"
        )))
        .bind(name)
        .bind(project)
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn filter_ids(&self, f: &HistoryFilter) -> Result<Vec<i64>> {
        self.records_current().await?;
        let ids = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT i.id FROM interactions i WHERE ?1 IS NULL AND {FILTER} LIMIT ?7"
        )))
        .bind(None::<String>)
        .bind(f.project.as_deref())
        .bind(serde_json::to_string(&f.outcomes).unwrap_or_default())
        .bind(serde_json::to_string(&f.tags).unwrap_or_default())
        .bind(f.since)
        .bind(f.until)
        .bind(i64::MAX)
        .fetch_all(&self.read)
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
             WHERE d.dep_id IN (SELECT value FROM json_each(?1)) GROUP BY t.name ORDER BY n DESC, t.name",
        )
        .bind(serde_json::to_string(task_ids).unwrap_or_default())
        .fetch_all(&self.read)
        .await?;
        Ok(rows.into_iter().map(|(n, c)| (n, c as u64)).collect())
    }

    async fn vectors(&self, model: &str, after: i64) -> Result<Vec<(i64, Vec<f32>)>> {
        self.records_current().await?;
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "SELECT interaction_id, vector FROM interaction_vectors WHERE model = ?1 \
             AND interaction_id > ?2 ORDER BY interaction_id",
        )
        .bind(model)
        .bind(after)
        .fetch_all(&self.read)
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
             (SELECT 1 FROM interaction_vectors v WHERE v.model = ?1 AND v.interaction_id = i.id) \
             ORDER BY i.id LIMIT ?2"
        )))
        .bind(model)
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn outbox_due(&self, now: i64, limit: usize) -> Result<Vec<Interaction>> {
        self.records_current().await?;
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM vectorizer_outbox o JOIN interactions i ON i.id = o.interaction_id \
             WHERE o.next_at <= ?1 ORDER BY o.interaction_id LIMIT ?2"
        )))
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&self.read)
        .await?;
        Ok(rows.iter().map(interaction_from).collect())
    }

    async fn outbox_state(&self) -> Result<OutboxState> {
        self.records_current().await?;
        let (pending, oldest, max_attempts): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT count(*), min(i.finished_at), max(o.attempts) FROM vectorizer_outbox o \
             JOIN interactions i ON i.id = o.interaction_id",
        )
        .fetch_one(&self.read)
        .await?;
        let last_error: Option<String> = sqlx::query_scalar(
            "SELECT last_error FROM vectorizer_outbox WHERE last_error IS NOT NULL \
             ORDER BY attempts DESC, interaction_id DESC LIMIT 1",
        )
        .fetch_optional(&self.read)
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
            .fetch_one(&self.read)
            .await?;
        Ok(n as u64)
    }
}
