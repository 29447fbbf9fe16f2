//! History: interaction records, search (ranking, filters, hostile input),
//! the labelled evaluation, recommendations, retention, the embeddings
//! endpoint client and the Vectorizer outbox.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value, json};
use task_queue::config::{Durability, Embedder};
use task_queue::error::Error;
use task_queue::model::{RetryPolicy, TaskStatus, Timestamp};
use task_queue::search::SearchRequest;
use task_queue::search::eval;
use task_queue::search::recommend::RecommendRequest;
use task_queue::{Config, Task, TaskQueue};

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

/// `sql`'s single number, read beside the queue.
async fn count(pool: &sqlx::SqlitePool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
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
    // Floors a little under the reported numbers (docs/SEARCH.md).
    assert!(g("test/all").mrr_at_10 >= 0.80, "{}", report.table());
    assert!(g("test/paraphrase").mrr_at_10 >= 0.70, "{}", report.table());
    assert!(g("test/all").recall_at_5 >= 0.90, "{}", report.table());
    assert!(g("dev/all").mrr_at_10 >= 0.80, "{}", report.table());
}

/// The same evaluation on PostgreSQL (a fresh schema), with the same
/// floors: both stores answer under one ranking contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_evaluation_on_postgres_meets_its_floor() {
    let Some(b) = crate::conformance::Backend::postgres("search_evaluation_on_postgres").await
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.storage.database_url = Some(b.url());
    let q = TaskQueue::open_with(c).await.unwrap();
    let n = eval::load_corpus(&q, Timestamp::now().0).await.unwrap();
    let report = eval::evaluate(&q, n).await.unwrap();
    eprintln!("{}", report.table());
    for m in &report.misses {
        eprintln!("{m}");
    }
    let g = |k: &str| report.groups[k].clone();
    assert!(g("test/all").mrr_at_10 >= 0.80, "{}", report.table());
    assert!(g("test/paraphrase").mrr_at_10 >= 0.70, "{}", report.table());
    assert!(g("test/all").recall_at_5 >= 0.90, "{}", report.table());
    assert!(g("dev/all").mrr_at_10 >= 0.80, "{}", report.table());
    b.cleanup().await;
}

