//! Workflows beyond single tasks: the dependency graph, its checks and its
//! drawings.

pub mod graph;

use crate::error::Result;
use crate::model::{Submission, TaskStatus};

/// Checks a task or workflow file the way a submit would (every spec, the
/// dependency graph, schedules) without storing anything, and renders its
/// graph with every task pending.
pub fn check_and_render(sub: &Submission, format: &str) -> Result<String> {
    let (header, schedule, specs) = match sub {
        Submission::Tasks(t) => (None, None, t),
        Submission::Workflow(w) => {
            w.validate_header()?;
            (
                Some(crate::service::Header::of(w)),
                w.schedule.as_ref(),
                &w.tasks,
            )
        }
    };
    // The same preparation a submit does (defaults, graph, schedules);
    // only dependencies on existing task ids need the database.
    crate::service::prepare(
        &crate::config::Config::default(),
        header.as_ref(),
        schedule,
        specs.clone(),
        &crate::service::RunOf::default(),
        crate::model::Timestamp::now().0,
        false,
    )?;
    let title = header.map(|h| h.name);
    let plan = graph::plan_with(specs, matches!(sub, Submission::Workflow(_)))?;
    let view = graph::GraphView {
        title,
        nodes: specs
            .iter()
            .map(|s| graph::ViewNode {
                id: s.name.clone(),
                name: s.name.clone(),
                status: TaskStatus::Pending,
            })
            .collect(),
        edges: plan
            .edges
            .iter()
            .map(|e| graph::ViewEdge {
                from: e.from,
                to: e.to,
                condition: e.condition.clone(),
            })
            .collect(),
    };
    match format {
        "mermaid" => Ok(graph::mermaid(&view)),
        "dot" => Ok(graph::dot(&view)),
        other => Err(crate::error::Error::invalid(
            "format",
            format!("must be mermaid or dot, got {other:?}"),
        )),
    }
}
