//! History search and recommendations over interaction records.
//!
//! The embedded default needs no network and no model: full-text words
//! (stemming, weighted fields, a synonym table for software work) and a
//! trigram index for pieces of names — FTS5 on SQLite, `tsvector` and
//! pg_trgm on PostgreSQL — fused by reciprocal rank, with
//! boosts for the preferred project and for recency. Optional tiers add
//! candidates: embeddings from an OpenAI-compatible endpoint
//! ([`embed`]) and a HiveLLM Vectorizer's text search ([`vectorizer`]).
//! When a tier is configured but failing, the answer says so and the
//! lexical ranking stands alone.

pub mod embed;
pub mod eval;
#[cfg(feature = "local-embeddings")]
pub mod local;
pub mod query;
pub mod rank;
pub mod recommend;
pub mod vectorizer;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, Embedder as EmbedderKind};
use crate::error::{Error, Result};
use crate::model::{TaskStatus, Timestamp};
use crate::store::history::{HistoryFilter, HistoryStore, Interaction};
use embed::{Embedder, OpenAiEmbedder, VectorIndex};
use rank::{Boosts, RankedList};

/// Candidates taken from each list before fusion.
const CANDIDATES: usize = 300;
/// Most hits one search returns.
pub const MAX_LIMIT: usize = 50;

/// A search over past tasks.
#[derive(Debug, Clone)]
pub struct SearchRequest {
    pub query: String,
    /// Only tasks of this project.
    pub project: Option<String>,
    /// Only attempts that ended so: succeeded, failed, timed_out, cancelled.
    pub statuses: Vec<TaskStatus>,
    /// Only tasks carrying all these tags.
    pub tags: Vec<String>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    /// 1..=50 (the default is 10).
    pub limit: usize,
    /// Rank this project's tasks higher without excluding others.
    pub prefer_project: Option<String>,
}

impl Default for SearchRequest {
    fn default() -> Self {
        SearchRequest {
            query: String::new(),
            project: None,
            statuses: Vec::new(),
            tags: Vec::new(),
            since: None,
            until: None,
            limit: 10,
            prefer_project: None,
        }
    }
}

/// One past task that matched.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SearchHit {
    /// The task of the best matching run (get_task shows it in full).
    pub task_id: String,
    pub attempt: u32,
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    /// How that attempt ended.
    pub status: TaskStatus,
    /// Higher is better; comparable within one answer.
    pub score: f64,
    /// Fields the query's words (or their synonyms) appear in.
    pub matched: Vec<String>,
    /// Why it matched: the best passage with matches in [brackets], or the
    /// description when the match came from meaning rather than words.
    pub snippet: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    pub finished_at: Timestamp,
    pub duration_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i64>,
    /// Matching runs of this task name (the hit shows the best one).
    pub runs: u64,
    /// Rankings that found it: `words`, `synonyms`, `trigram`, `semantic`, `vectorizer`.
    pub sources: Vec<String>,
}

/// The answer of a search.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub struct SearchResults {
    pub hits: Vec<SearchHit>,
    /// `lexical` (words and trigrams), or `hybrid` when embeddings or the
    /// Vectorizer contributed.
    pub mode: String,
    /// Why an optional tier did not contribute (not configured tiers are not mentioned).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notices: Vec<String>,
}

/// What the background loops last saw of the optional tiers.
#[derive(Debug, Clone, Default)]
struct TierState {
    embedder_error: Option<String>,
    vectorizer_error: Option<String>,
}

/// Search state shared by queries and the background loops. Clones of the
/// owning `Arc` are shallow.
pub struct Search {
    half_life_days: u32,
    embedder: Option<Arc<dyn Embedder>>,
    /// Set when an embedder is configured that this build cannot provide.
    embedder_unavailable: Option<String>,
    vectors: VectorIndex,
    pub(crate) vectorizer: Option<vectorizer::Vectorizer>,
    state: Mutex<TierState>,
    pub(crate) retention_days: u32,
    /// Why the configured embedder could not be built, until taken.
    startup_error: std::sync::Mutex<Option<Error>>,
}

/// The local model of `search.model_dir`.
#[cfg(feature = "local-embeddings")]
fn local_embedder(dir: Option<&std::path::Path>) -> Result<Arc<dyn Embedder>> {
    let dir = dir.ok_or_else(|| {
        Error::invalid(
            "search.model_dir",
            "is required when search.embedder is local",
        )
    })?;
    let e = local::LocalEmbedder::load(dir)?;
    tracing::info!(model = e.model(), dir = %dir.display(), "local embedding model loaded");
    Ok(Arc::new(e))
}