/// GET through the REST router.
async fn rest_get(q: &TaskQueue, uri: &str) -> (StatusCode, Value) {
    use tower::ServiceExt;
    let app = task_queue::rest::router(task_queue::rest::ApiState {
        queue: q.clone(),
        metrics: Default::default(),
        started: std::time::Instant::now(),
        shutdown: Default::default(),
    });
    let req = axum::http::Request::get(uri)
        .body(axum::body::Body::empty())
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_records_every_finished_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let build = q
        .submit(
            Task::new("build-api")
                .with_command("echo compiled")
                .with_project("shop"),
        )
        .await
        .unwrap();
    let mut spec = Task::new("deploy-api")
        .with_command("echo rolling out the shop; echo 'connection refused by lb' >&2; exit 3")
        .with_project("shop")
        .with_tag("prod")
        .with_retry(RetryPolicy {
            max_attempts: Some(2),
            initial_delay: Some("10ms".parse().unwrap()),
            ..RetryPolicy::default()
        });
    spec.description = Some("Roll the API out to production".into());
    spec.parameters = Some(json!({"region": "eu-west-1"}));
    spec.depends_on = vec![serde_json::from_value(json!(build.id)).unwrap()];
    let deploy = q.submit(spec).await.unwrap();
    q.run_until_idle().await.unwrap();
    assert_eq!(q.get(&deploy.id).await.unwrap().status, TaskStatus::Failed);

    let r = q.search(req("ship the backend")).await.unwrap();
    assert_eq!(r.mode, "lexical");
    let hit = &r.hits[0];
    assert_eq!(hit.name, "deploy-api");
    assert_eq!(hit.task_id, deploy.id);
    assert_eq!(hit.runs, 2, "one record per attempt");
    assert_eq!(hit.attempt, 2, "the newest run stands for the task");
    assert_eq!(hit.status, TaskStatus::Failed);
    assert_eq!(hit.exit_code, Some(3));
    assert!(hit.matched.contains(&"name".to_string()), "{hit:?}");
    assert!(hit.snippet.contains('['), "{hit:?}");
    // Output tails, parameters, dependencies and tags are indexed too.
    for (query, field) in [
        ("connection refused", "logs"),
        ("eu-west-1", "parameters"),
        ("build", "dependencies"),
    ] {
        let r = q.search(req(query)).await.unwrap();
        let h = r
            .hits
            .iter()
            .find(|h| h.name == "deploy-api")
            .unwrap_or_else(|| panic!("{query}: {r:?}"));
        assert!(h.matched.contains(&field.to_string()), "{query}: {h:?}");
    }
    let only_ok = q
        .search(SearchRequest {
            statuses: vec![TaskStatus::Succeeded],
            ..req("api")
        })
        .await
        .unwrap();
    assert_eq!(only_ok.hits.len(), 1);
    assert_eq!(only_ok.hits[0].name, "build-api");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_filters_partial_names_and_hostile_input() {
    let dir = tempfile::tempdir().unwrap();
    let (q, _) = eval_queue(&dir).await;
    let r = q.search(req("ploy")).await.unwrap();
    assert!(
        r.hits.iter().take(3).all(|h| h.name.contains("deploy")),
        "{r:?}"
    );
    assert!(r.hits[0].sources.contains(&"trigram".to_string()));

    let r = q
        .search(SearchRequest {
            project: Some("infra".into()),
            ..req("backup")
        })
        .await
        .unwrap();
    assert!(!r.hits.is_empty());
    assert!(r.hits.iter().all(|h| h.project.as_deref() == Some("infra")));
    let r = q
        .search(SearchRequest {
            tags: vec!["postgres".into(), "cron".into()],
            ..req("backup")
        })
        .await
        .unwrap();
    let mut names: Vec<&str> = r.hits.iter().map(|h| h.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["backup-ledger-db", "backup-postgres-cluster"]);
    let r = q
        .search(SearchRequest {
            statuses: vec![TaskStatus::Failed],
            ..req("deploy")
        })
        .await
        .unwrap();
    assert!(!r.hits.is_empty());
    assert!(r.hits.iter().all(|h| h.status == TaskStatus::Failed));
    let future = Timestamp(Timestamp::now().0 + 86_400_000);
    let r = q
        .search(SearchRequest {
            since: Some(future),
            ..req("deploy")
        })
        .await
        .unwrap();
    assert!(r.hits.is_empty());

    // Nothing a user types can break the MATCH expression.
    for hostile in [
        "\"",
        "\"deploy",
        "deploy\"\"\"",
        "NEAR(deploy api",
        "NEAR(\"a\" \"b\", 2)",
        "deploy*",
        "-deploy",
        "deploy:api",
        "name:deploy",
        "((( deploy",
        ") OR (",
        "AND OR NOT",
        "ünïcödé 🚀 デプロイ",
        "'; DROP TABLE tasks; --",
        "^deploy",
        "{name}: api",
        "\0\u{1}",
    ] {
        match q.search(req(hostile)).await {
            Ok(_) => {}
            Err(Error::InvalidInput { field, .. }) => assert_eq!(field, "query", "{hostile:?}"),
            Err(e) => panic!("{hostile:?}: {e}"),
        }
    }
    for empty in ["", "   ", "*", "\"\"", "- : ( )"] {
        let e = q.search(req(empty)).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidInput { field, .. } if field == "query"),
            "{empty:?}: {e}"
        );
    }
    let e = q
        .search(SearchRequest {
            statuses: vec![TaskStatus::Running],
            ..req("deploy")
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("status[0]"), "{e}");
    let e = q
        .search(SearchRequest {
            limit: 51,
            ..req("deploy")
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_on_a_known_history() {
    let dir = tempfile::tempdir().unwrap();
    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let marker = dir.path().join("flaky-once");
    for i in 0..3 {
        let build = Task::new("build").with_command("true").with_project("shop");
        // The first deploy fails once, then succeeds on its retry.
        let mut deploy = Task::new("deploy")
            .with_command(format!(
                "test -f {m} || {{ touch {m}; echo 'connection refused' >&2; exit 1; }}; mkdir -p out; echo ok > out/release-{i}.txt",
                m = marker.display()
            ))
            .with_project("shop")
            .with_retry(RetryPolicy {
                max_attempts: Some(3),
                initial_delay: Some("10ms".parse().unwrap()),
                ..RetryPolicy::default()
            });
        deploy.cwd = Some(dir.path().display().to_string());
        deploy.artifacts = vec![format!("out/release-{i}.txt")];
        deploy.depends_on = vec![serde_json::from_value(json!("build")).unwrap()];
        let mut smoke = Task::new("smoke").with_command("true").with_project("shop");
        smoke.depends_on = vec![serde_json::from_value(json!("deploy")).unwrap()];
        q.submit_batch(vec![build, deploy, smoke]).await.unwrap();
        q.run_until_idle().await.unwrap();
    }
    let ask = RecommendRequest {
        name: Some("deploy".into()),
        project: Some("shop".into()),
        ..Default::default()
    };
    let r = q.recommend(ask.clone()).await.unwrap();
    assert_eq!(r.based_on.as_deref(), Some("deploy"));
    assert_eq!(r.runs, 4, "{r:?}");
    assert_eq!(r.success_rate, Some(0.75));
    assert!(r.p50_duration_ms.is_some() && r.p90_duration_ms >= r.p50_duration_ms);
    assert_eq!(r.suggested_timeout.as_deref(), Some("30s"));
    let retry = r.suggested_retry.clone().expect("a retry helped once");
    assert_eq!(retry.max_attempts, Some(3));
    assert!(
        r.retry_reason.contains("later attempt"),
        "{}",
        r.retry_reason
    );
    assert_eq!(r.usual_dependencies[0].value, "build");
    assert_eq!(r.usual_dependencies[0].count, 3);
    assert_eq!(r.usual_follow_ups[0].value, "smoke");
    assert!(
        r.common_failures[0].value.contains("exit")
            || r.common_failures[0].value.contains("connection refused"),
        "{:?}",
        r.common_failures
    );
    assert_eq!(r.usual_artifacts.len(), 3, "{:?}", r.usual_artifacts);
    assert!(r.similar.iter().any(|s| s.name == "deploy"));
    // Same history, same answer.
    assert_eq!(q.recommend(ask).await.unwrap(), r);
    // Described in other words, it finds the same task.
    let r2 = q
        .recommend(RecommendRequest {
            description: Some("ship it".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r2.based_on.as_deref(), Some("deploy"));
    let e = q.recommend(RecommendRequest::default()).await.unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_prunes_old_records_and_logs() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.storage.retention_days = 10;
    let q = TaskQueue::open_with(c).await.unwrap();
    let now = Timestamp::now().0;
    eval::load_corpus(&q, now).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        dir.path().join("search.db").display()
    ))
    .await
    .unwrap();
    // The tables read directly below hold a finished attempt's record once
    // the writer wrote it: in bulk, or when the history is read, as here.
    q.search(req("deploy")).await.unwrap();
    let before = count(&pool, "SELECT count(*) FROM interactions").await;
    let pruned = q.prune_history().await.unwrap();
    assert!(pruned > 0);
    // A fresh task with captured output: kept (the engine prunes too, in the background).
    let t = q
        .submit(Task::new("fresh").with_command("echo fresh output"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(30), q.run_until_idle())
        .await
        .expect("the engine goes idle")
        .unwrap();
    // Searchable as soon as it finished (a search writes the records the
    // writer still holds pending, so the table below has them too).
    let found = q.search(req("fresh")).await.unwrap();
    assert!(found.hits.iter().any(|h| h.task_id == t.id), "{found:?}");
    let after = count(&pool, "SELECT count(*) FROM interactions").await;
    assert!(after > 1 && after < before, "{before} -> {after}");
    let cutoff = now - 10 * 86_400_000;
    let after = count(&pool, "SELECT count(*) FROM interactions").await;
    assert!(after > 0 && after < before, "{before} -> {after}");
    let old: i64 = sqlx::query_scalar("SELECT count(*) FROM interactions WHERE finished_at < ?")
        .bind(cutoff)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(old, 0);
    // The indexes follow the records.
    assert_eq!(
        count(&pool, "SELECT count(*) FROM interactions_fts").await,
        after
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM interactions_trigram").await,
        after
    );
    assert!(!q.logs(&t.id, None).await.unwrap().is_empty());
    assert_eq!(q.prune_history().await.unwrap(), 0, "nothing left to prune");
}

/// A record that matches every word of a query is found however many
/// newer records match only some of them (more than the 2,000-record
/// window the words are ranked in).
async fn every_word_finds_an_old_record(c: Config) {
    use task_queue::model::TaskKind;
    let q = TaskQueue::open_with(c).await.unwrap();
    for name in ["legacy-import", "noise"] {
        q.register_handler(name, |_ctx| async { Ok(Value::Null) });
    }
    let mut old = Task::new("legacy-import").with_kind(TaskKind::External);
    old.description = Some("service number 5 of the nightly import".into());
    let old = q.submit(old).await.unwrap();
    q.run_until_idle().await.unwrap();
    let noise: Vec<_> = (1000..3100)
        .map(|i| {
            let mut t = Task::new("noise").with_kind(TaskKind::External);
            t.description = Some(format!("service number {i}"));
            t
        })
        .collect();
    q.submit_batch(noise).await.unwrap();
    q.run_until_idle().await.unwrap();
    let r = q.search(req("service number 5")).await.unwrap();
    // Among the first hits: "noise" also comes through the synonyms list
    // ("service" is in a synonym group), which adds to its fused score.
    let at = r.hits.iter().position(|h| h.task_id == old.id);
    assert!(at.is_some_and(|i| i < 3), "{:?}", r.hits);
    assert_eq!(r.hits[at.unwrap()].sources, ["words"]);
    // One word alone still ranks the newest matches only.
    let r = q.search(req("service")).await.unwrap();
    assert!(r.hits.iter().all(|h| h.name == "noise"), "{:?}", r.hits);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_an_old_record_that_matches_every_word() {
    let dir = tempfile::tempdir().unwrap();
    every_word_finds_an_old_record(config(&dir)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_finds_an_old_record_that_matches_every_word_on_postgres() {
    let Some(b) = crate::conformance::Backend::postgres("search_every_word").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.storage.database_url = Some(b.url());
    every_word_finds_an_old_record(c).await;
}

/// A database whose search indexes still copy the text (migrations up to
/// 0008) is moved to contentless indexes when opened: its records are
/// indexed again and found by words and by pieces of words, new records
/// join them, and pruning removes both from the indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_indexes_of_an_older_database_are_rebuilt() {
    use sqlx::Connection;
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("migrations-0008");
    std::fs::create_dir(&old).unwrap();
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/sqlite");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.as_str() < "0009" {
            std::fs::copy(&path, old.join(&name)).unwrap();
        }
    }
    let db = dir.path().join("search.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    sqlx::migrate::Migrator::new(old.as_path())
        .await
        .unwrap()
        .run(&mut conn)
        .await
        .unwrap();
    let now = Timestamp::now().0;
    for (i, (name, command, tags)) in [
        ("deploy-api", "kubectl rollout restart api", r#"["prod"]"#),
        ("nightly-backup", "pg_dump shop", r#"["ops"]"#),
    ]
    .into_iter()
    .enumerate()
    {
        sqlx::query(
            "INSERT INTO interactions (task_id, attempt, name, kind, tags, outcome, task_status, \
             duration_ms, started_at, finished_at, command) \
             VALUES (?, 1, ?, 'command', ?, 'succeeded', 'succeeded', 5, ?, ?, ?)",
        )
        .bind(format!("old-{i}"))
        .bind(name)
        .bind(tags)
        .bind(now - 30 * 86_400_000)
        .bind(now - 30 * 86_400_000 + 5)
        .bind(command)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let copies: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_master WHERE name IN ('interactions_fts_content', 'interactions_trigram_content')",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(copies, 2, "the old indexes keep copies of the text");
    conn.close().await.unwrap();

    let q = TaskQueue::open_with(config(&dir)).await.unwrap();
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    assert_eq!(
        count(
            &pool,
            "SELECT count(*) FROM sqlite_master WHERE name LIKE 'interactions_%_content'"
        )
        .await,
        0,
        "the new indexes keep no copy"
    );
    for (query, name, source) in [
        ("rollout", "deploy-api", "words"),
        ("backup", "nightly-backup", "words"),
        ("ploy", "deploy-api", "trigram"),
        ("dump", "nightly-backup", "trigram"),
    ] {
        let r = q.search(req(query)).await.unwrap();
        let hit = r
            .hits
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("{query}: {r:?}"));
        assert!(
            hit.sources.contains(&source.to_string()),
            "{query}: {hit:?}"
        );
    }
    let t = q
        .submit(Task::new("deploy-web").with_command("echo rollout of the web tier"))
        .await
        .unwrap();
    q.run_until_idle().await.unwrap();
    let r = q.search(req("rollout")).await.unwrap();
    let names: Vec<&str> = r.hits.iter().map(|h| h.name.as_str()).collect();
    assert!(
        names.contains(&"deploy-web") && names.contains(&"deploy-api"),
        "{names:?}"
    );
    assert!(r.hits.iter().any(|h| h.task_id == t.id));

    // Deleting records (as pruning does) takes them out of the indexes.
    sqlx::query("DELETE FROM interactions WHERE task_id LIKE 'old-%'")
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(
        count(&pool, "SELECT count(*) FROM interactions_fts").await,
        1
    );
    assert_eq!(
        count(&pool, "SELECT count(*) FROM interactions_trigram").await,
        1
    );
    let r = q.search(req("ploy")).await.unwrap();
    let names: Vec<&str> = r.hits.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["deploy-web"]);
}

/// A deterministic embedding: words hashed into 64 buckets, with a few
/// words sharing a bucket so that meaning, not spelling, matches.
fn embed_text(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; 64];
    for w in text
        .to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let w = match w {
            "ship" | "deploy" | "rollout" | "release" => "deploy",
            other => other,
        };
        let h = w
            .bytes()
            .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
        v[(h % 64) as usize] += 1.0;
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_endpoint_adds_semantic_candidates_and_falls_back() {
    let calls = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new()
        .route(
            "/v1/embeddings",
            post(
                |State(calls): State<Arc<Mutex<usize>>>, Json(body): Json<Value>| async move {
                    *calls.lock().unwrap() += 1;
                    assert_eq!(body["model"], "hash-64");
                    let data: Vec<Value> = body["input"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(i, t)| json!({"index": i, "embedding": embed_text(t.as_str().unwrap())}))
                    .collect();
                    Json(json!({"object": "list", "data": data, "model": "hash-64"}))
                },
            ),
        )
        .with_state(calls.clone());
    let url = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.search.embedder = Embedder::Openai;
    c.search.openai_url = Some(format!("{url}/v1"));
    c.search.openai_model = Some("hash-64".into());
    let q = TaskQueue::open_with(c.clone()).await.unwrap();
    let n = eval::load_corpus(&q, Timestamp::now().0).await.unwrap();
    assert_eq!(q.backfill_vectors(64).await.unwrap(), n);
    assert_eq!(
        q.backfill_vectors(64).await.unwrap(),
        0,
        "backfill is incremental"
    );
    let r = q.search(req("ship the payments service")).await.unwrap();
    assert_eq!(r.mode, "hybrid");
    assert!(r.notices.is_empty());
    assert!(
        r.hits
            .iter()
            .any(|h| h.sources.contains(&"semantic".to_string())),
        "{r:?}"
    );
    assert_eq!(r.hits[0].name, "deploy-api");
    assert!(*calls.lock().unwrap() >= 7);
    let report = eval::evaluate(&q, n).await.unwrap();
    eprintln!("with the hashing embedder:\n{}", report.table());
    drop(q);

    // The endpoint is gone: search still answers, lexically, and says why.
    c.search.openai_url = Some("http://127.0.0.1:9/v1".into());
    let q = TaskQueue::open_with(c).await.unwrap();
    let r = q.search(req("ship the payments service")).await.unwrap();
    assert_eq!(r.mode, "lexical");
    assert!(
        r.notices[0].contains("semantic search unavailable"),
        "{r:?}"
    );
    assert!(!r.hits.is_empty());
    assert!(
        q.backfill_vectors(8).await.is_ok(),
        "vectors of this model exist already"
    );
}

#[derive(Default)]
struct FakeVectorizer {
    up: bool,
    collections: Vec<String>,
    texts: HashMap<String, String>,
    inserts: usize,
}

type Fake = Arc<Mutex<FakeVectorizer>>;

fn fake_vectorizer(state: Fake) -> axum::Router {
    async fn create(State(s): State<Fake>, Json(b): Json<Value>) -> (StatusCode, Json<Value>) {
        let mut s = s.lock().unwrap();
        if !s.up {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "down"})),
            );
        }
        let name = b["name"].as_str().unwrap().to_string();
        if s.collections.contains(&name) {
            return (
                StatusCode::CONFLICT,
                Json(json!({"error": "collection already exists"})),
            );
        }
        s.collections.push(name);
        (StatusCode::OK, Json(json!({"status": "success"})))
    }
    async fn insert(State(s): State<Fake>, Json(b): Json<Value>) -> (StatusCode, Json<Value>) {
        let mut s = s.lock().unwrap();
        if !s.up
            || !s
                .collections
                .contains(&b["collection"].as_str().unwrap().to_string())
        {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "down"})),
            );
        }
        s.inserts += 1;
        for t in b["texts"].as_array().unwrap() {
            assert!(t["metadata"]["task_id"].is_string());
            s.texts.insert(
                t["id"].as_str().unwrap().into(),
                t["text"].as_str().unwrap().into(),
            );
        }
        (
            StatusCode::OK,
            Json(json!({"inserted": b["texts"].as_array().unwrap().len()})),
        )
    }
    async fn search(
        State(s): State<Fake>,
        Path(name): Path<String>,
        Json(b): Json<Value>,
    ) -> (StatusCode, Json<Value>) {
        let s = s.lock().unwrap();
        if !s.up || !s.collections.contains(&name) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "down"})),
            );
        }
        let word = b["query"].as_str().unwrap().to_lowercase();
        let mut ids: Vec<&String> = s
            .texts
            .iter()
            .filter(|(_, t)| t.to_lowercase().contains(&word))
            .map(|(id, _)| id)
            .collect();
        ids.sort();
        let results: Vec<Value> = ids
            .iter()
            .take(b["limit"].as_u64().unwrap() as usize)
            .map(|id| json!({"id": id, "score": 0.9}))
            .collect();
        (StatusCode::OK, Json(json!({"results": results})))
    }
    axum::Router::new()
        .route("/collections", post(create))
        .route("/insert_texts", post(insert))
        .route("/collections/{name}/search/text", post(search))
        .with_state(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectorizer_outbox_survives_downtime() {
    let fake: Fake = Arc::default();
    // Under a path holding "409": every error message quotes the URL, and
    // an error while the Vectorizer is down must not pass for "the
    // collection already exists" (HTTP 409) because of it.
    let url = serve(axum::Router::new().nest("/409", fake_vectorizer(fake.clone()))).await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.vectorizer.endpoint = Some(format!("{url}/409"));
    c.vectorizer.batch_size = 100;
    let q = TaskQueue::open_with(c).await.unwrap();
    let n = eval::load_corpus(&q, Timestamp::now().0).await.unwrap();

    // Down: nothing is lost, the state says so, search still works.
    assert!(q.deliver_to_vectorizer().await.is_err());
    let s = q.vectorizer_state().await.unwrap().unwrap();
    assert_eq!(s.outbox.pending, n as u64);
    assert!(s.last_error.unwrap().contains("503"));
    assert_eq!(s.outbox.max_attempts, 1);
    // Each call tries the next due batch of 100; once every record is
    // backing off, nothing is due and the error stays visible.
    let mut failures = 1;
    while q.deliver_to_vectorizer().await.is_err() {
        failures += 1;
        assert!(failures < 10);
    }
    assert_eq!(failures, n.div_ceil(100));
    let s = q.vectorizer_state().await.unwrap().unwrap();
    assert!(s.last_error.is_some());
    assert_eq!(s.outbox.pending, n as u64);
    let r = q.search(req("deploy")).await.unwrap();
    assert!(r.notices[0].contains("Vectorizer"), "{r:?}");
    assert!(!r.hits.is_empty());
    let (status, health) = rest_get(&q, "/health").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the outbox never makes the server unhealthy"
    );
    let outbox = &health["checks"]["outbox"];
    assert_eq!(outbox["configured"], true);
    assert_eq!(outbox["ok"], false);
    assert_eq!(outbox["pending"], n as u64);
    assert!(
        outbox["last_error"].as_str().unwrap().contains("503"),
        "{outbox}"
    );

    // Up again: after the backoff (1 s, then 2 s) everything is delivered, once.
    fake.lock().unwrap().up = true;
    assert_eq!(
        q.deliver_to_vectorizer().await.unwrap(),
        0,
        "still backing off"
    );
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(q.deliver_to_vectorizer().await.unwrap(), n);
    let s = q.vectorizer_state().await.unwrap().unwrap();
    assert_eq!(s.outbox.pending, 0);
    assert!(s.last_error.is_none());
    {
        let f = fake.lock().unwrap();
        assert_eq!(f.texts.len(), n);
        assert_eq!(f.collections, ["task-interactions"]);
    }
    // Its hits are merged into search.
    let (status, health) = rest_get(&q, "/health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(health["checks"]["outbox"]["ok"], true);
    assert_eq!(health["checks"]["outbox"]["pending"], 0);
    let (status, found) = rest_get(&q, "/api/v1/search?q=pgbackrest&tag=backup,postgres").await;
    assert_eq!(status, StatusCode::OK, "{found}");
    assert_eq!(found["mode"], "hybrid");
    assert_eq!(found["hits"][0]["name"], "backup-postgres-cluster");
    let (status, rec) = rest_get(&q, "/api/v1/recommendations?name=backup-postgres-cluster").await;
    assert_eq!(status, StatusCode::OK, "{rec}");
    assert_eq!(rec["runs"], 4);
    let r = q.search(req("pgbackrest")).await.unwrap();
    assert_eq!(r.mode, "hybrid");
    assert_eq!(r.hits[0].name, "backup-postgres-cluster");
    assert!(
        r.hits[0].sources.contains(&"vectorizer".to_string()),
        "{:?}",
        r.hits[0]
    );
}

/// `search.embedder: local` in a build without the model runtime is a
/// start-up error naming the key, not a silent fallback.
#[cfg(not(feature = "local-embeddings"))]
#[tokio::test]
async fn local_embedder_without_the_feature_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.search.embedder = Embedder::Local;
    c.search.model_dir = Some(dir.path().join("model"));
    let Err(err) = TaskQueue::open_with(c).await else {
        panic!("opened with a bad embedder setting")
    };
    assert!(
        matches!(&err, Error::Unsupported { field, .. } if field == "search.embedder"),
        "{err}"
    );
    assert!(
        err.to_string().contains("--features local-embeddings"),
        "{err}"
    );
}

