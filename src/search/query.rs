//! From user text to what the indexes look up: words, synonyms,
//! substrings, and FTS5 quoting.
//!
//! A store never splices user text into SQL: SQLite receives every term as
//! a double-quoted FTS5 literal, so no input — quotes, `NEAR(`, `*`, `-`,
//! `:`, parentheses, column names — can change the query's structure;
//! PostgreSQL receives the terms as bound parameters.

/// Words that say nothing about which task is meant.
const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "did", "do", "does", "for", "from", "had",
    "has", "have", "how", "i", "in", "is", "it", "its", "last", "me", "my", "of", "on", "or",
    "our", "that", "the", "this", "time", "to", "us", "was", "we", "were", "what", "when", "which",
    "with", "you", "your", "where", "who", "again", "some", "thing", "things", "task", "tasks",
    "job", "jobs", "run", "ran", "runs", "running", "there", "then", "into", "out", "all",
];

/// Vocabulary of software work: each group's words stand for one another.
/// A term expands to every group it belongs to.
const SYNONYMS: &[&[&str]] = &[
    &[
        "deploy", "ship", "release", "rollout", "publish", "promote", "launch",
    ],
    &["build", "compile", "bundle", "package", "assemble"],
    &["test", "check", "verify", "spec", "suite", "validate"],
    &[
        "db",
        "database",
        "postgres",
        "postgresql",
        "sql",
        "mysql",
        "sqlite",
        "pg",
    ],
    &[
        "delete", "remove", "cleanup", "clean", "prune", "purge", "wipe", "gc", "evict",
    ],
    &["backup", "snapshot", "dump", "archive"],
    &["restore", "recover", "rollback", "revert"],
    &["api", "backend", "service", "server", "endpoint"],
    &[
        "frontend", "ui", "web", "website", "webapp", "client", "site",
    ],
    &["migrate", "schema"],
    &["lint", "linter", "format", "fmt", "style", "clippy"],
    &["docs", "documentation", "doc", "manual"],
    &["cert", "certificate", "tls", "ssl", "https"],
    &["cache", "redis", "memcached"],
    &["queue", "kafka", "rabbitmq", "broker"],
    &["index", "reindex", "elasticsearch", "search"],
    &["email", "mail", "smtp", "newsletter"],
    &["report", "summary", "digest"],
    &["train", "fit", "model"],
    &["etl", "ingest", "import", "load", "sync", "pipeline"],
    &["export", "extract", "download"],
    &["upload", "push", "s3", "bucket", "storage"],
    &["image", "container", "docker", "oci"],
    &["k8s", "kubernetes", "cluster", "helm", "kubectl"],
    &["log"],
    &["rotate", "renew", "refresh"],
    &["secret", "credential", "key", "token"],
    &["scan", "audit", "vulnerability", "security", "cve"],
    &["bench", "benchmark", "perf", "performance", "load"],
    &[
        "monitor",
        "healthcheck",
        "health",
        "probe",
        "ping",
        "uptime",
    ],
    &["dependency", "upgrade", "bump", "update"],
    &["stop", "shutdown", "halt", "kill"],
    &["start", "boot", "launch", "spin"],
    &["prod", "production", "live"],
    &["staging", "stage", "preprod"],
    &["fail", "failed", "failure", "error", "broken", "crash"],
    &["slow", "timeout", "timed", "hang", "stuck"],
    &["user", "account", "customer"],
    &["invoice", "billing", "payment"],
    &["notify", "alert", "page"],
    &["translate", "i18n", "locale"],
    &["thumbnail", "resize"],
    &["analytics", "metrics", "stats", "dashboard"],
    &["nightly", "daily", "cron", "scheduled"],
    &["weekly", "week"],
];

/// The words of `text`: lowercased runs of letters and digits, without
/// stopwords, at most 32.
pub fn terms(text: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = word.to_lowercase();
        if STOPWORDS.contains(&w.as_str()) || out.contains(&w) {
            continue;
        }
        out.push(w);
        if out.len() == 32 {
            break;
        }
    }
    out
}

/// The crude stem used to look a word up in the synonym table.
fn stem(w: &str) -> &str {
    for suffix in ["ing", "ed", "es", "s"] {
        if let Some(s) = w.strip_suffix(suffix)
            && s.len() >= 3
        {
            return s;
        }
    }
    w
}

/// Whether `term` is `word` or an inflection of it (`migrations` of
/// `migrate`, `deployment` of `deploy`). Short words match only exactly.
fn inflects(term: &str, word: &str) -> bool {
    if term == word || stem(term) == word {
        return true;
    }
    let root = word.trim_end_matches('e');
    root.len() >= 4 && term.starts_with(root) && term.len() <= word.len() + 4
}

