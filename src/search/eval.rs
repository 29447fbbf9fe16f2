//! The labelled search evaluation: a corpus of past tasks and queries
//! written before the ranking was tuned (`eval/corpus.json`,
//! `eval/queries.json`), loaded through the store's real write path, and
//! scored with MRR@10 and Recall@5 per tag (lexical, paraphrase) and split
//! (dev: tuning allowed; test: reported only).

use std::collections::BTreeMap;

use serde::Deserialize;

use super::SearchRequest;
use crate::error::{Error, Result};
use crate::model::{AttemptStatus, RetryPolicy, TaskResult, TaskSpec, TaskStatus};
use crate::service::TaskQueue;
use crate::store::{ClaimRequest, FinishAttempt, Next};

const CORPUS: &str = include_str!("../../eval/corpus.json");
const QUERIES: &str = include_str!("../../eval/queries.json");
const DAY_MS: i64 = 86_400_000;

#[derive(Deserialize)]
struct Corpus {
    tasks: Vec<CorpusTask>,
}

#[derive(Deserialize)]
struct CorpusTask {
    project: String,
    name: String,
    description: String,
    command: String,
    tags: Vec<String>,
    #[serde(default)]
    failure: Option<String>,
}

/// One labelled query.
#[derive(Debug, Clone, Deserialize)]
pub struct Query {
    pub query: String,
    /// `lexical` or `paraphrase`.
    pub tag: String,
    /// `dev` or `test`.
    pub split: String,
    /// `project/name` of acceptable answers.
    pub relevant: Vec<String>,
}

#[derive(Deserialize)]
struct Queries {
    queries: Vec<Query>,
}

/// The labelled queries.
pub fn queries() -> Vec<Query> {
    serde_json::from_str::<Queries>(QUERIES)
        .expect("eval/queries.json is valid")
        .queries
}

/// Stores the corpus as finished runs (3 or 4 per task, some failed, spread
/// over the last weeks); returns how many records were written.
///
/// Only for a scratch database with no engine running: the runs are real
/// command tasks that this claims and finishes itself, so that none of
/// their commands is ever executed.
pub async fn load_corpus(queue: &TaskQueue, now: i64) -> Result<usize> {
    let corpus = corpus()?;
    let plan: Vec<(usize, usize, usize)> = corpus
        .tasks
        .iter()
        .enumerate()
        .flat_map(|(i, _)| {
            let runs = 3 + i % 2;
            (0..runs).map(move |j| (i, j, runs))
        })
        .collect();
    store_runs(queue, &corpus, plan, now).await
}

/// Stores `records` finished runs made of the corpus's tasks, taken in
/// turn (so each task has about `records / 99` runs): a history of any
/// size for `task-queue bench search`. Same rules as [`load_corpus`].
pub async fn load_copies(queue: &TaskQueue, records: usize, now: i64) -> Result<usize> {
    let corpus = corpus()?;
    let n = corpus.tasks.len();
    let runs = records.div_ceil(n).max(1);
    let plan = (0..records).map(|k| (k % n, k / n, runs)).collect();
    store_runs(queue, &corpus, plan, now).await
}

fn corpus() -> Result<Corpus> {
    serde_json::from_str(CORPUS).map_err(|e| Error::Store(format!("eval/corpus.json: {e}")))
}

/// Submits one run per `(task index, run index, runs of that task)`, claims
/// them all and finishes each with its planned outcome.
async fn store_runs(
    queue: &TaskQueue,
    corpus: &Corpus,
    plan: Vec<(usize, usize, usize)>,
    now: i64,
) -> Result<usize> {
    use futures::StreamExt;
    let mut planned = Vec::with_capacity(plan.len());
    for chunk in plan.chunks(1000) {
        let specs: Vec<TaskSpec> = chunk
            .iter()
            .map(|&(i, _, _)| {
                let t = &corpus.tasks[i];
                let mut spec = TaskSpec::new(&t.name).with_command(&t.command);
                spec.project = Some(t.project.clone());
                spec.description = Some(t.description.clone());
                spec.tags = t.tags.clone();
                spec.retry = Some(RetryPolicy {
                    max_attempts: Some(1),
                    ..Default::default()
                });
                spec
            })
            .collect();
        let submitted = queue.submit_batch(specs).await?;
        planned.extend(
            submitted
                .into_iter()
                .zip(chunk)
                .map(|(s, &(i, j, runs))| (s.id, i, j, runs)),
        );
    }
    // Every run is claimed here and finished below with its planned
    // outcome: none of the corpus commands is ever executed.
    let store = queue.store();
    let mut attempts: BTreeMap<String, u32> = BTreeMap::new();
    // Claimable from the moment they were submitted, whatever `now` says.
    let claim_at = crate::model::Timestamp::now().0.max(now) + 1000;
    while attempts.len() < planned.len() {
        let claimed = store
            .claim(ClaimRequest {
                worker_id: "eval".into(),
                now: claim_at,
                lease_until: claim_at + DAY_MS,
                limit: (planned.len() - attempts.len()).min(10_000),
                server_kinds: true,
                external: None,
                only: None,
            })
            .await?;
        if claimed.is_empty() {
            return Err(Error::Conflict(format!(
                "the evaluation needs an empty queue: claimed {} of {} runs",
                attempts.len(),
                planned.len()
            )));
        }
        attempts.extend(claimed.into_iter().map(|c| (c.id, c.attempt)));
    }
    // Finished concurrently, so the writer commits them in groups.
    let finishes = planned.iter().map(|(id, i, j, runs)| {
        let t = &corpus.tasks[*i];
        let failed = t.failure.is_some() && (i + j) % 3 == 0;
        let base = 2_000 + (t.name.len() as i64 * 7_919) % 600_000;
        let duration = base + base * (*j % 10) as i64 / 10;
        let back = (runs.saturating_sub(*j)) as i64 * 7 + (*i % 5) as i64;
        let finished = now - (back * DAY_MS).min(now / 2);
        let (status, outcome) = if failed {
            (AttemptStatus::Failed, TaskStatus::Failed)
        } else {
            (AttemptStatus::Succeeded, TaskStatus::Succeeded)
        };
        let f = FinishAttempt {
            task_id: id.clone(),
            attempt: attempts[id],
            worker_id: "eval".into(),
            started_at: finished - duration,
            now: finished,
            status,
            error: failed.then(|| t.failure.clone().unwrap_or_default()),
            result: TaskResult {
                exit_code: Some(if failed { 1 } else { 0 }),
                duration_ms: duration as u64,
                attempt: 1,
                stderr_tail: if failed {
                    t.failure.clone().unwrap_or_default()
                } else {
                    String::new()
                },
                ..Default::default()
            },
            logs: Vec::new(),
            next: Next::Done(outcome),
        };
        let id = id.clone();
        async move {
            match store.finish(f).await? {
                crate::store::FinishOutcome::Applied(_) => Ok(()),
                _ => Err(Error::Conflict(format!(
                    "run {id} of the corpus was not finished"
                ))),
            }
        }
    });
    let results: Vec<Result<()>> = futures::stream::iter(finishes)
        .buffer_unordered(256)
        .collect()
        .await;
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok(planned.len())
}

