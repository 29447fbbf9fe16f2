//! The history part of a store: interaction records (one per finished
//! attempt, written by the store in the transaction that records the
//! attempt), their full-text candidates, stored embeddings, the Vectorizer
//! outbox and retention. Ranking lives in [`crate::search`]; this is only
//! what needs the database.

use async_trait::async_trait;

use crate::error::Result;

/// One finished attempt as search and recommendations see it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Interaction {
    /// Row id (stable for the life of the record).
    pub id: i64,
    pub task_id: String,
    pub attempt: u32,
    pub name: String,
    pub project: Option<String>,
    pub workflow_id: Option<String>,
    pub kind: String,
    pub tags: Vec<String>,
    /// How the attempt ended: `succeeded`, `failed`, `timed_out`, `cancelled`, `lost`.
    pub outcome: String,
    pub exit_code: Option<i64>,
    pub duration_ms: i64,
    pub started_at: i64,
    pub finished_at: i64,
    pub description: Option<String>,
    pub command: Option<String>,
    pub parameters: Option<String>,
    /// Names of the tasks it depended on.
    pub dependencies: Vec<String>,
    pub error: Option<String>,
    /// JSON result output.
    pub output: Option<String>,
    /// Paths of recorded artifacts.
    pub artifacts: Vec<String>,
    pub stdout_tail: String,
    pub stderr_tail: String,
}

impl Interaction {
    /// The text that stands for the record in embeddings and the Vectorizer.
    pub fn document(&self) -> String {
        let mut s = self.name.replace(['-', '_', '.'], " ");
        for part in [
            self.description.as_deref(),
            self.command.as_deref(),
            self.project.as_deref(),
        ]
        .into_iter()
        .flatten()
        {
            s.push_str(". ");
            s.push_str(part);
        }
        if !self.tags.is_empty() {
            s.push_str(". ");
            s.push_str(&self.tags.join(" "));
        }
        if let Some(e) = &self.error {
            s.push_str(". ");
            s.push_str(&e.chars().take(300).collect::<String>());
        }
        s
    }
}

/// Which records a search may return.
#[derive(Debug, Clone, Default)]
pub struct HistoryFilter {
    pub project: Option<String>,
    /// Attempt outcomes (empty: any).
    pub outcomes: Vec<String>,
    /// Tags the task must all carry.
    pub tags: Vec<String>,
    /// Finished at or after (ms).
    pub since: Option<i64>,
    /// Finished before (ms).
    pub until: Option<i64>,
}

/// One full-text candidate list entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: i64,
    /// Relevance, lower is better (SQLite's BM25; PostgreSQL's rank negated).
    pub bm25: f64,
    /// Matching runs of the same task (project and name) in the window;
    /// the candidate is the best of them, the newest on ties.
    pub runs: u64,
}

/// Wraps a query over the window `c(id, r, project, name)` so that each
/// task (project and name) gives one candidate: its best run (the newest
/// on ties), with the task's count of matching runs; tasks ordered by
/// that best score, then by their oldest run. Standard SQL: SQLite and
/// PostgreSQL alike. `limit` is the placeholder of the row limit.
pub fn best_run_per_task(window: &str, limit: &str) -> String {
    format!(
        "SELECT id, r, runs FROM (SELECT c.id, c.r, \
             count(*) OVER (PARTITION BY c.project, c.name) AS runs, \
             min(c.id) OVER (PARTITION BY c.project, c.name) AS first, \
             row_number() OVER (PARTITION BY c.project, c.name ORDER BY c.r, c.id DESC) AS k \
         FROM ({window}) AS c) AS t WHERE k = 1 ORDER BY r, first LIMIT {limit}"
    )
}

/// Full-text candidates are ranked among at most this many matching
/// records, the newest: a word common to a long history then costs the
/// same as in a short one. Runs of one task share their words, so the
/// newest runs stand for the task.
pub const MATCH_WINDOW: usize = 2000;

/// The state of the Vectorizer outbox.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct OutboxState {
    /// Records waiting to be delivered.
    pub pending: u64,
    /// Finish time (ms) of the oldest waiting record.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_finished_at: Option<i64>,
    /// Most delivery attempts of a waiting record.
    pub max_attempts: u64,
    /// The error of the last failed delivery still waiting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A change to history, applied by the store's writer.
#[derive(Debug, Clone)]
pub enum HistoryChange {
    /// Deletes the records and logs of tasks that finished before `before`
    /// (ms); at most `limit` tasks per call.
    Prune { before: i64, limit: usize },
    /// Stores embeddings (normalised f32) of records for `model`.
    PutVectors {
        model: String,
        dim: usize,
        rows: Vec<(i64, Vec<f32>)>,
    },
    /// Records delivered to the Vectorizer leave the outbox.
    Delivered { ids: Vec<i64> },
    /// A delivery failed: try again at `next_at`.
    DeliveryFailed {
        ids: Vec<i64>,
        next_at: i64,
        error: String,
    },
}

/// What the history needs from a store.
#[async_trait]
pub trait HistoryStore: Send + Sync {
    /// Applies a change; returns how many rows (tasks for `Prune`) it touched.
    async fn change_history(&self, change: HistoryChange) -> Result<u64>;
    /// Records matching any of `words` (stemmed, weighted by field) best
    /// first, ranked among the newest [`MATCH_WINDOW`] of them. With
    /// `every`, the newest [`MATCH_WINDOW`] records that match all of the
    /// words are candidates too, so such a record is found however many
    /// newer records match only some of them (a one-word query has
    /// nothing more to add).
    async fn words(
        &self,
        words: &[String],
        every: bool,
        filter: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>>;
    /// Records whose name, command or tags contain any of `parts`
    /// (case-insensitive, three characters or more) best first.
    async fn substrings(
        &self,
        parts: &[String],
        filter: &HistoryFilter,
        limit: usize,
    ) -> Result<Vec<Candidate>>;
    /// Records by id (missing ids are left out), in no particular order.
    async fn interactions(&self, ids: &[i64]) -> Result<Vec<Interaction>>;
    /// Every record of tasks with this name (in this project, if given), newest first.
    async fn interactions_named(
        &self,
        name: &str,
        project: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Interaction>>;
    /// Ids of records passing the filter (for vector scans).
    async fn filter_ids(&self, filter: &HistoryFilter) -> Result<Vec<i64>>;
    /// Names of tasks that depended on any of these tasks, with counts.
    async fn follow_ups(&self, task_ids: &[String]) -> Result<Vec<(String, u64)>>;
    /// Stored vectors of `model` with id greater than `after`, by id.
    async fn vectors(&self, model: &str, after: i64) -> Result<Vec<(i64, Vec<f32>)>>;
    /// Records with no vector for `model`, oldest first.
    async fn missing_vectors(&self, model: &str, limit: usize) -> Result<Vec<Interaction>>;
    /// Outbox records due at `now`, oldest first.
    async fn outbox_due(&self, now: i64, limit: usize) -> Result<Vec<Interaction>>;
    async fn outbox_state(&self) -> Result<OutboxState>;
    /// How many records are stored.
    async fn interaction_count(&self) -> Result<u64>;
}
