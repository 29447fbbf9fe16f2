//! The dependency graph of a workflow: the submit-time check and export.
//!
//! [`plan`] runs before a submission is stored: every in-submission
//! `depends_on` name must resolve, the graph must be acyclic, and the result
//! is a run order plus the edges to store. [`mermaid`] and [`dot`] render a
//! workflow with each task's status so people can see where it stands.

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::fmt::Write as _;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::model::{Condition, Dependency, TaskSpec, TaskStatus};

/// A dependency edge inside one submission: `from` must reach `condition` before `to` may run.
#[derive(Debug, Clone, PartialEq)]
pub struct Edge {
    /// Index of the dependency in the submission.
    pub from: usize,
    /// Index of the dependent task in the submission.
    pub to: usize,
    pub condition: Condition,
}

/// A dependency on a task that already exists (given by its UUID id).
///
/// Only the form is checked here; the caller checks that the task exists.
#[derive(Debug, Clone, PartialEq)]
pub struct ExternalDep {
    /// Index of the dependent task in the submission.
    pub task: usize,
    /// The id in canonical form (lowercase, hyphenated), as the store writes ids.
    pub id: String,
    pub condition: Condition,
}

/// The checked dependency graph of a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// Task indices in an order where every task comes after its dependencies.
    /// Among tasks that are ready at the same point the lower index comes
    /// first, so the order is stable for a given submission.
    pub order: Vec<usize>,
    /// In-submission dependencies, by dependent task, then in `depends_on` order.
    pub edges: Vec<Edge>,
    /// Dependencies on existing tasks, by dependent task, then in `depends_on` order.
    pub external: Vec<ExternalDep>,
}

/// Checks the dependency graph of tasks submitted together.
///
/// A `depends_on` entry that parses as a UUID refers to an existing task;
/// anything else must name a task of `tasks` (so a task whose name is a
/// UUID cannot be depended on by name). Errors are
/// [`Error::InvalidInput`] with a field path into the submission
/// (`tasks[2].depends_on[0]`, or `tasks` for a cycle). Runs in time linear
/// in tasks plus dependencies.
pub fn plan(tasks: &[TaskSpec]) -> Result<Plan> {
    plan_with(tasks, true)
}

