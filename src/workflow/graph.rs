//! The dependency graph of a submission: checked and ordered at submit
//! (petgraph), and drawn as Mermaid or DOT.

use std::collections::HashMap;
use std::fmt::Write as _;

use petgraph::graph::{DiGraph, NodeIndex};

use crate::error::{Error, Result};
use crate::model::{Condition, TaskSpec, TaskStatus};

/// A dependency edge inside one submission: `from` must reach `condition`
/// before `to` may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    pub from: usize,
    pub to: usize,
    pub condition: Condition,
}

/// A dependency on a task that already exists (given by its id).
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalDep {
    pub task: usize,
    pub id: String,
    pub condition: Condition,
}

/// A checked submission graph.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Task indices in an order where every task comes after its dependencies.
    pub order: Vec<usize>,
    pub edges: Vec<Edge>,
    pub external: Vec<ExternalDep>,
}

/// Checks the dependency graph of tasks submitted together: unique names,
/// known names, no self or repeated dependency, no cycle. Errors name the
/// field (`tasks[2].depends_on[0]`) or, for a cycle, the path.
pub fn plan(tasks: &[TaskSpec]) -> Result<Plan> {
    let mut index: HashMap<&str, usize> = HashMap::with_capacity(tasks.len());
    for (i, t) in tasks.iter().enumerate() {
        if let Some(first) = index.insert(t.name.as_str(), i) {
            return Err(Error::invalid(
                format!("tasks[{i}].name"),
                format!(
                    "duplicate task name {:?} (also tasks[{first}]); names must be unique in a workflow",
                    t.name
                ),
            ));
        }
    }
    let mut edges = Vec::new();
    let mut external = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (k, d) in t.depends_on.iter().enumerate() {
            let target = d.target();
            let field = || format!("tasks[{i}].depends_on[{k}]");
            if seen.insert(target, k).is_some() {
                return Err(Error::invalid(
                    field(),
                    format!("duplicate dependency on {target:?}"),
                ));
            }
            if uuid::Uuid::parse_str(target).is_ok() {
                external.push(ExternalDep {
                    task: i,
                    id: target.to_string(),
                    condition: d.condition().clone(),
                });
                continue;
            }
            let Some(&from) = index.get(target) else {
                let mut msg =
                    format!("unknown task {target:?}; no task of this submission has that name");
                if let Some(near) = closest(target, tasks.iter().map(|t| t.name.as_str())) {
                    let _ = write!(msg, "; did you mean {near:?}?");
                }
                return Err(Error::invalid(field(), msg));
            };
            if from == i {
                return Err(Error::invalid(
                    field(),
                    format!("task {target:?} depends on itself"),
                ));
            }
            edges.push(Edge {
                from,
                to: i,
                condition: d.condition().clone(),
            });
        }
    }
    let order = order(tasks, &edges)?;
    Ok(Plan {
        order,
        edges,
        external,
    })
}

/// A topological order (lowest index first among ready tasks), or the
/// cycle as an error.
fn order(tasks: &[TaskSpec], edges: &[Edge]) -> Result<Vec<usize>> {
    let n = tasks.len();
    let mut g: DiGraph<(), ()> = DiGraph::with_capacity(n, edges.len());
    for _ in 0..n {
        g.add_node(());
    }
    for e in edges {
        g.add_edge(NodeIndex::new(e.from), NodeIndex::new(e.to), ());
    }
    // Kahn's algorithm with a min-heap keeps the order stable.
    let mut indegree: Vec<usize> = (0..n)
        .map(|i| {
            g.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Incoming)
                .count()
        })
        .collect();
    let mut ready: std::collections::BinaryHeap<std::cmp::Reverse<usize>> = (0..n)
        .filter(|&i| indegree[i] == 0)
        .map(std::cmp::Reverse)
        .collect();
    let mut out = Vec::with_capacity(n);
    while let Some(std::cmp::Reverse(i)) = ready.pop() {
        out.push(i);
        for j in g.neighbors_directed(NodeIndex::new(i), petgraph::Direction::Outgoing) {
            let j = j.index();
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.push(std::cmp::Reverse(j));
            }
        }
    }
    if out.len() == n {
        return Ok(out);
    }
    // Some nodes are on (or behind) a cycle: find one with petgraph's SCCs.
    let mut sccs = petgraph::algo::tarjan_scc(&g);
    sccs.retain(|c| c.len() > 1);
    sccs.sort_by_key(|c| c.iter().map(|n| n.index()).min());
    let scc = sccs
        .first()
        .ok_or_else(|| Error::invalid("tasks", "the dependencies form a cycle"))?;
    let path = cycle_in(&g, scc);
    let names: Vec<&str> = path.iter().map(|&i| tasks[i].name.as_str()).collect();
    Err(Error::invalid(
        "tasks",
        format!(
            "cycle: {}; `a -> b` means b depends on a. Remove one of these dependencies",
            names.join(" -> ")
        ),
    ))
}

