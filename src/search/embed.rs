//! The semantic tier: an [`Embedder`] turns text into vectors; records'
//! vectors are stored per model and scanned by brute force (normalised
//! f32, so cosine is a dot product).

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::store::history::HistoryStore;

/// Turns text into vectors.
#[async_trait]
pub trait Embedder: Send + Sync {
    /// The model name vectors are stored under.
    fn model(&self) -> &str;
    /// One vector per text, in order.
    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;
}

/// An OpenAI-compatible `POST {base}/embeddings` endpoint (OpenAI,
/// Ollama, llama.cpp server, vLLM).
pub struct OpenAiEmbedder {
    url: String,
    model: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl OpenAiEmbedder {
    /// `base` is the API root, e.g. `http://localhost:11434/v1`.
    pub fn new(base: &str, model: &str, api_key: Option<String>, timeout: Duration) -> Self {
        OpenAiEmbedder {
            url: format!("{}/embeddings", base.trim_end_matches('/')),
            model: model.to_string(),
            api_key,
            timeout,
        }
    }
}

#[derive(serde::Deserialize)]
struct EmbeddingResponse {
    data: Vec<EmbeddingItem>,
}

#[derive(serde::Deserialize)]
struct EmbeddingItem {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let fail = |m: String| Error::Store(format!("embeddings endpoint {}: {m}", self.url));
        let mut req = crate::executor::http::client()
            .post(&self.url)
            .timeout(self.timeout)
            .json(&serde_json::json!({"model": self.model, "input": texts}));
        if let Some(k) = &self.api_key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            return Err(fail(format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            )));
        }
        let body: EmbeddingResponse = resp
            .json()
            .await
            .map_err(|e| fail(format!("unreadable answer: {e}")))?;
        if body.data.len() != texts.len() {
            return Err(fail(format!(
                "{} vectors for {} texts",
                body.data.len(),
                texts.len()
            )));
        }
        let mut items = body.data;
        items.sort_by_key(|i| i.index.unwrap_or(usize::MAX));
        let dim = items[0].embedding.len();
        if dim == 0 || items.iter().any(|i| i.embedding.len() != dim) {
            return Err(fail("vectors of different or zero dimensions".into()));
        }
        Ok(items.into_iter().map(|i| normalise(i.embedding)).collect())
    }
}

/// Scales to unit length (a zero vector stays zero).
pub fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
    v
}

/// Dot product with eight independent partial sums, so the compiler can
/// keep them in SIMD lanes (a single running float sum cannot be
/// reordered, and stays scalar).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// The vectors of one model, loaded incrementally from the store.
#[derive(Default)]
struct Loaded {
    last_id: i64,
    dim: usize,
    ids: Vec<i64>,
    data: Vec<f32>,
}

/// An in-memory copy of the stored vectors of one model.
#[derive(Default)]
pub struct VectorIndex {
    loaded: Mutex<Loaded>,
}

impl VectorIndex {
    /// The `limit` records most similar to `query` (normalised), best first,
    /// among `allowed` when given.
    pub async fn nearest(
        &self,
        store: &dyn HistoryStore,
        model: &str,
        query: &[f32],
        allowed: Option<&std::collections::HashSet<i64>>,
        limit: usize,
    ) -> Result<Vec<(i64, f32)>> {
        let mut l = self.loaded.lock().await;
        for (id, v) in store.vectors(model, l.last_id).await? {
            if l.dim == 0 {
                l.dim = v.len();
            }
            l.last_id = id;
            if v.len() != l.dim {
                continue;
            }
            l.ids.push(id);
            l.data.extend_from_slice(&v);
        }
        if l.dim == 0 || query.len() != l.dim {
            return Ok(Vec::new());
        }
        let mut scored: Vec<(i64, f32)> = l
            .ids
            .iter()
            .zip(l.data.chunks_exact(l.dim))
            .filter(|(id, _)| allowed.is_none_or(|a| a.contains(id)))
            .map(|(id, v)| (*id, dot(query, v)))
            .collect();
        // Only the best `limit` need ordering.
        let by_score = |a: &(i64, f32), b: &(i64, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if scored.len() > limit && limit > 0 {
            scored.select_nth_unstable_by(limit - 1, by_score);
            scored.truncate(limit);
        }
        scored.sort_by(by_score);
        scored.truncate(limit);
        Ok(scored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_product_matches_the_plain_sum() {
        for n in [0usize, 1, 7, 8, 9, 384, 385] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let plain: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - plain).abs() < 1e-4, "n = {n}");
        }
    }

    #[test]
    fn normalised_vectors_have_unit_length() {
        let v = normalise(vec![3.0, 4.0]);
        assert!((dot(&v, &v) - 1.0).abs() < 1e-6);
        assert_eq!(normalise(vec![0.0, 0.0]), vec![0.0, 0.0]);
    }
}
