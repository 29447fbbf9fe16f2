//! `GET /metrics`: Prometheus text exposition. Queue gauges are read from
//! the store on each scrape; HTTP and attempt metrics are counted here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::engine::EngineStatus;
use crate::store::QueueStats;

/// Upper bounds (seconds) of the latency histograms.
pub const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0, 60.0,
];

/// A cumulative Prometheus histogram.
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// Writes the `_bucket`, `_sum` and `_count` series of `name` with `labels`.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {}",
                self.counts[i]
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count
        );
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {}", self.count);
    }
}

/// Counters of the HTTP server.
#[derive(Debug, Default)]
pub struct Metrics {
    submitted: AtomicU64,
    /// (method, route, status) → count.
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    /// route → latency.
    latency: Mutex<BTreeMap<String, Histogram>>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    pub fn submitted(&self, n: usize) {
        self.submitted.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn request(&self, method: &str, route: &str, status: u16, took: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((method.to_string(), route.to_string(), status))
            .or_default() += 1;
        self.latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(route.to_string())
            .or_default()
            .observe(took);
    }

    /// The exposition text.
    pub fn render(&self, stats: Option<&QueueStats>, engine: &EngineStatus) -> String {
        let mut out = String::new();
        if let Some(s) = stats {
            out.push_str("# HELP task_queue_tasks Tasks in the store by status.\n# TYPE task_queue_tasks gauge\n");
            for st in crate::model::TaskStatus::ALL {
                let n = s.tasks.get(&st).copied().unwrap_or(0);
                let _ = writeln!(out, "task_queue_tasks{{status=\"{}\"}} {n}", st.as_str());
            }
            out.push_str("# HELP task_queue_tasks_by_project Tasks by project and status (tasks without a project are left out).\n# TYPE task_queue_tasks_by_project gauge\n");
            for (project, by) in &s.by_project {
                for (status, n) in by {
                    let _ = writeln!(
                        out,
                        "task_queue_tasks_by_project{{project=\"{}\",status=\"{}\"}} {n}",
                        esc(project),
                        status.as_str()
                    );
                }
            }
            out.push_str("# HELP task_queue_workflows Workflows by status.\n# TYPE task_queue_workflows gauge\n");
            for (st, n) in &s.workflows {
                let _ = writeln!(
                    out,
                    "task_queue_workflows{{status=\"{}\"}} {n}",
                    st.as_str()
                );
            }
            let _ = writeln!(
                out,
                "# HELP task_queue_ready Tasks ready to run now.\n# TYPE task_queue_ready gauge\ntask_queue_ready {}",
                s.ready
            );
            let _ = writeln!(
                out,
                "# HELP task_queue_oldest_ready_seconds How long the oldest ready task has waited.\n# TYPE task_queue_oldest_ready_seconds gauge\ntask_queue_oldest_ready_seconds {}",
                s.oldest_ready_ms.unwrap_or(0) as f64 / 1000.0
            );
        }
        let _ = writeln!(
            out,
            "# HELP task_queue_running_attempts Attempts this process is running.\n# TYPE task_queue_running_attempts gauge\ntask_queue_running_attempts {}",
            engine.running_attempts
        );
        let _ = writeln!(
            out,
            "# HELP task_queue_submitted_total Tasks submitted through this server.\n# TYPE task_queue_submitted_total counter\ntask_queue_submitted_total {}",
            self.submitted.load(Ordering::Relaxed)
        );
        out.push_str("# HELP task_queue_attempt_duration_seconds Duration of attempts run by this process, by outcome.\n# TYPE task_queue_attempt_duration_seconds histogram\n");
        for (outcome, h) in &engine.attempt_durations {
            h.render(
                &mut out,
                "task_queue_attempt_duration_seconds",
                &format!("outcome=\"{outcome}\""),
            );
        }
        out.push_str("# HELP task_queue_claim_duration_seconds Latency of the scheduler's claims.\n# TYPE task_queue_claim_duration_seconds histogram\n");
        engine
            .claim_latency
            .render(&mut out, "task_queue_claim_duration_seconds", "");
        out.push_str("# HELP task_queue_http_requests_total HTTP requests by method, route and status.\n# TYPE task_queue_http_requests_total counter\n");
        for ((m, r, s), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "task_queue_http_requests_total{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {n}",
                esc(r)
            );
        }
        out.push_str("# HELP task_queue_http_request_duration_seconds HTTP request latency by route.\n# TYPE task_queue_http_request_duration_seconds histogram\n");
        for (r, h) in self
            .latency
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            h.render(
                &mut out,
                "task_queue_http_request_duration_seconds",
                &format!("route=\"{}\"", esc(r)),
            );
        }
        out
    }
}