/// Scores of one group of queries.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Scores {
    pub queries: usize,
    pub mrr_at_10: f64,
    pub recall_at_5: f64,
}

/// The evaluation's result, by `split/tag` (and `split/all`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub records: usize,
    pub mode: String,
    /// Latency of the evaluation's searches, one at a time (ms).
    pub search_p50_ms: f64,
    pub search_p99_ms: f64,
    pub groups: BTreeMap<String, Scores>,
    /// Dev queries whose first hit was not relevant, for tuning (test
    /// queries are never listed).
    pub misses: Vec<String>,
}

impl Report {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} records, ranking: {}\n{:<18} {:>7} {:>8} {:>9}\n",
            self.records, self.mode, "split/tag", "queries", "MRR@10", "Recall@5"
        );
        for (k, v) in &self.groups {
            s.push_str(&format!(
                "{:<18} {:>7} {:>8.3} {:>9.3}\n",
                k, v.queries, v.mrr_at_10, v.recall_at_5
            ));
        }
        s.push_str(&format!(
            "search latency, one query at a time: p50 {:.2} ms, p99 {:.2} ms\n",
            self.search_p50_ms, self.search_p99_ms
        ));
        s
    }
}

/// Runs every labelled query against `queue` (loaded with [`load_corpus`]).
pub async fn evaluate(queue: &TaskQueue, records: usize) -> Result<Report> {
    let mut sums: BTreeMap<String, (usize, f64, f64)> = BTreeMap::new();
    let mut misses = Vec::new();
    let mut mode = String::from("lexical");
    let mut latencies = Vec::new();
    for q in queries() {
        let started = std::time::Instant::now();
        let r = queue
            .search(SearchRequest {
                query: q.query.clone(),
                limit: 10,
                ..Default::default()
            })
            .await?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        mode = r.mode.clone();
        let keys: Vec<String> = r
            .hits
            .iter()
            .map(|h| format!("{}/{}", h.project.as_deref().unwrap_or(""), h.name))
            .collect();
        let first = keys.iter().position(|k| q.relevant.contains(k));
        let rr = first.map(|p| 1.0 / (p as f64 + 1.0)).unwrap_or(0.0);
        let found = keys
            .iter()
            .take(5)
            .filter(|k| q.relevant.contains(k))
            .count();
        let recall = found as f64 / q.relevant.len().min(5) as f64;
        if q.split == "dev" && first.is_none_or(|p| p > 0) {
            misses.push(format!(
                "[{}/{}] {:?}: first relevant at {:?}; top 3 {:?}",
                q.split,
                q.tag,
                q.query,
                first.map(|p| p + 1),
                keys.iter().take(3).collect::<Vec<_>>()
            ));
        }
        for key in [format!("{}/{}", q.split, q.tag), format!("{}/all", q.split)] {
            let e = sums.entry(key).or_default();
            e.0 += 1;
            e.1 += rr;
            e.2 += recall;
        }
    }
    let groups = sums
        .into_iter()
        .map(|(k, (n, rr, rec))| {
            (
                k,
                Scores {
                    queries: n,
                    mrr_at_10: rr / n as f64,
                    recall_at_5: rec / n as f64,
                },
            )
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let i = ((latencies.len() as f64 - 1.0) * p).round() as usize;
        latencies
            .get(i)
            .map_or(0.0, |v| (v * 1000.0).round() / 1000.0)
    };
    Ok(Report {
        records,
        mode,
        search_p50_ms: at(0.50),
        search_p99_ms: at(0.99),
        groups,
        misses,
    })
}