/// [`plan`] with a choice: a workflow requires unique names; a plain batch
/// of tasks (`unique_names: false`) may repeat a name, as long as no task
/// depends on a repeated one.
pub fn plan_with(tasks: &[TaskSpec], unique_names: bool) -> Result<Plan> {
    let mut by_name: HashMap<&str, usize> = HashMap::with_capacity(tasks.len());
    // Names given to more than one task (batches only): index of the second.
    let mut repeated: HashMap<&str, (usize, usize)> = HashMap::new();
    for (j, t) in tasks.iter().enumerate() {
        match by_name.entry(&t.name) {
            Entry::Vacant(slot) => {
                slot.insert(j);
            }
            Entry::Occupied(first) => {
                if unique_names {
                    return Err(Error::invalid(
                        format!("tasks[{j}].name"),
                        format!(
                            "duplicate task name {:?} (also tasks[{}]); names must be unique in a workflow",
                            t.name,
                            first.get()
                        ),
                    ));
                }
                repeated.entry(&t.name).or_insert((*first.get(), j));
            }
        }
    }
    // In a workflow a second task with the key of an earlier one would be
    // answered by it, and the workflow would silently run one task less.
    if unique_names {
        let mut by_key: HashMap<&str, usize> = HashMap::new();
        for (j, t) in tasks.iter().enumerate() {
            if let Some(k) = t.idempotency_key.as_deref()
                && let Some(first) = by_key.insert(k, j)
            {
                return Err(Error::invalid(
                    format!("tasks[{j}].idempotency_key"),
                    format!(
                        "{k:?} is also the key of tasks[{first}]; the tasks of one workflow must have \
                         different keys (the second would be answered by the first and not run)"
                    ),
                ));
            }
        }
    }

    let mut edges = Vec::new();
    let mut external = Vec::new();
    // Duplicate checks: `listed_by[d] == i` once task `i` lists task `d`;
    // `seen_external` holds the ids the current task lists.
    let mut listed_by = vec![usize::MAX; tasks.len()];
    let mut seen_external: HashSet<Uuid> = HashSet::new();
    for (i, t) in tasks.iter().enumerate() {
        if !seen_external.is_empty() {
            seen_external.clear();
        }
        for (k, dep) in t.depends_on.iter().enumerate() {
            let field = || format!("tasks[{i}].depends_on[{k}]");
            let (target, condition) = match dep {
                Dependency::Name(s) => (s.as_str(), Condition::Success),
                Dependency::Detailed { task, condition } => (task.as_str(), condition.clone()),
            };
            let duplicate =
                || Error::invalid(field(), format!("duplicate dependency on {target:?}"));
            // Every UUID form is at least 32 characters; most names are shorter.
            if target.len() >= 32
                && let Ok(id) = Uuid::parse_str(target)
            {
                if !seen_external.insert(id) {
                    return Err(duplicate());
                }
                external.push(ExternalDep {
                    task: i,
                    id: id.to_string(),
                    condition,
                });
                continue;
            }
            if target == t.name {
                return Err(Error::invalid(
                    field(),
                    format!("task {target:?} depends on itself"),
                ));
            }
            let Some(&from) = by_name.get(target) else {
                let mut message =
                    format!("unknown task {target:?}; no task of this submission has that name");
                if let Some(close) = suggest(target, tasks, i) {
                    let _ = write!(message, "; did you mean {close:?}?");
                }
                return Err(Error::invalid(field(), message));
            };
            if let Some((a, b)) = repeated.get(target) {
                return Err(Error::invalid(
                    field(),
                    format!(
                        "{target:?} is ambiguous: tasks[{a}] and tasks[{b}] both have that name; give tasks that others depend on unique names"
                    ),
                ));
            }
            if listed_by[from] == i {
                return Err(duplicate());
            }
            listed_by[from] = i;
            edges.push(Edge {
                from,
                to: i,
                condition,
            });
        }
    }

    let mut graph: DiGraph<(), ()> = DiGraph::with_capacity(tasks.len(), edges.len());
    for _ in tasks {
        graph.add_node(());
    }
    for e in &edges {
        graph.add_edge(NodeIndex::new(e.from), NodeIndex::new(e.to), ());
    }
    let order = stable_toposort(&graph);
    if order.len() < tasks.len() {
        let cycle = find_cycle(&graph);
        let names: Vec<&str> = cycle.iter().map(|&v| tasks[v].name.as_str()).collect();
        return Err(Error::invalid(
            "tasks",
            format!("cycle: {}", names.join(" -> ")),
        ));
    }
    Ok(Plan {
        order,
        edges,
        external,
    })
}

/// Kahn's algorithm with a min-heap of ready nodes, so that ties go to the
/// lower index (petgraph's `toposort` makes no such promise). Returns fewer
/// nodes than the graph has when there is a cycle.
fn stable_toposort(graph: &DiGraph<(), ()>) -> Vec<usize> {
    let n = graph.node_count();
    let mut indegree = vec![0usize; n];
    for e in graph.raw_edges() {
        indegree[e.target().index()] += 1;
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&v| indegree[v] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(v)) = ready.pop() {
        order.push(v);
        for w in graph.neighbors(NodeIndex::new(v)) {
            let w = w.index();
            indegree[w] -= 1;
            if indegree[w] == 0 {
                ready.push(Reverse(w));
            }
        }
    }
    order
}