/// The directory of the local model, installed by scripts/install-model.sh.
#[cfg(feature = "local-embeddings")]
fn model_dir() -> std::path::PathBuf {
    std::env::var("TASK_QUEUE_TEST_MODEL_DIR")
        .expect(
            "TASK_QUEUE_TEST_MODEL_DIR must name a model directory: \
             bash scripts/install-model.sh DIR",
        )
        .into()
}

/// A model directory that lacks the model is a start-up error naming
/// `search.model_dir` and the missing file.
#[cfg(feature = "local-embeddings")]
#[tokio::test]
async fn local_embedder_with_a_bad_directory_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.search.embedder = Embedder::Local;
    c.search.model_dir = Some(dir.path().join("nothing-here"));
    let Err(err) = TaskQueue::open_with(c).await else {
        panic!("opened with a bad embedder setting")
    };
    assert!(
        matches!(&err, Error::InvalidInput { field, .. } if field == "search.model_dir"),
        "{err}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// The local model gives meaning-level similarity: a paraphrase is closer
/// than an unrelated sentence, and vectors are unit length.
#[cfg(feature = "local-embeddings")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_model_embeds_paraphrases_close_together() {
    use task_queue::search::embed::Embedder as _;
    let e = task_queue::search::local::LocalEmbedder::load(&model_dir()).unwrap();
    assert!(e.model().starts_with("local:"), "{}", e.model());
    let texts: Vec<String> = [
        "ship the new version of the web service to production",
        "deploy the API release to the prod cluster",
        "vacuum and reindex the analytics database",
    ]
    .map(String::from)
    .to_vec();
    let v = e.embed(&texts).await.unwrap();
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|x| x.len() == 384));
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    for x in &v {
        assert!((dot(x, x) - 1.0).abs() < 1e-4);
    }
    let close = dot(&v[0], &v[1]);
    let far = dot(&v[0], &v[2]);
    assert!(close > far + 0.2, "paraphrase {close}, unrelated {far}");
    // The same text gives the same vector, alone or in a padded batch.
    let alone = e.embed(&texts[2..]).await.unwrap();
    assert!(dot(&alone[0], &v[2]) > 0.9999);
}

