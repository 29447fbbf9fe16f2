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

/// Whether a word of a document (lowercase) stands for a query word
/// (lowercase): it starts with it (`deployment` for `deploy`), they share
/// a stem of five letters or more that leaves at most four of either
/// (`migrations` for `migrate`, `deploy` for `deploying`), or, for query
/// words of four letters or more, it contains it (`deploy` for `ploy`,
/// the pieces of names the trigram index finds).
fn stands_for(word: &str, query_word: &str) -> bool {
    if word.starts_with(query_word) {
        return true;
    }
    let shared = word
        .chars()
        .zip(query_word.chars())
        .take_while(|(a, b)| a == b)
        .count();
    let (w, q) = (word.chars().count(), query_word.chars().count());
    (shared >= 5 && w - shared <= 4 && q - shared <= 4) || (q >= 4 && word.contains(query_word))
}

/// A word of a text: its byte range and the first query word it stands for.
type Token = (usize, usize, Option<usize>);

/// The words of `text`.
fn tokens(text: &str, query_words: &[String]) -> Vec<Token> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (c.is_alphanumeric(), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                let word = text[s..i].to_lowercase();
                let hit = query_words.iter().position(|q| stands_for(&word, q));
                out.push((s, i, hit));
                start = None;
            }
            _ => {}
        }
    }
    out
}

/// How many distinct query words these tokens match.
fn distinct(tokens: &[Token]) -> usize {
    let mut seen: Vec<usize> = tokens.iter().filter_map(|t| t.2).collect();
    seen.sort_unstable();
    seen.dedup();
    seen.len()
}