#[cfg(not(feature = "local-embeddings"))]
fn local_embedder(_: Option<&std::path::Path>) -> Result<Arc<dyn Embedder>> {
    Err(Error::Unsupported {
        field: "search.embedder".into(),
        message: "local needs a build with `--features local-embeddings`; or use openai with a local server such as Ollama or llama.cpp".into(),
    })
}

impl Search {
    /// Builds the tiers `config` asks for.
    pub fn new(config: &Config) -> Search {
        let s = &config.search;
        let mut startup_error = std::sync::Mutex::new(None);
        let (embedder, embedder_unavailable): (Option<Arc<dyn Embedder>>, _) = match s.embedder {
            EmbedderKind::None => (None, None),
            EmbedderKind::Openai => match (&s.openai_url, &s.openai_model) {
                (Some(url), Some(model)) => (
                    Some(Arc::new(OpenAiEmbedder::new(
                        url,
                        model,
                        std::env::var("TASK_QUEUE_EMBEDDINGS_API_KEY").ok(),
                        Duration::from_secs(30),
                    ))),
                    None,
                ),
                _ => (
                    None,
                    Some("search.openai_url and search.openai_model are required".into()),
                ),
            },
            EmbedderKind::Local => match local_embedder(s.model_dir.as_deref()) {
                Ok(e) => (Some(e), None),
                Err(e) => {
                    let why = e.to_string();
                    *startup_error.get_mut().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    (None, Some(why))
                }
            },
        };
        Search {
            half_life_days: s.recency_half_life_days,
            embedder,
            embedder_unavailable,
            vectors: VectorIndex::default(),
            vectorizer: vectorizer::Vectorizer::from_config(&config.vectorizer),
            state: Mutex::new(TierState::default()),
            retention_days: config.storage.retention_days,
            startup_error,
        }
    }

    /// Replaces the embedder (tests and library users with their own model).
    pub fn with_embedder(mut self, e: Arc<dyn Embedder>) -> Self {
        self.set_embedder(e);
        self
    }