/// A simple cycle inside a strongly connected component, as node indices
/// from its lowest index back to it.
fn cycle_in(g: &DiGraph<(), ()>, scc: &[NodeIndex]) -> Vec<usize> {
    let members: std::collections::HashSet<usize> = scc.iter().map(|n| n.index()).collect();
    let start = scc.iter().map(|n| n.index()).min().expect("non-empty");
    // BFS from start inside the component to the first node with an edge back to start.
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    let mut visited = std::collections::HashSet::from([start]);
    while let Some(u) = queue.pop_front() {
        let mut next: Vec<usize> = g
            .neighbors_directed(NodeIndex::new(u), petgraph::Direction::Outgoing)
            .map(|n| n.index())
            .filter(|v| members.contains(v))
            .collect();
        next.sort_unstable();
        for v in next {
            if v == start {
                let mut path = vec![start];
                let mut cur = u;
                let mut back = vec![];
                while cur != start {
                    back.push(cur);
                    cur = parent[&cur];
                }
                back.reverse();
                path.extend(back);
                path.push(start);
                return path;
            }
            if visited.insert(v) {
                parent.insert(v, u);
                queue.push_back(v);
            }
        }
    }
    vec![start, start]
}

/// The closest name within edit distance 2, if any.
fn closest<'a>(target: &str, names: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    names
        .map(|n| (levenshtein(target, n), n))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, n)| (*d, *n))
        .map(|(_, n)| n)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.len().abs_diff(b.len()) > 2 {
        return 3;
    }
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// A node to draw.
#[derive(Debug, Clone)]
pub struct ViewNode {
    pub id: String,
    pub name: String,
    pub status: TaskStatus,
}

/// An edge to draw: `from` is the dependency, `to` the dependent.
#[derive(Debug, Clone)]
pub struct ViewEdge {
    pub from: usize,
    pub to: usize,
    pub condition: Condition,
}

/// A graph to draw.
#[derive(Debug, Clone, Default)]
pub struct GraphView {
    pub title: Option<String>,
    pub nodes: Vec<ViewNode>,
    pub edges: Vec<ViewEdge>,
}

/// Fill and stroke colours per status.
fn colours(s: TaskStatus) -> (&'static str, &'static str) {
    match s {
        TaskStatus::Succeeded => ("#d3f9d8", "#2b8a3e"),
        TaskStatus::Failed | TaskStatus::TimedOut => ("#ffe3e3", "#c92a2a"),
        TaskStatus::Running => ("#d0ebff", "#1864ab"),
        TaskStatus::AwaitingApproval => ("#fff3bf", "#e67700"),
        TaskStatus::Retrying => ("#ffe8cc", "#d9480f"),
        TaskStatus::Skipped | TaskStatus::Cancelled => ("#f1f3f5", "#868e96"),
        TaskStatus::Pending | TaskStatus::Queued => ("#f8f9fa", "#495057"),
    }
}

fn edge_label(c: &Condition) -> Option<&'static str> {
    match c {
        Condition::Success => None,
        other => Some(other.label()),
    }
}

/// Mermaid `flowchart TD`, one class per status.
pub fn mermaid(g: &GraphView) -> String {
    let mut out = String::new();
    if let Some(t) = &g.title {
        let _ = writeln!(out, "---\ntitle: \"{}\"\n---", mermaid_text(t));
    }
    out.push_str("flowchart TD\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(
            out,
            "    t{i}[\"{}<br/><small>{}</small>\"]",
            mermaid_text(&n.name),
            n.status.as_str()
        );
    }
    for e in &g.edges {
        match edge_label(&e.condition) {
            None => {
                let _ = writeln!(out, "    t{} --> t{}", e.from, e.to);
            }
            Some(l) => {
                let _ = writeln!(out, "    t{} -- {l} --> t{}", e.from, e.to);
            }
        }
    }
    let mut used: Vec<TaskStatus> = g.nodes.iter().map(|n| n.status).collect();
    used.sort();
    used.dedup();
    for s in &used {
        let (fill, stroke) = colours(*s);
        let dash = if matches!(s, TaskStatus::Skipped | TaskStatus::Cancelled) {
            ",stroke-dasharray: 4 3"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "    classDef {} fill:{fill},stroke:{stroke}{dash}",
            s.as_str()
        );
    }
    for s in &used {
        let members: Vec<String> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.status == *s)
            .map(|(i, _)| format!("t{i}"))
            .collect();
        let _ = writeln!(out, "    class {} {};", members.join(","), s.as_str());
    }
    out
}

fn mermaid_text(s: &str) -> String {
    s.replace('"', "#quot;")
        .replace('<', "#lt;")
        .replace('>', "#gt;")
}

/// Graphviz DOT, nodes filled by status.
pub fn dot(g: &GraphView) -> String {
    let mut out = String::from("digraph workflow {\n    rankdir=LR;\n");
    if let Some(t) = &g.title {
        let _ = writeln!(out, "    label=\"{}\";\n    labelloc=t;", dot_text(t));
    }
    out.push_str("    node [shape=box, style=\"rounded,filled\", fontname=\"Helvetica\"];\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let (fill, stroke) = colours(n.status);
        let _ = writeln!(
            out,
            "    \"t{i}\" [label=\"{}\\n{}\", fillcolor=\"{fill}\", color=\"{stroke}\"];",
            dot_text(&n.name),
            n.status.as_str()
        );
    }
    for e in &g.edges {
        match edge_label(&e.condition) {
            None => {
                let _ = writeln!(out, "    \"t{}\" -> \"t{}\";", e.from, e.to);
            }
            Some(l) => {
                let _ = writeln!(
                    out,
                    "    \"t{}\" -> \"t{}\" [label=\"{l}\", style=dashed];",
                    e.from, e.to
                );
            }
        }
    }
    out.push_str("}\n");
    out
}