/// A simple cycle of a graph that has one, as a path that starts and ends at
/// the same node. Deterministic: it is a shortest cycle through the lowest
/// node that lies on any cycle, preferring lower indices on ties.
fn find_cycle(graph: &DiGraph<(), ()>) -> Vec<usize> {
    let n = graph.node_count();
    let mut best: Option<(usize, Vec<NodeIndex>)> = None;
    for scc in tarjan_scc(graph) {
        // Self loops are rejected before, so a cycle needs two nodes.
        if scc.len() < 2 {
            continue;
        }
        let low = scc.iter().map(|v| v.index()).min().unwrap_or(usize::MAX);
        if best.as_ref().is_none_or(|(b, _)| low < *b) {
            best = Some((low, scc));
        }
    }
    let Some((start, scc)) = best else {
        return Vec::new();
    };
    let mut in_scc = vec![false; n];
    for v in &scc {
        in_scc[v.index()] = true;
    }
    // Breadth-first from `start` inside its component until an edge leads back.
    let mut parent = vec![usize::MAX; n];
    parent[start] = start;
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        let mut next: Vec<usize> = graph
            .neighbors(NodeIndex::new(v))
            .map(|w| w.index())
            .filter(|&w| in_scc[w])
            .collect();
        next.sort_unstable();
        for w in next {
            if w == start {
                let mut path = vec![v];
                let mut u = v;
                while u != start {
                    u = parent[u];
                    path.push(u);
                }
                path.reverse();
                path.push(start);
                return path;
            }
            if parent[w] == usize::MAX {
                parent[w] = v;
                queue.push_back(w);
            }
        }
    }
    // Unreachable for a strongly connected component; name its nodes instead.
    let mut nodes: Vec<usize> = scc.iter().map(|v| v.index()).collect();
    nodes.sort_unstable();
    nodes.push(start);
    nodes
}

/// The closest other task name within edit distance 2 (ties: lowest index).
/// A name is not offered when the distance is the whole typed name.
fn suggest<'a>(target: &str, tasks: &'a [TaskSpec], own: usize) -> Option<&'a str> {
    let typed: Vec<char> = target.chars().collect();
    let mut best: Option<(usize, &str)> = None;
    let mut buf = Vec::new();
    for (i, t) in tasks.iter().enumerate() {
        if i == own {
            continue;
        }
        buf.clear();
        buf.extend(t.name.chars());
        if let Some(d) = distance_within(&typed, &buf, 2)
            && d < typed.len()
            && best.is_none_or(|(b, _)| d < b)
        {
            best = Some((d, &t.name));
        }
    }
    best.map(|(_, name)| name)
}

/// Levenshtein distance of `a` and `b` if it is at most `max`. Only the band
/// of cells within `max` of the diagonal is computed, so a call costs
/// O(len * max) rather than O(len²).
fn distance_within(a: &[char], b: &[char], max: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > max {
        return None;
    }
    let over = max + 1;
    let mut prev: Vec<usize> = (0..=b.len()).map(|j| j.min(over)).collect();
    let mut cur = vec![over; b.len() + 1];
    for i in 1..=a.len() {
        let lo = i.saturating_sub(max).max(1);
        let hi = (i + max).min(b.len());
        cur[0] = i.min(over);
        if lo > 1 {
            cur[lo - 1] = over;
        }
        let mut row_min = cur[0];
        for j in lo..=hi {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let d = (prev[j - 1] + cost).min(prev[j] + 1).min(cur[j - 1] + 1);
            cur[j] = d.min(over);
            row_min = row_min.min(cur[j]);
        }
        if hi < b.len() {
            cur[hi + 1] = over;
        }
        if row_min > max {
            return None;
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let d = prev[b.len()];
    (d <= max).then_some(d)
}

/// A task as shown in an exported graph.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewNode {
    /// The task id; DOT shows it as the node's tooltip.
    pub id: String,
    pub name: String,
    pub status: TaskStatus,
}

/// A dependency as shown in an exported graph; `from` and `to` index
/// [`GraphView::nodes`].
#[derive(Debug, Clone, PartialEq)]
pub struct ViewEdge {
    pub from: usize,
    pub to: usize,
    pub condition: Condition,
}

/// A workflow to render with [`mermaid`] or [`dot`]. Edges whose ends are
/// not valid node indices are left out of the output.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct GraphView {
    pub title: Option<String>,
    pub nodes: Vec<ViewNode>,
    pub edges: Vec<ViewEdge>,
}

