//! Turning submitted specs into rows: defaults, the dependency graph,
//! schedules, hashes. Nothing is stored here; a rejected submission leaves
//! no trace.

use std::collections::HashMap;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::integrity;
use crate::model::{
    MAX_BATCH_TASKS, TaskFile, TaskKind, TaskSpec, WorkflowSpec, canonical_json, cron::CronSchedule,
};
use crate::store::{NewDep, NewSchedule, NewSubmission, NewTask, NewWorkflow};
use crate::workflow::graph;

/// The workflow header of a submission (a `WorkflowSpec` without tasks).
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub name: String,
    pub project: Option<String>,
    pub tags: Vec<String>,
    pub description: Option<String>,
    /// The workflow's idempotency key (never a schedule run's).
    pub idempotency_key: Option<String>,
}

impl Header {
    pub fn of(w: &WorkflowSpec) -> Self {
        Header {
            name: w.name.clone(),
            project: w.project.clone(),
            tags: w.tags.clone(),
            description: w.description.clone(),
            idempotency_key: w.idempotency_key.clone(),
        }
    }
}

/// How this submission relates to a schedule.
#[derive(Debug, Clone, Default)]
pub(crate) struct RunOf {
    /// The schedule this is a run of.
    pub schedule_id: Option<String>,
    /// Tasks without dependencies start no earlier than this (ms).
    pub start_at: Option<i64>,
    /// Suffix for idempotency keys, so each run of a schedule is its own.
    pub key_suffix: Option<String>,
}

/// A submission ready for the store.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub sub: NewSubmission,
    pub workflow_id: Option<String>,
    pub schedule_id: Option<String>,
}

/// A graph error of a task submitted alone, in its own terms: no
/// `tasks[0].` prefix, and dependencies that are ids of existing tasks.
fn alone(e: Error) -> Error {
    match e {
        Error::InvalidInput { field, message } => Error::InvalidInput {
            field: field
                .strip_prefix("tasks[0].")
                .map(str::to_string)
                .unwrap_or(field),
            message: message.replace(
                "no task of this submission has that name",
                "a task submitted alone depends on existing tasks by their ids",
            ),
        },
        other => other,
    }
}

