//! Recommendations: what history says about a task before it runs.
//!
//! The basis is the past runs of the task with that name (in the project,
//! if given and it has some), or else of the most similar past task found
//! by search. Everything is computed from stored records in a fixed
//! order, so the same history gives the same answer.

use std::collections::{BTreeMap, HashSet};

use super::{Search, SearchRequest};
use crate::error::{Error, Result};
use crate::model::{Dur, RetryPolicy, TaskStatus};
use crate::store::history::{HistoryStore, Interaction};

/// Most runs a recommendation looks at.
const MAX_RUNS: usize = 500;

/// What the caller is about to run.
#[derive(Debug, Clone, Default)]
pub struct RecommendRequest {
    pub name: Option<String>,
    pub command: Option<String>,
    pub description: Option<String>,
    pub project: Option<String>,
}

/// A past task like the one described.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SimilarTask {
    pub task_id: String,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    pub status: TaskStatus,
    pub score: f64,
    /// Matching runs of this task name.
    pub runs: u64,
}

/// A name or message and how often it occurred.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Counted {
    pub value: String,
    /// Runs (or tasks) it occurred in.
    pub count: u64,
}

/// Advice from history.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct Recommendation {
    /// The task name the statistics come from (absent when history has nothing similar).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub based_on: Option<String>,
    /// Finished attempts the statistics come from.
    pub runs: u64,
    pub similar: Vec<SimilarTask>,
    /// Share of those attempts that succeeded, 0..=1 (cancelled ones not counted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p50_duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p90_duration_ms: Option<u64>,
    /// 1.5 × the p90 duration of successful runs (at least 30s), rounded up, e.g. `"10m"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggested_timeout: Option<String>,
    /// A retry policy fitted to past failures (absent when retrying never helped or nothing failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggested_retry: Option<RetryPolicy>,
    /// Why that retry advice.
    pub retry_reason: String,
    /// Tasks it usually depends on.
    pub usual_dependencies: Vec<Counted>,
    /// Tasks that usually depend on it.
    pub usual_follow_ups: Vec<Counted>,
    /// The most frequent failure messages (digits folded to `#`).
    pub common_failures: Vec<Counted>,
    /// Artifacts successful runs usually record.
    pub usual_artifacts: Vec<Counted>,
}