impl GraphView {
    fn valid_edges(&self) -> impl Iterator<Item = &ViewEdge> {
        self.edges
            .iter()
            .filter(|e| e.from < self.nodes.len() && e.to < self.nodes.len())
    }

    /// The statuses that occur, in [`TaskStatus::ALL`] order.
    fn statuses(&self) -> Vec<TaskStatus> {
        TaskStatus::ALL
            .into_iter()
            .filter(|s| self.nodes.iter().any(|n| n.status == *s))
            .collect()
    }
}

/// The label of an edge; `None` for the default `success`.
fn condition_label(c: &Condition) -> Option<&'static str> {
    match c {
        Condition::Success => None,
        Condition::Failure => Some("failure"),
        Condition::Completion => Some("completion"),
        Condition::Schema(_) => Some("schema"),
    }
}

/// Colors of a status: fill, border, text, and whether the border is dashed.
struct Style {
    fill: &'static str,
    stroke: &'static str,
    text: &'static str,
    dashed: bool,
}

fn style(s: TaskStatus) -> Style {
    let (fill, stroke, text, dashed) = match s {
        TaskStatus::Pending => ("#f3f4f6", "#9ca3af", "#374151", false),
        TaskStatus::Queued => ("#e5e7eb", "#6b7280", "#1f2937", false),
        TaskStatus::Running => ("#dbeafe", "#2563eb", "#1e3a8a", false),
        TaskStatus::AwaitingApproval => ("#fef3c7", "#d97706", "#78350f", false),
        TaskStatus::Retrying => ("#ffedd5", "#ea580c", "#7c2d12", false),
        TaskStatus::Succeeded => ("#dcfce7", "#16a34a", "#14532d", false),
        TaskStatus::Failed | TaskStatus::TimedOut => ("#fee2e2", "#dc2626", "#7f1d1d", false),
        TaskStatus::Cancelled | TaskStatus::Skipped => ("#f9fafb", "#9ca3af", "#6b7280", true),
    };
    Style {
        fill,
        stroke,
        text,
        dashed,
    }
}

/// Renders a workflow as a Mermaid flowchart.
///
/// Nodes are `t0, t1, …` in [`GraphView::nodes`] order, labelled with the
/// task's name and status and styled by status through one `classDef` per
/// status that occurs. Edges other than `success` carry their condition as
/// a label. The title, if any, goes in a front-matter block.
pub fn mermaid(g: &GraphView) -> String {
    let mut out = String::new();
    if let Some(title) = &g.title {
        let _ = write!(out, "---\ntitle: {}\n---\n", yaml_quoted(title));
    }
    out.push_str("flowchart TD\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(
            out,
            "    t{i}[\"{}<br/>{}\"]",
            mermaid_text(&n.name),
            n.status.as_str()
        );
    }
    for e in g.valid_edges() {
        let _ = match condition_label(&e.condition) {
            None => writeln!(out, "    t{} --> t{}", e.from, e.to),
            Some(label) => writeln!(out, "    t{} -- {label} --> t{}", e.from, e.to),
        };
    }
    let statuses = g.statuses();
    for &s in &statuses {
        let st = style(s);
        let _ = write!(
            out,
            "    classDef {} fill:{},stroke:{},color:{}",
            s.as_str(),
            st.fill,
            st.stroke,
            st.text
        );
        if st.dashed {
            out.push_str(",stroke-dasharray: 5 5");
        }
        out.push_str(";\n");
    }
    for &s in &statuses {
        let ids: Vec<String> = g
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.status == s)
            .map(|(i, _)| format!("t{i}"))
            .collect();
        let _ = writeln!(out, "    class {} {};", ids.join(","), s.as_str());
    }
    out
}