fn lowercase(words: &[String]) -> Vec<String> {
    words
        .iter()
        .map(|w| w.to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// Bytes of a field looked at for matches and snippets: the start of each
/// field, the end of each output tail (as the full-text index keeps them),
/// so a huge parameter object or log costs no more than a short one.
const FIELD_BYTES: usize = 8192;

/// The first `n` bytes of `s`, cut at a character boundary.
fn head(s: &str, n: usize) -> &str {
    let mut end = n.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The last `n` bytes of `s`, cut at a character boundary.
fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The searchable fields of a record, in the order of their weight.
fn fields(r: &Interaction) -> [(&'static str, String); 9] {
    let results = [
        r.error.as_deref().unwrap_or(""),
        r.output.as_deref().unwrap_or(""),
        &r.artifacts.join(" "),
    ]
    .join(" ");
    let text = |s: &Option<String>| head(s.as_deref().unwrap_or(""), FIELD_BYTES).to_string();
    let cut = |s: String| head(&s, FIELD_BYTES).to_string();
    [
        ("name", r.name.clone()),
        ("description", text(&r.description)),
        ("command", text(&r.command)),
        ("tags", cut(r.tags.join(" "))),
        ("project", text(&r.project)),
        ("dependencies", cut(r.dependencies.join(" "))),
        ("parameters", text(&r.parameters)),
        ("result", cut(results)),
        (
            "logs",
            format!(
                "{} {}",
                tail(&r.stdout_tail, FIELD_BYTES / 2),
                tail(&r.stderr_tail, FIELD_BYTES / 2)
            ),
        ),
    ]
}

/// The fields of `r` with a word that stands for one of `words`
/// (`deploying` for `deploy`, see [`snippet`]).
pub fn matched_fields(r: &Interaction, words: &[String]) -> Vec<String> {
    let words = lowercase(words);
    fields(r)
        .iter()
        .filter(|(_, text)| tokens(text, &words).iter().any(|t| t.2.is_some()))
        .map(|(f, _)| f.to_string())
        .collect()
}

/// Words a snippet shows around its best passage.
const SNIPPET_WORDS: usize = 12;

/// Why `r` matched `words`: the passage of at most twelve words with the
/// most distinct query words, from the weightiest field that has the
/// most, matched words in `[brackets]`, `…` where text was cut. `None`
/// when no field matches.
pub fn snippet(r: &Interaction, words: &[String]) -> Option<String> {
    let words = lowercase(words);
    let mut best: Option<(usize, String, Vec<Token>)> = None;
    for (_, text) in fields(r) {
        let tokens = tokens(&text, &words);
        let score = distinct(&tokens);
        if score > best.as_ref().map_or(0, |b| b.0) {
            best = Some((score, text, tokens));
        }
    }
    let (_, text, tokens) = best?;
    // The window of words with the most distinct matches, the first on ties.
    let width = SNIPPET_WORDS.min(tokens.len());
    let mut from = 0;
    let mut most = 0;
    for w in 0..=tokens.len() - width {
        let n = distinct(&tokens[w..w + width]);
        if n > most {
            most = n;
            from = w;
        }
    }
    let window = &tokens[from..from + width];
    let mut out = String::new();
    if from > 0 {
        out.push('…');
    }
    let mut at = window[0].0;
    for &(s, e, hit) in window {
        out.push_str(&text[at..s]);
        match hit {
            Some(_) => {
                out.push('[');
                out.push_str(&text[s..e]);
                out.push(']');
            }
            None => out.push_str(&text[s..e]),
        }
        at = e;
    }
    if from + width < tokens.len() {
        out.push('…');
    }
    Some(out.split_whitespace().collect::<Vec<_>>().join(" "))
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

    fn record() -> Interaction {
        Interaction {
            id: 1,
            task_id: "t".into(),
            attempt: 1,
            name: "deploy-api".into(),
            project: Some("shop".into()),
            workflow_id: None,
            kind: "command".into(),
            tags: vec!["prod".into()],
            outcome: "failed".into(),
            exit_code: Some(1),
            duration_ms: 10,
            started_at: 0,
            finished_at: 10,
            description: Some(
                "Roll the API service out to the production cluster after the image is built and tested by the suite"
                    .into(),
            ),
            command: Some("kubectl rollout restart deployment/api".into()),
            parameters: None,
            dependencies: vec![],
            error: Some("connection refused by the database".into()),
            output: None,
            artifacts: vec![],
            stdout_tail: String::new(),
            stderr_tail: "error:\n  postgres   unreachable".into(),
        }
    }

    #[test]
    fn snippets_show_the_best_passage_of_the_best_field() {
        let r = record();
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Two query words in the description beat one in the name.
        assert_eq!(
            snippet(&r, &w(&["production", "cluster"])).unwrap(),
            "Roll the API service out to the [production] [cluster] after the image…"
        );
        // One word: the first field that has it, inflections included.
        assert_eq!(snippet(&r, &w(&["deploying"])).unwrap(), "[deploy]-api");
        // A piece of a name is bracketed in the word that contains it.
        assert_eq!(snippet(&r, &w(&["ploy"])).unwrap(), "[deploy]-api");
        // Deep in a long field: cut on both sides, whitespace collapsed.
        assert_eq!(
            snippet(&r, &w(&["suite"])).unwrap(),
            "…production cluster after the image is built and tested by the [suite]"
        );
        assert_eq!(
            snippet(&r, &w(&["postgres", "unreachable"])).unwrap(),
            "error: [postgres] [unreachable]"
        );
        assert_eq!(snippet(&r, &w(&["kafka"])), None);
        // Long fields are looked at up to a bound, cut on characters.
        let mut long = record();
        long.parameters = Some(format!("{} kafka", "é ".repeat(10_000)));
        long.stdout_tail = format!("kafka {}", "ü ".repeat(5_000));
        assert_eq!(snippet(&long, &w(&["kafka"])), None);
        long.stdout_tail.push_str("kafka done");
        let s = snippet(&long, &w(&["kafka"])).unwrap();
        assert_eq!(s, format!("…{}[kafka]…", "ü ".repeat(11)));
        assert_eq!(matched_fields(&long, &w(&["kafka"])), vec!["logs"]);
        // Fields are matched the same way.
        assert_eq!(
            matched_fields(&r, &w(&["Restarting", "databases"])),
            vec!["command", "result"]
        );
        assert_eq!(
            matched_fields(&r, &w(&["api"])),
            vec!["name", "description", "command"]
        );
        assert_eq!(snippet(&r, &[]), None);
    }
}
