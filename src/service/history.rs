//! History: search, recommendations, and the background work that keeps
//! the optional tiers and retention up to date.

use super::TaskQueue;
use crate::error::{Error, Result};
use crate::search::recommend::{RecommendRequest, Recommendation};
use crate::search::{SearchRequest, SearchResults};
use crate::store::history::{HistoryStore, OutboxState};

impl TaskQueue {
    fn history(&self) -> Result<&dyn HistoryStore> {
        self.inner.store.history().ok_or_else(|| {
            Error::unsupported(
                "search",
                "this store keeps no history, so search and recommendations are not available",
            )
        })
    }

    /// Past tasks ranked for `req` (see [`crate::search`]).
    pub async fn search(&self, req: SearchRequest) -> Result<SearchResults> {
        let now = self.inner.clock.now_ms();
        self.inner.search.search(self.history()?, &req, now).await
    }

    /// What history says about the task described by `req`.
    pub async fn recommend(&self, req: RecommendRequest) -> Result<Recommendation> {
        let now = self.inner.clock.now_ms();
        self.inner
            .search
            .recommend(self.history()?, &req, now)
            .await
    }

    /// Deletes the interaction records and logs of tasks that finished more
    /// than `storage.retention_days` ago (0 keeps everything); returns how
    /// many tasks were pruned.
    pub async fn prune_history(&self) -> Result<u64> {
        let days = self.inner.search.retention_days;
        if days == 0 {
            return Ok(0);
        }
        let before = self.inner.clock.now_ms() - days as i64 * 86_400_000;
        let history = self.history()?;
        let mut total = 0;
        loop {
            let n = history
                .change_history(crate::store::history::HistoryChange::Prune { before, limit: 500 })
                .await?;
            total += n;
            if n < 500 {
                return Ok(total);
            }
        }
    }

    /// The Vectorizer outbox, when a Vectorizer is configured.
    pub async fn vectorizer_state(&self) -> Result<Option<VectorizerState>> {
        let Some(v) = &self.inner.search.vectorizer else {
            return Ok(None);
        };
        Ok(Some(VectorizerState {
            endpoint: v.endpoint().to_string(),
            outbox: self.history()?.outbox_state().await?,
            last_error: self.inner.search.vectorizer_error(),
        }))
    }

    /// Delivers due outbox records to the Vectorizer until none is due or
    /// a delivery fails; returns how many were delivered.
    pub async fn deliver_to_vectorizer(&self) -> Result<usize> {
        let Some(v) = &self.inner.search.vectorizer else {
            return Ok(0);
        };
        let history = self.history()?;
        let mut total = 0;
        loop {
            let now = self.inner.clock.now_ms();
            match v.deliver_due(history, now).await {
                Ok(0) => {
                    // Nothing due: the error stands while failed records
                    // are still backing off.
                    if total > 0 || history.outbox_state().await?.pending == 0 {
                        self.inner.search.set_vectorizer_error(None);
                    }
                    return Ok(total);
                }
                Ok(n) => total += n,
                Err(e) => {
                    self.inner.search.set_vectorizer_error(Some(e.to_string()));
                    return Err(e);
                }
            }
        }
    }

    /// Embeds records that have no vector for the configured model yet;
    /// returns how many were embedded (0 without an embedder).
    pub async fn backfill_vectors(&self, batch: usize) -> Result<usize> {
        let Some(e) = self.inner.search.embedder() else {
            return Ok(0);
        };
        let history = self.history()?;
        let mut total = 0;
        loop {
            let missing = history.missing_vectors(e.model(), batch).await?;
            if missing.is_empty() {
                self.inner.search.set_embedder_error(None);
                return Ok(total);
            }
            let texts: Vec<String> = missing.iter().map(|r| r.document()).collect();
            let vectors = match e.embed(&texts).await {
                Ok(v) => v,
                Err(err) => {
                    self.inner.search.set_embedder_error(Some(err.to_string()));
                    return Err(err);
                }
            };
            let dim = vectors.first().map(Vec::len).unwrap_or(0);
            let rows: Vec<(i64, Vec<f32>)> = missing.iter().map(|r| r.id).zip(vectors).collect();
            total += rows.len();
            history
                .change_history(crate::store::history::HistoryChange::PutVectors {
                    model: e.model().to_string(),
                    dim,
                    rows,
                })
                .await?;
        }
    }
}

/// The Vectorizer integration as `/health` reports it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, schemars::JsonSchema)]
pub struct VectorizerState {
    pub endpoint: String,
    pub outbox: OutboxState,
    /// The error of the latest delivery, when it failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}