impl Search {
    /// Advice for the task described by `req`.
    pub async fn recommend(
        &self,
        store: &dyn HistoryStore,
        req: &RecommendRequest,
        now: i64,
    ) -> Result<Recommendation> {
        let text: Vec<&str> = [&req.name, &req.command, &req.description]
            .into_iter()
            .flatten()
            .map(|s| s.as_str())
            .filter(|s| !s.trim().is_empty())
            .collect();
        if text.is_empty() {
            return Err(Error::invalid(
                "name",
                "give at least one of name, command or description",
            ));
        }
        let similar = match self
            .search(
                store,
                &SearchRequest {
                    query: text.join(" "),
                    prefer_project: req.project.clone(),
                    limit: 10,
                    ..Default::default()
                },
                now,
            )
            .await
        {
            Ok(r) => r.hits,
            // Text with no searchable word still gets exact-name statistics.
            Err(Error::InvalidInput { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut runs = Vec::new();
        let mut based_on = None;
        if let Some(name) = &req.name {
            if req.project.is_some() {
                runs = store
                    .interactions_named(name, req.project.as_deref(), MAX_RUNS)
                    .await?;
            }
            if runs.is_empty() {
                runs = store.interactions_named(name, None, MAX_RUNS).await?;
            }
            if !runs.is_empty() {
                based_on = Some(name.clone());
            }
        }
        if runs.is_empty()
            && let Some(top) = similar.first()
        {
            runs = store
                .interactions_named(&top.name, top.project.as_deref(), MAX_RUNS)
                .await?;
            based_on = Some(top.name.clone());
        }
        let task_ids: Vec<String> = distinct_tasks(&runs);
        let follow = store.follow_ups(&task_ids).await?;
        Ok(advise(runs, similar, based_on, follow))
    }
}

fn distinct_tasks(runs: &[Interaction]) -> Vec<String> {
    let mut seen = HashSet::new();
    runs.iter()
        .filter(|r| seen.insert(r.task_id.clone()))
        .map(|r| r.task_id.clone())
        .collect()
}

fn advise(
    mut runs: Vec<Interaction>,
    similar: Vec<super::SearchHit>,
    based_on: Option<String>,
    follow: Vec<(String, u64)>,
) -> Recommendation {
    runs.sort_by_key(|r| (r.finished_at, r.id));
    let counted: Vec<&Interaction> = runs.iter().filter(|r| r.outcome != "cancelled").collect();
    let ok: Vec<&Interaction> = counted
        .iter()
        .copied()
        .filter(|r| r.outcome == "succeeded")
        .collect();
    let success_rate = (!counted.is_empty())
        .then(|| (ok.len() as f64 / counted.len() as f64 * 1000.0).round() / 1000.0);
    let durations: Vec<i64> = if ok.is_empty() { &counted } else { &ok }
        .iter()
        .map(|r| r.duration_ms.max(0))
        .collect();
    let p50 = percentile(&durations, 0.5);
    let p90 = percentile(&durations, 0.9);
    let (suggested_retry, retry_reason) = retry_advice(&runs);
    let tasks = distinct_tasks(&runs).len() as u64;
    let mut deps: BTreeMap<String, u64> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in &runs {
        if seen.insert(&r.task_id) {
            for d in &r.dependencies {
                *deps.entry(d.clone()).or_default() += 1;
            }
        }
    }
    let mut failures: BTreeMap<String, u64> = BTreeMap::new();
    for r in &counted {
        if r.outcome != "succeeded" {
            let msg = r
                .error
                .clone()
                .filter(|e| !e.is_empty())
                .or_else(|| last_line(&r.stderr_tail))
                .unwrap_or_else(|| format!("{} without a message", r.outcome));
            *failures.entry(fold_digits(&msg)).or_default() += 1;
        }
    }
    let mut artifacts: BTreeMap<String, u64> = BTreeMap::new();
    for r in &ok {
        for a in &r.artifacts {
            *artifacts.entry(a.clone()).or_default() += 1;
        }
    }
    Recommendation {
        based_on,
        runs: runs.len() as u64,
        similar: similar
            .into_iter()
            .map(|h| SimilarTask {
                task_id: h.task_id,
                name: h.name,
                project: h.project,
                status: h.status,
                score: h.score,
                runs: h.runs,
            })
            .collect(),
        success_rate,
        p50_duration_ms: p50.map(|v| v as u64),
        p90_duration_ms: p90.map(|v| v as u64),
        suggested_timeout: p90.map(|p| timeout_for(p as u64)),
        suggested_retry,
        retry_reason,
        usual_dependencies: top(deps, tasks.div_ceil(2).max(1), 10),
        usual_follow_ups: top(follow.into_iter().collect(), 1, 10),
        common_failures: top(failures, 1, 5),
        usual_artifacts: top(artifacts, 1, 10),
    }
}

/// Entries counted at least `min` times, most frequent first (ties by name).
fn top(m: BTreeMap<String, u64>, min: u64, n: usize) -> Vec<Counted> {
    let mut v: Vec<Counted> = m
        .into_iter()
        .filter(|(_, c)| *c >= min)
        .map(|(value, count)| Counted { value, count })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then(a.value.cmp(&b.value)));
    v.truncate(n);
    v
}

/// Nearest-rank percentile.
fn percentile(values: &[i64], q: f64) -> Option<i64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// 1.5 × p90, at least 30 s, rounded up to 10 s, a minute or 10 minutes.
fn timeout_for(p90_ms: u64) -> String {
    let secs = (p90_ms * 3 / 2).div_ceil(1000).max(30);
    if secs < 120 {
        format!("{}s", secs.div_ceil(10) * 10)
    } else if secs < 3600 {
        format!("{}m", secs.div_ceil(60))
    } else {
        format!("{}m", secs.div_ceil(600) * 10)
    }
}

/// Retries help when failed attempts were followed by a success of the
/// same task; they do not when every attempt of a task failed alike.
fn retry_advice(runs: &[Interaction]) -> (Option<RetryPolicy>, String) {
    let mut by_task: BTreeMap<&str, Vec<&Interaction>> = BTreeMap::new();
    for r in runs {
        by_task.entry(&r.task_id).or_default().push(r);
    }
    let mut recovered = 0u32;
    let mut most_needed = 1u32;
    let mut never = 0u32;
    let mut failed_tasks = 0u32;
    for attempts in by_task.values() {
        let failures = attempts
            .iter()
            .filter(|a| !matches!(a.outcome.as_str(), "succeeded" | "cancelled"))
            .count() as u32;
        if failures == 0 {
            continue;
        }
        failed_tasks += 1;
        if let Some(ok) = attempts.iter().find(|a| a.outcome == "succeeded") {
            recovered += 1;
            most_needed = most_needed.max(ok.attempt);
        } else {
            never += 1;
        }
    }
    if failed_tasks == 0 {
        return (
            None,
            "no past run failed: the default retry policy is enough".into(),
        );
    }
    if recovered == 0 {
        return (
            Some(RetryPolicy {
                max_attempts: Some(1),
                ..Default::default()
            }),
            format!(
                "{never} past task(s) failed on every attempt: retrying did not help, look at the common failures"
            ),
        );
    }
    let timeouts = runs.iter().any(|r| r.outcome == "timed_out");
    (
        Some(RetryPolicy {
            max_attempts: Some((most_needed + 1).min(10)),
            initial_delay: Some(Dur::from_secs(if timeouts { 30 } else { 5 })),
            max_delay: None,
            multiplier: Some(2.0),
            jitter: None,
        }),
        format!(
            "{recovered} of {failed_tasks} task(s) with failures succeeded on a later attempt (up to attempt {most_needed})"
        ),
    )
}

fn last_line(s: &str) -> Option<String> {
    s.lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| l.chars().take(200).collect())
}

fn fold_digits(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().take(200) {
        if c.is_ascii_digit() {
            if !out.ends_with('#') {
                out.push('#');
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_timeouts() {
        let v = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100];
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.9), Some(90));
        assert_eq!(percentile(&[], 0.9), None);
        assert_eq!(timeout_for(1_000), "30s");
        assert_eq!(timeout_for(60_000), "90s");
        assert_eq!(timeout_for(200_000), "5m");
        assert_eq!(timeout_for(3_000_000), "80m");
        assert_eq!(fold_digits("exit 137 at 12:30"), "exit # at #:#");
    }
}