/// Builds the rows of a submission. `single` drops the `tasks[i].` prefix of
/// errors (a one-task submit).
pub(crate) fn prepare(
    config: &Config,
    header: Option<&Header>,
    schedule: Option<&crate::model::Schedule>,
    mut specs: Vec<TaskSpec>,
    run: &RunOf,
    now: i64,
    single: bool,
) -> Result<Prepared> {
    if specs.len() > MAX_BATCH_TASKS {
        return Err(Error::invalid(
            "tasks",
            format!(
                "{} tasks in one submission; at most {MAX_BATCH_TASKS}",
                specs.len()
            ),
        ));
    }
    if specs.is_empty() {
        return Err(Error::invalid("tasks", "must list at least one task"));
    }
    let field = |i: usize| {
        move |e: Error| {
            if single {
                e
            } else {
                e.in_field(&format!("tasks[{i}]"))
            }
        }
    };
    // The workflow's project is every task's default.
    if let Some(h) = header {
        for s in &mut specs {
            if s.project.is_none() {
                s.project = h.project.clone();
            }
        }
    }
    for (i, s) in specs.iter().enumerate() {
        s.validate().map_err(field(i))?;
    }
    let plan = graph::plan_with(&specs, header.is_some())
        .map_err(|e| if single { alone(e) } else { e })?;
    let ids: Vec<String> = (0..specs.len())
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let workflow_id = header.map(|_| uuid::Uuid::now_v7().to_string());

    // A schedule on the workflow: the first run waits for its first slot.
    let mut schedules = Vec::new();
    let mut schedule_id = run.schedule_id.clone();
    let mut start_at = run.start_at;
    let mut key_suffix = run.key_suffix.clone();
    if let Some(sch) = schedule {
        let h = header.expect("only workflows carry a schedule");
        sch.validate().map_err(|e| e.in_field("schedule"))?;
        if let Some(at) = sch.at {
            start_at = Some(at.0);
        }
        if let Some(expr) = &sch.cron {
            let cron = CronSchedule::parse(expr, sch.timezone.as_deref())
                .map_err(|e| e.in_field("schedule"))?;
            let first = cron
                .next_after(now)
                .ok_or_else(|| Error::invalid("schedule.cron", format!("{expr:?} never fires")))?;
            let id = uuid::Uuid::now_v7().to_string();
            let template = TaskFile {
                name: Some(h.name.clone()),
                project: h.project.clone(),
                tags: h.tags.clone(),
                description: h.description.clone(),
                schedule: None,
                tasks: specs.clone(),
                // A run is a workflow of its own: the key named the submission.
                idempotency_key: None,
            };
            schedules.push(NewSchedule {
                id: id.clone(),
                name: h.name.clone(),
                project: h.project.clone(),
                cron: expr.clone(),
                timezone: sch.timezone.clone(),
                template: serde_json::to_string(&template)
                    .map_err(|e| Error::invalid("schedule", e))?,
                next_fire_at: first,
                upcoming_run: workflow_id.clone().expect("a workflow has an id"),
                now,
            });
            start_at = Some(first);
            schedule_id = Some(id);
            // The first run is a run of its slot like every later one.
            if key_suffix.is_none() {
                key_suffix = Some(first.to_string());
            }
        }
    }

    // Dependencies by index, then by existing id.
    let mut deps: Vec<Vec<NewDep>> = vec![Vec::new(); specs.len()];
    for e in &plan.edges {
        deps[e.to].push(NewDep {
            dep_id: ids[e.from].clone(),
            condition: e.condition.clone(),
        });
    }
    for x in &plan.external {
        deps[x.task].push(NewDep {
            dep_id: x.id.clone(),
            condition: x.condition.clone(),
        });
    }

    let mut tasks = Vec::with_capacity(specs.len());
    for (i, mut spec) in specs.into_iter().enumerate() {
        let mut task_schedule_id = schedule_id.clone();
        // Every task of a scheduled run waits for the run's time, also one
        // whose only dependencies are tasks outside the workflow (which may
        // have finished long ago).
        let mut run_at = now;
        if let Some(t) = start_at {
            run_at = t;
        }
        if let Some(sch) = spec.schedule.take() {
            if let Some(at) = sch.at {
                run_at = run_at.max(at.0);
            }
            if let Some(expr) = &sch.cron {
                if header.is_some() {
                    return Err(field(i)(Error::invalid(
                        "schedule.cron",
                        "a task in a workflow cannot have its own cron schedule; put `schedule` on the workflow",
                    )));
                }
                if !deps[i].is_empty() || plan.edges.iter().any(|e| e.from == i) {
                    return Err(field(i)(Error::invalid(
                        "schedule.cron",
                        "a task with a cron schedule cannot depend on, or be depended on by, other tasks; make it a workflow with a schedule",
                    )));
                }
                let cron = CronSchedule::parse(expr, sch.timezone.as_deref())
                    .map_err(|e| field(i)(e.in_field("schedule")))?;
                let first = cron.next_after(now).ok_or_else(|| {
                    field(i)(Error::invalid(
                        "schedule.cron",
                        format!("{expr:?} never fires"),
                    ))
                })?;
                let id = uuid::Uuid::now_v7().to_string();
                let template = TaskFile {
                    name: None,
                    project: None,
                    tags: Vec::new(),
                    description: None,
                    schedule: None,
                    tasks: vec![spec.clone()],
                    idempotency_key: None,
                };
                schedules.push(NewSchedule {
                    id: id.clone(),
                    name: spec.name.clone(),
                    project: spec.project.clone(),
                    cron: expr.clone(),
                    timezone: sch.timezone.clone(),
                    template: serde_json::to_string(&template)
                        .map_err(|e| Error::invalid("schedule", e))?,
                    next_fire_at: first,
                    upcoming_run: ids[i].clone(),
                    now,
                });
                run_at = first;
                task_schedule_id = Some(id);
                if run.key_suffix.is_none()
                    && let Some(k) = &spec.idempotency_key
                {
                    spec.idempotency_key = Some(format!("{k}@{first}"));
                }
            } else {
                // Keep a one-off time in the stored spec: it is part of what was asked.
                spec.schedule = Some(sch);
            }
        }
        if let (Some(k), Some(sfx)) = (&spec.idempotency_key, &key_suffix) {
            spec.idempotency_key = Some(format!("{k}@{sfx}"));
        }
        let mut t = resolve(config, spec, now).map_err(field(i))?;
        t.id = ids[i].clone();
        t.workflow_id = workflow_id.clone();
        t.schedule_id = task_schedule_id;
        t.deps = std::mem::take(&mut deps[i]);
        t.run_at = run_at;
        tasks.push(t);
    }
    let workflow = header.map(|h| NewWorkflow {
        id: workflow_id.clone().expect("set with the header"),
        name: h.name.clone(),
        project: h.project.clone(),
        tags: h.tags.clone(),
        description: h.description.clone(),
        schedule_id: schedule_id.clone(),
        idempotency_key: h.idempotency_key.clone(),
        now,
    });
    Ok(Prepared {
        sub: NewSubmission {
            workflow,
            schedules,
            tasks,
        },
        workflow_id,
        schedule_id,
    })
}

