//! Background upkeep of history: retention, embedding backfill and
//! Vectorizer delivery. Failures are logged and retried; none of them
//! stops the engine.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::Shared;
use crate::service::TaskQueue;

/// How often retention runs.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Wait before calling a failing embeddings endpoint again.
const EMBED_RETRY: Duration = Duration::from_secs(30);
/// Idle wake-up, to deliver outbox records whose backoff ended.
const TICK: Duration = Duration::from_secs(2);

pub(super) async fn run(shared: Arc<Shared>) {
    let queue = TaskQueue::from_shared(shared.clone());
    let mut finished = shared.store.subscribe();
    let mut next_prune = Instant::now();
    let mut next_embed = Instant::now();
    let tiers = shared.search.embedder().is_some() || shared.search.vectorizer.is_some();
    loop {
        if Instant::now() >= next_prune {
            next_prune = Instant::now() + PRUNE_EVERY;
            match queue.prune_history().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(tasks = n, "pruned history past storage.retention_days"),
                Err(e) => tracing::warn!(error = %e, "history retention failed; retrying later"),
            }
        }
        if Instant::now() >= next_embed
            && let Err(e) = queue.backfill_vectors(32).await
        {
            tracing::warn!(error = %e, "embedding records failed; search stays lexical until it works");
            next_embed = Instant::now() + EMBED_RETRY;
        }
        if let Err(e) = queue.deliver_to_vectorizer().await {
            tracing::warn!(error = %e, "Vectorizer delivery failed; records stay in the outbox");
        }
        let wait = if tiers { TICK } else { PRUNE_EVERY };
        tokio::select! {
            _ = finished.recv(), if tiers => {
                // Let a burst of finishes land before the next round.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}
