//! Workflows beyond single tasks: the dependency graph, its checks and its
//! drawings.

pub mod graph;

use crate::error::Result;
use crate::model::{Submission, TaskStatus};

/// Checks a task or workflow file the way a submit would (every spec, the
/// dependency graph, schedules) without storing anything, and renders its
/// graph with every task pending.
pub fn check_and_render(sub: &Submission, format: &str) -> Result<String> {
    let (title, specs, schedule) = match sub {
        Submission::Tasks(t) => (None, t, None),
        Submission::Workflow(w) => {
            w.validate_header()?;
            (Some(w.name.clone()), &w.tasks, w.schedule.as_ref())
        }
    };
    if let Some(s) = schedule {
        s.validate().map_err(|e| e.in_field("schedule"))?;
    }
    for (i, s) in specs.iter().enumerate() {
        s.validate()
            .map_err(|e| e.in_field(&format!("tasks[{i}]")))?;
    }
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