/// Fills configured defaults, checks the result, and hashes the canonical spec.
pub(crate) fn resolve(config: &Config, mut spec: TaskSpec, now: i64) -> Result<NewTask> {
    let exec = &config.execution;
    let kind = spec.effective_kind();
    spec.kind = Some(kind);
    spec.timeout = Some(spec.timeout.unwrap_or(exec.default_timeout));
    let own = spec.retry.take().unwrap_or_default();
    let retry = own.merged_over(&exec.default_retry);
    // A `max_delay` below the configured `initial_delay` the task did not
    // give: say where that value comes from.
    if let (None, Some(i), Some(m)) = (own.initial_delay, retry.initial_delay, own.max_delay)
        && i > m
    {
        return Err(Error::invalid(
            "retry.initial_delay",
            format!(
                "is {i} by default (execution.default_retry), more than this task's max_delay ({m}); \
                 give initial_delay too, at most {m}"
            ),
        ));
    }
    spec.retry = Some(retry);
    if matches!(kind, TaskKind::Command | TaskKind::Http) {
        spec.limits = Some(
            spec.limits
                .take()
                .unwrap_or_default()
                .merged_over(&exec.default_limits),
        );
    }
    // The merged retry policy can break a rule neither part broke alone
    // (initial_delay above a default max_delay, say).
    if let Some(r) = &spec.retry {
        r.validate().map_err(|e| e.in_field("retry"))?;
    }
    let spec_json = canonical_json(&spec)?;
    let spec_hash = integrity::spec_hash(&spec_json);
    Ok(NewTask {
        id: String::new(),
        name: spec.name.clone(),
        kind,
        project: spec.project.clone(),
        tags: spec.tags.clone(),
        priority: spec.priority,
        max_attempts: spec.retry.as_ref().map(|r| r.max_attempts()).unwrap_or(1),
        idempotency_key: spec.idempotency_key.clone(),
        spec_json,
        spec_hash,
        now,
        workflow_id: None,
        schedule_id: None,
        deps: Vec::new(),
        run_at: now,
        needs_approval: spec.requires_approval,
    })
}

/// Where each existing-task dependency sits in the specs, for error fields.
pub(crate) fn external_dep_fields(specs: &[TaskSpec]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (i, s) in specs.iter().enumerate() {
        for (k, d) in s.depends_on.iter().enumerate() {
            if let Ok(u) = uuid::Uuid::parse_str(d.target()) {
                out.entry(u.hyphenated().to_string())
                    .or_insert_with(|| format!("tasks[{i}].depends_on[{k}]"));
            }
        }
    }
    out
}
