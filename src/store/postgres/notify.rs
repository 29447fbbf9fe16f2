//! Wake-ups between nodes: each committed batch sends its task and
//! workflow events with `NOTIFY`; every other node re-broadcasts them to its
//! own subscribers and wakes its engine. Notifications are a fast path
//! only: a node that misses some (a lost listener connection) still finds
//! the work by polling.

use serde::{Deserialize, Serialize};

use crate::model::{TaskEvent, TaskStatus, WorkflowEvent};

/// The channel the nodes of a queue in the `public` schema listen on.
const CHANNEL: &str = "task_queue_events";

/// The channel of the queue whose tables are in `schema`. `NOTIFY` reaches
/// every session of the database, so two queues in two schemas of one
/// database need two channels, or each would see the other's events.
pub(super) fn channel(schema: &str) -> String {
    use sha2::{Digest, Sha256};
    if schema == "public" {
        return CHANNEL.to_string();
    }
    let digest = Sha256::digest(schema.as_bytes());
    let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{CHANNEL}_{tag}")
}

/// PostgreSQL refuses payloads of 8000 bytes or more; stay well below.
const MAX_PAYLOAD: usize = 7000;

/// One notification: events of one batch (or part of one) from `node`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Payload {
    #[serde(rename = "n")]
    pub node: String,
    #[serde(rename = "t", default)]
    pub tasks: Vec<TaskEvent>,
    #[serde(rename = "w", default)]
    pub workflows: Vec<WorkflowEvent>,
}

/// The notifications that carry these events, each small enough to send.
pub(super) fn payloads(
    node: &str,
    tasks: &[TaskEvent],
    workflows: &[WorkflowEvent],
) -> Vec<String> {
    let mut out = Vec::new();
    let mut parts: Vec<String> = Vec::new();
    let mut size = 0;
    let head = format!("{{\"n\":{},", serde_json::Value::from(node));
    let flush = |parts: &mut Vec<String>, out: &mut Vec<String>, size: &mut usize| {
        if parts.is_empty() {
            return;
        }
        let (t, w): (Vec<&String>, Vec<&String>) = parts.iter().partition(|p| p.starts_with('T'));
        let join = |v: Vec<&String>| v.iter().map(|p| &p[1..]).collect::<Vec<_>>().join(",");
        out.push(format!("{head}\"t\":[{}],\"w\":[{}]}}", join(t), join(w)));
        parts.clear();
        *size = 0;
    };
    // Other nodes need what wakes an engine (ready work) or a waiter (an
    // end); claims and moves back to `pending` stay local.
    let items = tasks
        .iter()
        .filter(|e| !matches!(e.status, TaskStatus::Running | TaskStatus::Pending))
        .filter_map(|e| serde_json::to_string(e).ok().map(|s| format!("T{s}")))
        .chain(
            workflows
                .iter()
                .filter_map(|e| serde_json::to_string(e).ok().map(|s| format!("W{s}"))),
        );
    for item in items {
        if size + item.len() + head.len() + 16 > MAX_PAYLOAD {
            flush(&mut parts, &mut out, &mut size);
        }
        // An event larger than a payload (a very long name) is left out;
        // its node's peers see the change when they next poll.
        if item.len() + head.len() + 16 > MAX_PAYLOAD {
            continue;
        }
        size += item.len() + 1;
        parts.push(item);
    }
    flush(&mut parts, &mut out, &mut size);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Timestamp;

    #[test]
    fn each_schema_has_its_own_channel() {
        assert_eq!(channel("public"), "task_queue_events");
        let a = channel("t_one");
        assert_ne!(a, channel("t_two"));
        assert_eq!(a, channel("t_one"));
        assert!(a.len() < 64, "fits an identifier");
    }

    #[test]
    fn payloads_stay_small_and_round_trip() {
        let events: Vec<TaskEvent> = (0..500)
            .map(|i| TaskEvent {
                task_id: format!("task-{i:04}-0000-0000-0000-000000000000"),
                workflow_id: Some("wf".into()),
                name: format!("step-{i}"),
                status: TaskStatus::Queued,
                attempt: 1,
                at: Timestamp(i),
            })
            .collect();
        let out = payloads("node-a", &events, &[]);
        assert!(out.len() > 1, "500 events need several notifications");
        let mut back = Vec::new();
        for p in &out {
            assert!(p.len() < 8000, "{}", p.len());
            let parsed: Payload = serde_json::from_str(p).unwrap();
            assert_eq!(parsed.node, "node-a");
            back.extend(parsed.tasks);
        }
        assert_eq!(back, events);
        assert!(payloads("node-a", &[], &[]).is_empty());
        let mut claimed = events[0].clone();
        claimed.status = TaskStatus::Running;
        assert!(
            payloads("node-a", &[claimed], &[]).is_empty(),
            "claims stay local"
        );
    }
}