    /// Replaces the embedder in place.
    pub fn set_embedder(&mut self, e: Arc<dyn Embedder>) {
        self.embedder = Some(e);
        self.embedder_unavailable = None;
        *self
            .startup_error
            .get_mut()
            .unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Why the configured embedder could not be built (once).
    pub(crate) fn take_startup_error(&self) -> Option<Error> {
        self.startup_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub(crate) fn embedder(&self) -> Option<&Arc<dyn Embedder>> {
        self.embedder.as_ref()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, TierState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_embedder_error(&self, e: Option<String>) {
        self.state().embedder_error = e;
    }

    pub(crate) fn set_vectorizer_error(&self, e: Option<String>) {
        self.state().vectorizer_error = e;
    }

    /// The last delivery error of the Vectorizer, if the latest failed.
    pub fn vectorizer_error(&self) -> Option<String> {
        self.state().vectorizer_error.clone()
    }

    /// Ranked past tasks for `req`.
    pub async fn search(
        &self,
        store: &dyn HistoryStore,
        req: &SearchRequest,
        now: i64,
    ) -> Result<SearchResults> {
        let limit = match req.limit {
            n if n == 0 || n > MAX_LIMIT => {
                return Err(Error::invalid(
                    "limit",
                    format!("must be 1..={MAX_LIMIT}, got {n}"),
                ));
            }
            n => n,
        };
        let terms = query::terms(&req.query);
        let substrings = query::substrings(&req.query, &terms);
        if terms.is_empty() && substrings.is_empty() {
            return Err(Error::invalid(
                "query",
                "give at least one word to look for (letters or digits; punctuation and words like 'the' are ignored)",
            ));
        }
        let filter = filter_of(req)?;
        let started = std::time::Instant::now();
        // The user's own words, then the same with synonyms at a lower
        // weight (a synonym match must not outrank an exact one), and
        // pieces of names: three queries run side by side on the read pool.
        let words = query::word_alternatives(&terms, false);
        let with_synonyms = query::word_alternatives(&terms, true);
        // Without synonyms to add, the second list is the first one.
        let synonyms_differ = with_synonyms != words;
        // Every tier at once: the full-text queries on the read pool, the
        // embedding and vector scan, the Vectorizer.
        let (by_words, by_synonyms, by_trigram, semantic, vectorizer) = futures::join!(
            async {
                match words.is_empty() {
                    true => Ok(Vec::new()),
                    false => store.words(&words, true, &filter, CANDIDATES).await,
                }
            },
            async {
                match synonyms_differ {
                    true => {
                        store
                            .words(&with_synonyms, false, &filter, CANDIDATES)
                            .await
                    }
                    false => Ok(Vec::new()),
                }
            },
            async {
                match substrings.is_empty() {
                    true => Ok(Vec::new()),
                    false => store.substrings(&substrings, &filter, CANDIDATES).await,
                }
            },
            self.semantic(store, req, &filter),
            async {
                match &self.vectorizer {
                    Some(v) => Some(v.search(store, &req.query, CANDIDATES.min(100)).await),
                    None => None,
                }
            },
        );
        let by_words = by_words?;
        let by_synonyms = if synonyms_differ {
            by_synonyms?
        } else {
            by_words.clone()
        };
        let by_trigram = by_trigram?;
        let mut lists = Vec::new();
        // Matching runs per task, as the candidate lists counted them.
        let mut runs: HashMap<i64, u64> = HashMap::new();
        for (source, weight, c, asked) in [
            ("words", 1.0, &by_words, !words.is_empty()),
            ("synonyms", 0.6, &by_synonyms, !words.is_empty()),
            ("trigram", 0.3, &by_trigram, !substrings.is_empty()),
        ] {
            if !asked {
                continue;
            }
            for x in c {
                if source == "trigram" {
                    runs.entry(x.id).or_insert(x.runs);
                } else {
                    runs.insert(x.id, x.runs);
                }
            }
            lists.push(RankedList {
                source,
                weight,
                ids: c.iter().map(|x| x.id).collect(),
            });
        }
        let mut notices = Vec::new();
        let mut hybrid = false;
        match semantic {
            Ok(Some(ids)) => {
                hybrid = true;
                lists.push(RankedList {
                    source: "semantic",
                    weight: 1.0,
                    ids,
                });
            }
            Ok(None) => {}
            Err(e) => notices.push(format!("semantic search unavailable, lexical only: {e}")),
        }
        match vectorizer {
            Some(Ok(ids)) => {
                hybrid = true;
                lists.push(RankedList {
                    source: "vectorizer",
                    weight: 0.7,
                    ids,
                });
            }
            Some(Err(e)) => notices.push(format!("Vectorizer search unavailable: {e}")),
            None => {}
        }
        let candidates_us = started.elapsed().as_micros() as u64;
        let hits = self
            .assemble(store, &lists, &runs, &terms, req, &filter, now, limit)
            .await?;
        tracing::debug!(
            candidates_us,
            total_us = started.elapsed().as_micros() as u64,
            lists = lists.len(),
            "search"
        );
        Ok(SearchResults {
            hits,
            mode: if hybrid { "hybrid" } else { "lexical" }.to_string(),
            notices,
        })
    }

    /// Candidates by meaning; `None` when no embedder is configured.
    async fn semantic(
        &self,
        store: &dyn HistoryStore,
        req: &SearchRequest,
        filter: &HistoryFilter,
    ) -> Result<Option<Vec<i64>>> {
        if let Some(why) = &self.embedder_unavailable {
            return Err(Error::unsupported("search.embedder", why));
        }
        let Some(e) = &self.embedder else {
            return Ok(None);
        };
        let q = e.embed(std::slice::from_ref(&req.query)).await?;
        let Some(q) = q.into_iter().next() else {
            return Ok(None);
        };
        let allowed: Option<HashSet<i64>> = if filter_is_empty(filter) {
            None
        } else {
            Some(store.filter_ids(filter).await?.into_iter().collect())
        };
        let near = self
            .vectors
            .nearest(store, e.model(), &q, allowed.as_ref(), CANDIDATES)
            .await?;
        // Far-off vectors are noise, not candidates.
        Ok(Some(
            near.into_iter()
                .filter(|(_, s)| *s > 0.2)
                .map(|(id, _)| id)
                .collect(),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    async fn assemble(
        &self,
        store: &dyn HistoryStore,
        lists: &[RankedList],
        runs: &HashMap<i64, u64>,
        terms: &[String],
        req: &SearchRequest,
        filter: &HistoryFilter,
        now: i64,
        limit: usize,
    ) -> Result<Vec<SearchHit>> {
        let started = std::time::Instant::now();
        let mut ids: Vec<i64> = lists.iter().flat_map(|l| l.ids.iter().copied()).collect();
        ids.sort_unstable();
        ids.dedup();
        let records: HashMap<i64, Interaction> = store
            .interactions(&ids)
            .await?
            .into_iter()
            // The Vectorizer may know records the filter excludes.
            .filter(|r| passes(r, filter))
            .map(|r| (r.id, r))
            .collect();
        type Key = (Option<String>, String);
        let key_of = |id: i64| -> Option<Key> {
            records
                .get(&id)
                .map(|r| (r.project.clone(), r.name.clone()))
        };
        let fused = rank::fuse(lists, key_of);
        // The newest matching run stands for its task ("how did it go last time").
        let mut groups: HashMap<Key, (&Interaction, u64)> = HashMap::new();
        for r in records.values() {
            let g = groups
                .entry((r.project.clone(), r.name.clone()))
                .or_insert((r, 0));
            g.1 += 1;
            g.1 = g.1.max(runs.get(&r.id).copied().unwrap_or(0));
            if (r.finished_at, r.id) > (g.0.finished_at, g.0.id) {
                g.0 = r;
            }
        }
        let boosts = Boosts {
            project: req.prefer_project.as_deref(),
            now,
            half_life_days: self.half_life_days,
        };
        let mut ranked: Vec<(f64, &Interaction, u64, &Key)> = groups
            .iter()
            .filter_map(|(k, (r, runs))| {
                let f = fused.get(k)?;
                Some((f.score * rank::boost(r, &req.query, &boosts), *r, *runs, k))
            })
            .collect();
        ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.id.cmp(&a.1.id)));
        ranked.truncate(limit);
        let words = query::word_alternatives(terms, true);
        // Why it matched, from the record itself: the same on every store.
        let snippet_of = |r: &Interaction| -> String {
            rank::snippet(r, &words).unwrap_or_else(|| {
                r.description
                    .clone()
                    .unwrap_or_else(|| r.name.clone())
                    .chars()
                    .take(160)
                    .collect()
            })
        };
        tracing::debug!(
            records = records.len(),
            ranked_us = started.elapsed().as_micros() as u64,
            "search assembled"
        );
        Ok(ranked
            .into_iter()
            .map(|(score, r, runs, k)| {
                let snippet = snippet_of(r);
                SearchHit {
                    matched: rank::matched_fields(r, &words),
                    sources: fused[k].sources.iter().map(|s| s.to_string()).collect(),
                    task_id: r.task_id.clone(),
                    attempt: r.attempt,
                    name: r.name.clone(),
                    project: r.project.clone(),
                    status: status_of(&r.outcome),
                    score: (score * 1e4).round() / 1e4,
                    snippet,
                    description: r.description.clone(),
                    command: r.command.clone(),
                    finished_at: Timestamp(r.finished_at),
                    duration_ms: r.duration_ms.max(0) as u64,
                    exit_code: r.exit_code,
                    runs,
                }
            })
            .collect())
    }
}

/// The task status an attempt outcome reads as.
pub fn status_of(outcome: &str) -> TaskStatus {
    match outcome {
        "succeeded" => TaskStatus::Succeeded,
        "timed_out" => TaskStatus::TimedOut,
        "cancelled" => TaskStatus::Cancelled,
        _ => TaskStatus::Failed,
    }
}

fn filter_of(req: &SearchRequest) -> Result<HistoryFilter> {
    let mut outcomes = Vec::new();
    for (i, s) in req.statuses.iter().enumerate() {
        match s {
            TaskStatus::Succeeded => outcomes.push("succeeded"),
            TaskStatus::Failed => outcomes.extend(["failed", "lost"]),
            TaskStatus::TimedOut => outcomes.push("timed_out"),
            TaskStatus::Cancelled => outcomes.push("cancelled"),
            other => {
                return Err(Error::invalid(
                    format!("status[{i}]"),
                    format!(
                        "history holds finished attempts: use succeeded, failed, timed_out or cancelled, not {}",
                        other.as_str()
                    ),
                ));
            }
        }
    }
    if let (Some(a), Some(b)) = (req.since, req.until)
        && a.0 >= b.0
    {
        return Err(Error::invalid("since", "must be before until"));
    }
    Ok(HistoryFilter {
        project: req.project.clone(),
        outcomes: outcomes.into_iter().map(str::to_string).collect(),
        tags: req.tags.clone(),
        since: req.since.map(|t| t.0),
        until: req.until.map(|t| t.0),
    })
}

fn filter_is_empty(f: &HistoryFilter) -> bool {
    f.project.is_none()
        && f.outcomes.is_empty()
        && f.tags.is_empty()
        && f.since.is_none()
        && f.until.is_none()
}

fn passes(r: &Interaction, f: &HistoryFilter) -> bool {
    f.project
        .as_ref()
        .is_none_or(|p| r.project.as_ref() == Some(p))
        && (f.outcomes.is_empty() || f.outcomes.contains(&r.outcome))
        && f.tags.iter().all(|t| r.tags.contains(t))
        && f.since.is_none_or(|s| r.finished_at >= s)
        && f.until.is_none_or(|u| r.finished_at < u)
}
