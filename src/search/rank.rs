//! Ranking: reciprocal-rank fusion of the candidate lists, boosts for the
//! preferred project and recency, one hit per task, and why it matched.

use std::collections::HashMap;

use crate::store::history::Interaction;

/// RRF's damping constant: how much the first places dominate.
const RRF_K: f64 = 60.0;

/// One ranked list of record ids, best first, with the weight it carries
/// in the fusion.
pub struct RankedList {
    pub source: &'static str,
    pub weight: f64,
    pub ids: Vec<i64>,
}

/// A task's fused score and the lists it came from.
#[derive(Debug, Clone, Default)]
pub struct Fused {
    pub score: f64,
    pub sources: Vec<&'static str>,
}

/// Reciprocal-rank fusion over groups of records (a task's runs count
/// once per list, at the place of its best run): Σ weight / (k + rank).
pub fn fuse<K: Eq + std::hash::Hash + Clone>(
    lists: &[RankedList],
    group_of: impl Fn(i64) -> Option<K>,
) -> HashMap<K, Fused> {
    let mut out: HashMap<K, Fused> = HashMap::new();
    for list in lists {
        let mut seen = std::collections::HashSet::new();
        let mut rank = 0usize;
        for id in &list.ids {
            let Some(k) = group_of(*id) else { continue };
            if !seen.insert(k.clone()) {
                continue;
            }
            rank += 1;
            let f = out.entry(k).or_default();
            f.score += list.weight / (RRF_K + rank as f64);
            if !f.sources.contains(&list.source) {
                f.sources.push(list.source);
            }
        }
    }
    out
}

/// Boosts that do not depend on the text.
pub struct Boosts<'a> {
    pub project: Option<&'a str>,
    pub now: i64,
    pub half_life_days: u32,
}

/// Multiplier for a task, from its newest matching run: up to +5 % when
/// recent (halving every half-life; a tie-breaker, one place in RRF is
/// ~1.6 %), +20 % in the preferred project, +50 % when the query is the
/// task's name.
pub fn boost(r: &Interaction, query: &str, b: &Boosts<'_>) -> f64 {
    let mut m = 1.0;
    if b.half_life_days > 0 {
        let age_days = (b.now - r.finished_at).max(0) as f64 / 86_400_000.0;
        m *= 1.0 + 0.05 * 0.5f64.powf(age_days / b.half_life_days as f64);
    }
    if b.project.is_some() && r.project.as_deref() == b.project {
        m *= 1.2;
    }
    if query.trim().eq_ignore_ascii_case(&r.name) {
        m *= 1.5;
    }
    m
}

/// The fields of `r` that contain one of `words` (compared on their first
/// letters, so `deploying` matches `deploy`).
pub fn matched_fields(r: &Interaction, words: &[String]) -> Vec<String> {
    let stems: Vec<String> = words
        .iter()
        .map(|w| {
            let n = w.chars().count();
            let keep = if n > 5 { n - 2 } else { n };
            w.chars().take(keep).collect()
        })
        .collect();
    let tags = r.tags.join(" ");
    let deps = r.dependencies.join(" ");
    let results = [
        r.error.as_deref().unwrap_or(""),
        r.output.as_deref().unwrap_or(""),
        &r.artifacts.join(" "),
    ]
    .join(" ");
    let logs = format!("{} {}", r.stdout_tail, r.stderr_tail);
    let fields: [(&str, &str); 9] = [
        ("name", &r.name),
        ("description", r.description.as_deref().unwrap_or("")),
        ("command", r.command.as_deref().unwrap_or("")),
        ("tags", &tags),
        ("project", r.project.as_deref().unwrap_or("")),
        ("dependencies", &deps),
        ("parameters", r.parameters.as_deref().unwrap_or("")),
        ("result", &results),
        ("logs", &logs),
    ];
    fields
        .iter()
        .filter(|(_, text)| {
            let text = text.to_lowercase();
            stems
                .iter()
                .any(|s| !s.is_empty() && text.contains(s.as_str()))
        })
        .map(|(f, _)| f.to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fusion_rewards_agreement() {
        let lists = [
            RankedList {
                source: "words",
                weight: 1.0,
                ids: vec![1, 2, 3],
            },
            RankedList {
                source: "trigram",
                weight: 1.0,
                ids: vec![3, 1],
            },
        ];
        let f = fuse(&lists, Some);
        assert!(f[&1].score > f[&3].score);
        assert!(f[&3].score > f[&2].score);
        assert_eq!(f[&1].sources, vec!["words", "trigram"]);
        // Runs of one task (10 and 11) count once, at the best place.
        let runs = [RankedList {
            source: "words",
            weight: 1.0,
            ids: vec![10, 11, 2],
        }];
        let g = fuse(&runs, |id| Some(id / 10));
        assert_eq!(g.len(), 2);
        assert!(g[&1].score > g[&0].score);
    }
}