/// The labelled evaluation with the local model as the semantic tier
/// (hybrid mode), with floors a little under the numbers in docs/SEARCH.md.
#[cfg(feature = "local-embeddings")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_model_semantic_tier_meets_its_floor() {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir);
    c.search.embedder = Embedder::Local;
    c.search.model_dir = Some(model_dir());
    let q = TaskQueue::open_with(c).await.unwrap();
    let n = eval::load_corpus(&q, Timestamp::now().0).await.unwrap();
    assert_eq!(q.backfill_vectors(64).await.unwrap(), n);
    let report = eval::evaluate(&q, n).await.unwrap();
    eprintln!("with the local model:\n{}", report.table());
    for m in &report.misses {
        eprintln!("{m}");
    }
    assert_eq!(report.mode, "hybrid");
    let g = |k: &str| report.groups[k].clone();
    assert!(g("test/all").mrr_at_10 >= 0.85, "{}", report.table());
    assert!(g("test/paraphrase").mrr_at_10 >= 0.80, "{}", report.table());
    assert!(g("dev/all").mrr_at_10 >= 0.85, "{}", report.table());
}

/// A worker writes interaction records in bulk; the attempts it finished
/// are marked in the same transaction. Killed with SIGKILL before it wrote
/// their records, another process's search still finds every one of them.
#[test]
fn records_left_pending_by_a_killed_worker_are_found_by_another_process() {
    use crate::common::{Workspace, wait_until};
    let ws = Workspace::new();
    let tasks: Vec<Value> = (0..5)
        .map(|i| json!({"name": format!("zebra-crossing-{i}"), "command": "true"}))
        .collect();
    let f = ws.write("tasks.json", &json!({ "tasks": tasks }).to_string());
    let out = ws.run(&["submit", f.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ids: Vec<String> = serde_json::from_slice::<Value>(&out.stdout).unwrap()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 5);
    let mut worker = ws.spawn(&["worker"]);
    assert!(wait_until(Duration::from_secs(30), || ids
        .iter()
        .all(|id| ws.status(id)["status"] == "succeeded")));
    worker.kill().unwrap();
    worker.wait().unwrap();
    let db = rusqlite::Connection::open(ws.db()).unwrap();
    let count = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(count("SELECT count(*) FROM records_pending"), 5);
    assert_eq!(count("SELECT count(*) FROM interactions"), 0);
    let out = ws.run(&["search", "zebra crossing", "--limit", "10", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut found: Vec<String> = v["hits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["task_id"].as_str().unwrap().to_string())
        .collect();
    found.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(found, want, "{v}");
    assert_eq!(count("SELECT count(*) FROM records_pending"), 0);
    assert_eq!(count("SELECT count(*) FROM interactions"), 5);
    assert_eq!(count("SELECT count(*) FROM interactions_fts"), 5);
}