/// Text for inside a quoted Mermaid label: anything but letters, digits and
/// a few plain punctuation marks becomes an entity code (`#34;` for `"`), so
/// no name can end the label or be read as markup.
fn mermaid_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_alphanumeric() || matches!(c, ' ' | '_' | '.' | ':' | '-' | '/' | ',' | '+' | '=') {
            out.push(c);
        } else {
            let _ = write!(out, "#{};", u32::from(c));
        }
    }
    out
}

/// A YAML double-quoted scalar on one line (for the Mermaid front matter).
fn yaml_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders a workflow as a Graphviz DOT digraph, left to right.
///
/// Nodes are `"t0", "t1", …` in [`GraphView::nodes`] order, labelled with
/// the task's name and status, filled by status, with the task id as
/// tooltip. Edges other than `success` carry their condition as a label;
/// `failure` edges are dashed and `completion` edges dotted.
pub fn dot(g: &GraphView) -> String {
    let mut out = String::from("digraph workflow {\n");
    if let Some(title) = &g.title {
        let _ = writeln!(out, "    label=\"{}\";\n    labelloc=t;", dot_escape(title));
    }
    out.push_str("    rankdir=LR;\n");
    out.push_str("    node [shape=box, style=\"rounded,filled\"];\n");
    for (i, n) in g.nodes.iter().enumerate() {
        let st = style(n.status);
        let _ = write!(
            out,
            "    \"t{i}\" [label=\"{}\\n{}\", fillcolor=\"{}\", color=\"{}\", fontcolor=\"{}\", tooltip=\"{}\"",
            dot_escape(&n.name),
            n.status.as_str(),
            st.fill,
            st.stroke,
            st.text,
            dot_escape(&n.id)
        );
        if st.dashed {
            out.push_str(", style=\"rounded,filled,dashed\"");
        }
        out.push_str("];\n");
    }
    for e in g.valid_edges() {
        let _ = write!(out, "    \"t{}\" -> \"t{}\"", e.from, e.to);
        match &e.condition {
            Condition::Success => {}
            Condition::Failure => out.push_str(" [label=\"failure\", style=dashed]"),
            Condition::Completion => out.push_str(" [label=\"completion\", style=dotted]"),
            Condition::Schema(_) => out.push_str(" [label=\"schema\"]"),
        }
        out.push_str(";\n");
    }
    out.push_str("}\n");
    out
}

