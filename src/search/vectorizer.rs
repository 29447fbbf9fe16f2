//! The HiveLLM Vectorizer: interaction records are delivered through a
//! durable outbox table (every record enters it in the transaction that
//! writes it; it leaves only when the Vectorizer accepted it), and its
//! text search adds candidates to `search_tasks`. SQLite stays the source
//! of truth.
//!
//! The REST subset used: `POST /collections` (create; an answer saying it
//! exists is fine), `POST /insert_texts` with
//! `{collection, texts: [{id, text, metadata}]}`, and
//! `POST /collections/{name}/search/text` with `{query, limit}` answering
//! `{results: [{id, score, metadata?}]}`.

use std::time::Duration;

use crate::config::VectorizerConfig;
use crate::error::{Error, Result};
use crate::store::history::{HistoryChange, HistoryStore, Interaction};

/// Longest wait between delivery attempts of a record.
const MAX_BACKOFF_MS: i64 = 5 * 60 * 1000;

/// A Vectorizer client for one collection.
pub struct Vectorizer {
    base: String,
    collection: String,
    api_key: Option<String>,
    timeout: Duration,
    batch_size: usize,
    created: std::sync::atomic::AtomicBool,
}

impl Vectorizer {
    /// `None` when no endpoint is configured.
    pub fn from_config(c: &VectorizerConfig) -> Option<Vectorizer> {
        let base = c.endpoint.as_deref()?.trim_end_matches('/').to_string();
        Some(Vectorizer {
            base,
            collection: c.collection.clone(),
            api_key: c.api_key(),
            timeout: c.timeout.0,
            batch_size: c.batch_size.max(1),
            created: Default::default(),
        })
    }

    /// The endpoint, for `/health`.
    pub fn endpoint(&self) -> &str {
        &self.base
    }

    async fn post(&self, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
        let (url, status, text) = self.post_raw(path, body).await?;
        if !status.is_success() {
            return Err(Error::Store(format!(
                "Vectorizer {url}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
    }

    /// Sends a request; (url, status, body) whatever the status, an error
    /// only when no answer came.
    async fn post_raw(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<(String, reqwest::StatusCode, String)> {
        let url = format!("{}{path}", self.base);
        let mut req = crate::executor::http::client()
            .post(&url)
            .timeout(self.timeout)
            .json(&body);
        if let Some(k) = &self.api_key {
            req = req.header("x-api-key", k).bearer_auth(k);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Error::Store(format!("Vectorizer {url}: {e}")))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        Ok((url, status, text))
    }

    /// Creates the collection unless this process already saw it exist.
    async fn ensure_collection(&self) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.created.load(Ordering::Relaxed) {
            return Ok(());
        }
        let body =
            serde_json::json!({"name": self.collection, "dimension": 384, "metric": "cosine"});
        let (url, status, text) = self.post_raw("/collections", body).await?;
        // An existing collection is what we want: 409, or an answer saying
        // so. (Only the status and the answer's own text count: an error
        // message that quotes the URL could contain "409" in a port.)
        let exists = status == reqwest::StatusCode::CONFLICT
            || text.to_ascii_lowercase().contains("already exists");
        if !status.is_success() && !exists {
            return Err(Error::Store(format!(
                "Vectorizer {url}: HTTP {status}: {}",
                text.chars().take(200).collect::<String>()
            )));
        }
        self.created.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Delivers one batch of due outbox records; returns how many were delivered.
    pub async fn deliver_due(&self, store: &dyn HistoryStore, now: i64) -> Result<usize> {
        let due = store.outbox_due(now, self.batch_size).await?;
        if due.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = due.iter().map(|r| r.id).collect();
        let sent = async {
            self.ensure_collection().await?;
            let texts: Vec<serde_json::Value> = due.iter().map(payload).collect();
            self.post(
                "/insert_texts",
                serde_json::json!({"collection": self.collection, "texts": texts}),
            )
            .await
        }
        .await;
        match sent {
            Ok(_) => {
                store
                    .change_history(HistoryChange::Delivered { ids: ids.clone() })
                    .await?;
                Ok(ids.len())
            }
            Err(e) => {
                let attempts = store.outbox_state().await?.max_attempts.min(20) as u32;
                let backoff = (1000i64 << attempts.min(16)).min(MAX_BACKOFF_MS);
                store
                    .change_history(HistoryChange::DeliveryFailed {
                        ids,
                        next_at: now + backoff,
                        error: e.to_string(),
                    })
                    .await?;
                Err(e)
            }
        }
    }

    /// Record ids the Vectorizer ranks for `query`, best first.
    pub async fn search(
        &self,
        store: &dyn HistoryStore,
        query: &str,
        limit: usize,
    ) -> Result<Vec<i64>> {
        let path = format!("/collections/{}/search/text", self.collection);
        let answer = self
            .post(&path, serde_json::json!({"query": query, "limit": limit}))
            .await?;
        let results = answer
            .get("results")
            .and_then(|r| r.as_array())
            .or_else(|| answer.as_array())
            .cloned()
            .unwrap_or_default();
        let mut hits: Vec<(i64, Option<String>)> = Vec::new();
        for r in &results {
            let id = match r.get("id") {
                Some(serde_json::Value::String(s)) => s.parse::<i64>().ok(),
                Some(serde_json::Value::Number(n)) => n.as_i64(),
                _ => None,
            };
            let task = r
                .get("metadata")
                .or_else(|| r.get("payload"))
                .and_then(|m| m.get("task_id"))
                .and_then(|t| t.as_str())
                .map(str::to_string);
            if let Some(id) = id {
                hits.push((id, task));
            }
        }
        // Keep only ids that are still this store's records of the same task.
        let ids: Vec<i64> = hits.iter().map(|h| h.0).collect();
        let known = store.interactions(&ids).await?;
        Ok(hits
            .into_iter()
            .filter(|(id, task)| {
                known
                    .iter()
                    .any(|k| k.id == *id && task.as_ref().is_none_or(|t| *t == k.task_id))
            })
            .map(|(id, _)| id)
            .collect())
    }
}

/// What the Vectorizer stores for one record.
fn payload(r: &Interaction) -> serde_json::Value {
    serde_json::json!({
        "id": r.id.to_string(),
        "text": r.document(),
        "metadata": {
            "task_id": r.task_id,
            "attempt": r.attempt,
            "name": r.name,
            "project": r.project,
            "status": r.outcome,
            "duration_ms": r.duration_ms,
            "finished_at": r.finished_at,
            "tags": r.tags,
        }
    })
}