/// A term and the words that stand for it (the term first).
pub fn expand(term: &str) -> Vec<String> {
    let mut out = vec![term.to_string()];
    for group in SYNONYMS {
        if group.iter().any(|g| inflects(term, g)) {
            for g in *group {
                if !out.iter().any(|o| o == g) {
                    out.push((*g).to_string());
                }
            }
        }
    }
    out
}

/// An FTS5 string literal.
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Literals AND-ed into one FTS5 MATCH expression: `"deploy" AND "api"`.
pub fn fts5_all(literals: &[String]) -> String {
    fts5_joined(literals, " AND ")
}

/// Literals OR-ed into one FTS5 MATCH expression: `"deploy" OR "api"`.
pub fn fts5_any(literals: &[String]) -> String {
    fts5_joined(literals, " OR ")
}

/// Every literal quoted, so no input can change the query's structure,
/// and joined by `op`.
fn fts5_joined(literals: &[String], op: &str) -> String {
    literals
        .iter()
        .map(|l| quote(l))
        .collect::<Vec<_>>()
        .join(op)
}

/// The words a document may match, any of them: the terms, each with its
/// synonym group when `synonyms`. Empty when the text has no words.
pub fn word_alternatives(terms: &[String], synonyms: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for t in terms {
        let words = if synonyms { expand(t) } else { vec![t.clone()] };
        for w in words {
            if !out.contains(&w) {
                out.push(w);
            }
        }
    }
    out
}

/// Substrings for the trigram index, any of them: terms of three or more
/// characters, and the whole query when it looks like part of a name
/// (`deploy-a`: no spaces or control characters).
pub fn substrings(raw: &str, terms: &[String]) -> Vec<String> {
    let mut parts: Vec<String> = terms
        .iter()
        .filter(|t| t.chars().count() >= 3)
        .cloned()
        .collect();
    let whole = raw.trim().to_lowercase();
    let n = whole.chars().count();
    if (3..=64).contains(&n)
        && whole.contains(char::is_alphanumeric)
        && !whole.contains(char::is_whitespace)
        && !whole.contains(char::is_control)
        && !terms.contains(&whole)
    {
        parts.push(whole);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_drop_stopwords_and_punctuation() {
        assert_eq!(
            terms("How did we ship the backend?"),
            vec!["ship", "backend"]
        );
        assert_eq!(terms("NEAR(a b) * - : \"\""), vec!["near", "b"]);
        assert!(terms("").is_empty());
        assert_eq!(terms("Déploiement ünïcode"), vec!["déploiement", "ünïcode"]);
    }

    #[test]
    fn synonyms_expand_both_ways() {
        assert!(expand("ship").contains(&"deploy".to_string()));
        assert!(expand("deploying").contains(&"release".to_string()));
        assert!(expand("postgres").contains(&"database".to_string()));
        assert_eq!(expand("zebra"), vec!["zebra"]);
    }

    #[test]
    fn every_term_is_quoted() {
        let words = word_alternatives(&terms("a\"b OR c*"), true);
        assert_eq!(fts5_any(&words), "\"b\" OR \"c\"");
        assert_eq!(fts5_all(&words), "\"b\" AND \"c\"");
        assert_eq!(
            fts5_all(&["x\" OR y".to_string(), "z".to_string()]),
            "\"x\"\" OR y\" AND \"z\""
        );
        assert_eq!(quote("x\"y"), "\"x\"\"y\"");
        assert_eq!(fts5_any(&substrings("ploy", &terms("ploy"))), "\"ploy\"");
        assert_eq!(
            fts5_any(&substrings("deploy-ap", &terms("deploy-ap"))),
            "\"deploy\" OR \"deploy-ap\""
        );
        assert!(substrings("ab", &terms("ab")).is_empty());
        assert!(substrings("***", &terms("***")).is_empty());
        // No index takes control characters (SQLite ends the literal at a NUL).
        assert_eq!(
            substrings("de\u{0}ploy", &terms("de\u{0}ploy")),
            vec!["ploy"]
        );
    }

    #[test]
    fn synonym_alternatives_keep_the_term_first_once() {
        let w = word_alternatives(&terms("ship deploy"), true);
        assert_eq!(w[0], "ship");
        assert_eq!(w.iter().filter(|x| *x == "deploy").count(), 1);
        assert!(word_alternatives(&[], true).is_empty());
    }
}