fn dot_text(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Dependency;

    fn t(name: &str, deps: &[&str]) -> TaskSpec {
        let mut s = TaskSpec::new(name).with_command("true");
        for d in deps {
            s = s.depends_on(*d);
        }
        s
    }

    fn err(tasks: &[TaskSpec]) -> String {
        plan(tasks).unwrap_err().to_string()
    }

    #[test]
    fn a_diamond_is_ordered_after_its_dependencies() {
        let tasks = [
            t("d", &["b", "c"]),
            t("b", &["a"]),
            t("c", &["a"]),
            t("a", &[]),
        ];
        let p = plan(&tasks).unwrap();
        assert_eq!(p.order, vec![3, 1, 2, 0]);
        assert_eq!(p.edges.len(), 4);
        assert!(p.external.is_empty());
    }

    #[test]
    fn fan_out_and_in_of_a_thousand() {
        let mut tasks = vec![t("split", &[])];
        let leaves: Vec<String> = (0..1000).map(|i| format!("leaf-{i}")).collect();
        for l in &leaves {
            tasks.push(t(l, &["split"]));
        }
        let refs: Vec<&str> = leaves.iter().map(String::as_str).collect();
        tasks.push(t("join", &refs));
        let p = plan(&tasks).unwrap();
        assert_eq!(p.order.first(), Some(&0));
        assert_eq!(p.order.last(), Some(&1001));
        assert_eq!(p.edges.len(), 2000);
    }

    #[test]
    fn cycles_are_named_as_a_path() {
        let tasks = [t("a", &["c"]), t("b", &["a"]), t("c", &["b"])];
        let e = err(&tasks);
        assert!(e.contains("cycle: a -> b -> c -> a"), "{e}");
        let tasks = [
            t("x", &[]),
            t("p", &["x", "q"]),
            t("q", &["p"]),
            t("y", &["q"]),
        ];
        let e = err(&tasks);
        assert!(e.contains("cycle: p -> q -> p"), "{e}");
    }

    #[test]
    fn bad_references_name_the_field() {
        let e = err(&[t("build", &[]), t("test", &["bild"])]);
        assert!(e.contains("tasks[1].depends_on[0]"), "{e}");
        assert!(e.contains("did you mean \"build\""), "{e}");
        let e = err(&[t("a", &["a"])]);
        assert!(
            e.contains("tasks[0].depends_on[0]") && e.contains("itself"),
            "{e}"
        );
        let e = err(&[t("a", &[]), t("b", &["a", "a"])]);
        assert!(
            e.contains("tasks[1].depends_on[1]") && e.contains("duplicate"),
            "{e}"
        );
        let e = err(&[t("a", &[]), t("a", &[])]);
        assert!(e.contains("tasks[1].name") && e.contains("tasks[0]"), "{e}");
    }

    #[test]
    fn ids_are_external_dependencies() {
        let id = "0193b0c2-0000-7000-8000-000000000000";
        let mut s = t("after", &[]);
        s.depends_on.push(Dependency::Detailed {
            task: id.into(),
            condition: Condition::Completion,
        });
        let p = plan(&[s]).unwrap();
        assert_eq!(
            p.external,
            vec![ExternalDep {
                task: 0,
                id: id.into(),
                condition: Condition::Completion
            }]
        );
    }

    #[test]
    fn drawings_style_nodes_by_status_and_label_conditions() {
        let g = GraphView {
            title: Some("deploy \"prod\"".into()),
            nodes: vec![
                ViewNode {
                    id: "1".into(),
                    name: "build".into(),
                    status: TaskStatus::Succeeded,
                },
                ViewNode {
                    id: "2".into(),
                    name: "notify".into(),
                    status: TaskStatus::Skipped,
                },
            ],
            edges: vec![ViewEdge {
                from: 0,
                to: 1,
                condition: Condition::Failure,
            }],
        };
        let m = mermaid(&g);
        assert!(m.contains("flowchart TD"), "{m}");
        assert!(m.contains("t0 -- failure --> t1"), "{m}");
        assert!(m.contains("classDef succeeded"), "{m}");
        assert!(m.contains("class t1 skipped;"), "{m}");
        assert!(m.contains("#quot;prod#quot;"), "{m}");
        let d = dot(&g);
        assert!(d.starts_with("digraph workflow {"), "{d}");
        assert!(
            d.contains("\"t0\" -> \"t1\" [label=\"failure\", style=dashed];"),
            "{d}"
        );
        assert!(d.contains("deploy \\\"prod\\\""), "{d}");
    }
}