/// Text for inside a DOT double-quoted string. Backslashes are doubled
/// because Graphviz reads `\n`, `\N` and the like in labels as escapes.
fn dot_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0190f3c2-7a4e-7b2d-9c1a-3f5e6d7c8b9a";

    fn task(name: &str, deps: &[&str]) -> TaskSpec {
        let mut t = TaskSpec::new(name).with_command("true");
        for d in deps {
            t = t.depends_on(*d);
        }
        t
    }

    fn on(mut t: TaskSpec, dep: &str, condition: Condition) -> TaskSpec {
        t.depends_on.push(Dependency::Detailed {
            task: dep.to_string(),
            condition,
        });
        t
    }

    /// The field and message of an invalid-input error.
    fn invalid(r: Result<Plan>) -> (String, String) {
        match r {
            Err(Error::InvalidInput { field, message }) => (field, message),
            other => panic!("expected invalid input, got {other:?}"),
        }
    }

    /// In a workflow two tasks with one idempotency key would be one task;
    /// a plain batch keeps answering the repeat with the first.
    #[test]
    fn a_workflow_refuses_a_key_given_twice() {
        let keyed = |name: &str, key: &str| {
            let mut t = task(name, &[]);
            t.idempotency_key = Some(key.into());
            t
        };
        let tasks = vec![keyed("a", "k1"), keyed("b", "k2"), keyed("c", "k1")];
        let (field, message) = invalid(plan_with(&tasks, true));
        assert_eq!(field, "tasks[2].idempotency_key");
        assert!(message.contains("tasks[0]"), "{message}");
        assert!(plan_with(&tasks, false).is_ok());
    }

    #[test]
    fn a_batch_may_repeat_names_nobody_depends_on() {
        let tasks = vec![task("noop", &[]), task("noop", &[]), task("x", &[])];
        assert!(plan_with(&tasks, false).is_ok());
        let (field, _) = invalid(plan_with(&tasks, true));
        assert_eq!(field, "tasks[1].name");
        let tasks = vec![task("a", &[]), task("a", &[]), task("b", &["a"])];
        let (field, message) = invalid(plan_with(&tasks, false));
        assert_eq!(field, "tasks[2].depends_on[0]");
        assert!(message.contains("ambiguous"), "{message}");
    }

    #[test]
    fn diamond_orders_dependencies_first() {
        let tasks = vec![
            task("a", &[]),
            task("b", &["a"]),
            on(task("c", &[]), "a", Condition::Failure),
            task("d", &["b", "c"]),
        ];
        let p = plan(&tasks).unwrap();
        assert_eq!(p.order, vec![0, 1, 2, 3]);
        assert_eq!(
            p.edges,
            vec![
                Edge {
                    from: 0,
                    to: 1,
                    condition: Condition::Success
                },
                Edge {
                    from: 0,
                    to: 2,
                    condition: Condition::Failure
                },
                Edge {
                    from: 1,
                    to: 3,
                    condition: Condition::Success
                },
                Edge {
                    from: 2,
                    to: 3,
                    condition: Condition::Success
                },
            ]
        );
        assert!(p.external.is_empty());
    }

    #[test]
    fn order_is_stable_when_listed_backwards() {
        let tasks = vec![
            task("d", &["b", "c"]),
            task("c", &["a"]),
            task("b", &["a"]),
            task("a", &[]),
        ];
        assert_eq!(plan(&tasks).unwrap().order, vec![3, 1, 2, 0]);
        assert_eq!(plan(&tasks).unwrap(), plan(&tasks).unwrap());
    }

    #[test]
    fn fan_out_fan_in_of_a_thousand() {
        let mut tasks = vec![task("root", &[])];
        let names: Vec<String> = (0..1000).map(|i| format!("w{i}")).collect();
        for n in &names {
            tasks.push(task(n, &["root"]));
        }
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        tasks.push(task("sink", &refs));
        let p = plan(&tasks).unwrap();
        assert_eq!(p.order, (0..1002).collect::<Vec<_>>());
        assert_eq!(p.edges.len(), 2000);
        assert!(
            p.edges[1000..]
                .iter()
                .enumerate()
                .all(|(k, e)| e.to == 1001 && e.from == k + 1)
        );
    }

    #[test]
    fn empty_submission_has_an_empty_plan() {
        let p = plan(&[]).unwrap();
        assert!(p.order.is_empty() && p.edges.is_empty() && p.external.is_empty());
    }

    #[test]
    fn uuid_dependencies_are_external() {
        let upper = ID.to_uppercase();
        let tasks = vec![
            task("a", &[ID]),
            on(task("b", &["a"]), &upper, Condition::Completion),
        ];
        let p = plan(&tasks).unwrap();
        assert_eq!(
            p.external,
            vec![
                ExternalDep {
                    task: 0,
                    id: ID.to_string(),
                    condition: Condition::Success
                },
                ExternalDep {
                    task: 1,
                    id: ID.to_string(),
                    condition: Condition::Completion
                },
            ]
        );
        assert_eq!(p.edges.len(), 1);
        assert_eq!(p.order, vec![0, 1]);
    }

    #[test]
    fn duplicate_names_are_rejected() {
        let tasks = vec![task("build", &[]), task("test", &[]), task("build", &[])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[2].name");
        assert_eq!(
            message,
            r#"duplicate task name "build" (also tasks[0]); names must be unique in a workflow"#
        );
    }

    #[test]
    fn unknown_names_get_a_hint_when_one_is_close() {
        let tasks = vec![task("build", &[]), task("test", &["build", "bild"])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[1].depends_on[1]");
        assert_eq!(
            message,
            r#"unknown task "bild"; no task of this submission has that name; did you mean "build"?"#
        );

        let tasks = vec![task("build", &[]), task("test", &["deploy"])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[1].depends_on[0]");
        assert_eq!(
            message,
            r#"unknown task "deploy"; no task of this submission has that name"#
        );
    }

    #[test]
    fn hint_prefers_the_closest_name_and_skips_the_task_itself() {
        let tasks = vec![
            task("lint-all", &[]),
            task("lint", &[]),
            task("lnt", &["lintt"]),
        ];
        let (_, message) = invalid(plan(&tasks));
        assert!(message.ends_with(r#"; did you mean "lint"?"#), "{message}");

        // "tst" is closest to the task's own name; offer the next best.
        let tasks = vec![task("toast", &[]), task("test", &["tst"])];
        let (_, message) = invalid(plan(&tasks));
        assert!(message.ends_with(r#"; did you mean "toast"?"#), "{message}");

        // "x" is one edit from "y", but that is the whole name: no hint.
        let tasks = vec![task("y", &[]), task("z", &["x"])];
        let (_, message) = invalid(plan(&tasks));
        assert!(!message.contains("did you mean"), "{message}");
    }

    #[test]
    fn self_dependency_is_rejected() {
        let tasks = vec![task("a", &[]), task("b", &["a", "b"])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[1].depends_on[1]");
        assert_eq!(message, r#"task "b" depends on itself"#);
    }

    #[test]
    fn duplicate_dependencies_are_rejected() {
        let tasks = vec![
            task("x", &[]),
            on(task("y", &["x"]), "x", Condition::Failure),
        ];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[1].depends_on[1]");
        assert_eq!(message, r#"duplicate dependency on "x""#);

        let upper = ID.to_uppercase();
        let tasks = vec![task("y", &[ID, upper.as_str()])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks[0].depends_on[1]");
        assert_eq!(message, format!("duplicate dependency on {upper:?}"));
    }

    #[test]
    fn three_cycle_is_named_in_dependency_order() {
        // b depends on a, c on b, a on c: a runs before b, b before c, c before a.
        let tasks = vec![task("a", &["c"]), task("b", &["a"]), task("c", &["b"])];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks");
        assert_eq!(message, "cycle: a -> b -> c -> a");
    }

    #[test]
    fn two_cycle_inside_a_bigger_graph() {
        let tasks = vec![
            task("root", &[]),
            task("x", &["root"]),
            task("p", &["x", "q"]),
            task("q", &["p"]),
            task("y", &["q", "root"]),
            task("z", &[]),
        ];
        let (field, message) = invalid(plan(&tasks));
        assert_eq!(field, "tasks");
        assert_eq!(message, "cycle: p -> q -> p");
        assert_eq!(invalid(plan(&tasks)).1, message);
    }

    #[test]
    fn cycle_path_is_a_real_shortest_cycle() {
        // Component {a, b, c, d}: a -> b -> c -> a and a -> d -> a.
        let tasks = vec![
            task("a", &["c", "d"]),
            task("b", &["a"]),
            task("c", &["b"]),
            task("d", &["a"]),
        ];
        let (_, message) = invalid(plan(&tasks));
        assert_eq!(message, "cycle: a -> d -> a");
    }

    #[test]
    fn banded_distance_matches_the_full_one() {
        fn full(a: &[char], b: &[char]) -> usize {
            let mut prev: Vec<usize> = (0..=b.len()).collect();
            for i in 1..=a.len() {
                let mut cur = vec![i; b.len() + 1];
                for j in 1..=b.len() {
                    let cost = usize::from(a[i - 1] != b[j - 1]);
                    cur[j] = (prev[j - 1] + cost).min(prev[j] + 1).min(cur[j - 1] + 1);
                }
                prev = cur;
            }
            prev[b.len()]
        }
        let words = [
            "", "a", "ab", "ba", "abc", "acb", "build", "bild", "biuld", "buidl", "rebuild",
            "builds", "bulid-x", "deploy", "dpeloy", "lint", "lnit", "xyz", "abcdef", "badcfe",
        ];
        for a in words {
            for b in words {
                let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
                for max in 0..=3 {
                    let d = full(&a, &b);
                    let expect = (d <= max).then_some(d);
                    assert_eq!(distance_within(&a, &b, max), expect, "{a:?} {b:?} {max}");
                }
            }
        }
    }

    fn small_view() -> GraphView {
        let node = |i: usize, name: &str, status| ViewNode {
            id: format!("id-{i}"),
            name: name.to_string(),
            status,
        };
        GraphView {
            title: Some(r#"nightly "release""#.to_string()),
            nodes: vec![
                node(0, "build", TaskStatus::Succeeded),
                node(1, "test", TaskStatus::Running),
                node(2, "notify", TaskStatus::Skipped),
                node(3, "odd\"name", TaskStatus::Succeeded),
            ],
            edges: vec![
                ViewEdge {
                    from: 0,
                    to: 1,
                    condition: Condition::Success,
                },
                ViewEdge {
                    from: 0,
                    to: 2,
                    condition: Condition::Failure,
                },
                ViewEdge {
                    from: 1,
                    to: 3,
                    condition: Condition::Completion,
                },
                ViewEdge {
                    from: 1,
                    to: 9,
                    condition: Condition::Success,
                },
            ],
        }
    }

    #[test]
    fn mermaid_output() {
        let out = mermaid(&small_view());
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(
            &lines[..4],
            &[
                "---",
                r#"title: "nightly \"release\"""#,
                "---",
                "flowchart TD"
            ]
        );
        for want in [
            r#"t0["build<br/>succeeded"]"#,
            r#"t3["odd#34;name<br/>succeeded"]"#,
            "t0 --> t1",
            "t0 -- failure --> t2",
            "t1 -- completion --> t3",
            "class t0,t3 succeeded;",
            "class t1 running;",
            "class t2 skipped;",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{out}");
        }
        assert!(!out.contains("t9"), "{out}");
        for class in ["succeeded", "running", "skipped"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("classDef {class} fill:"))),
                "no classDef {class} in\n{out}"
            );
        }
        assert!(!out.contains("classDef failed"), "{out}");
        assert!(out.contains("stroke-dasharray"), "{out}");
        assert_eq!(out, mermaid(&small_view()));
    }

    #[test]
    fn mermaid_without_title_starts_with_the_flowchart() {
        let mut g = small_view();
        g.title = None;
        assert!(mermaid(&g).starts_with("flowchart TD\n"));
    }

    #[test]
    fn dot_output() {
        let out = dot(&small_view());
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines[0], "digraph workflow {");
        assert_eq!(*lines.last().unwrap(), "}");
        for want in [
            r#"label="nightly \"release\"";"#,
            "rankdir=LR;",
            r#"node [shape=box, style="rounded,filled"];"#,
            r##""t0" [label="build\nsucceeded", fillcolor="#dcfce7", color="#16a34a", fontcolor="#14532d", tooltip="id-0"];"##,
            r#""t0" -> "t1";"#,
            r#""t0" -> "t2" [label="failure", style=dashed];"#,
            r#""t1" -> "t3" [label="completion", style=dotted];"#,
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{out}");
        }
        assert!(out.contains(r#"label="odd\"name\nsucceeded""#), "{out}");
        assert!(out.contains(r#"style="rounded,filled,dashed""#), "{out}");
        assert!(!out.contains("t9"), "{out}");
        assert_eq!(out, dot(&small_view()));
    }

    #[test]
    fn dot_escapes_backslashes_and_newlines() {
        assert_eq!(dot_escape("a\\n\"b\nc\r"), "a\\\\n\\\"b\\nc ");
    }
}
