//! Spec hashing and the audit hash chain.
//!
//! The spec hash is SHA-256 over the canonical JSON of the resolved spec,
//! computed at submit and checked before every attempt. Audit events form a
//! chain: each event's hash covers its fields and the previous event's hash,
//! so editing, deleting or reordering any row breaks every link after it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Hash of the chain's virtual event 0.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Hex SHA-256 of a canonical spec.
pub fn spec_hash(canonical_spec: &str) -> String {
    hex_lower(&Sha256::digest(canonical_spec.as_bytes()))
}

/// Lowercase hex of `bytes`, as `hex::encode` writes it, through a table
/// (the writer hashes every audit event it appends, so this is on its path).
pub fn hex_lower(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = Vec::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0x0f)]);
    }
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// One audit event: a state transition of a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditEvent {
    /// Position in the chain, contiguous from 1.
    pub seq: i64,
    /// Milliseconds since the epoch.
    pub at: i64,
    pub task_id: String,
    /// What happened: `submitted`, `claimed`, `finished`, `retry_scheduled`, `lease_expired`, `cancelled`, ...
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_status: Option<String>,
    pub to_status: String,
    /// Compact JSON with event detail (attempt, worker, error).
    pub detail: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The hashed content of an audit event.
#[derive(Debug, Clone, Copy)]
pub struct EventContent<'a> {
    pub seq: i64,
    pub at: i64,
    pub task_id: &'a str,
    pub kind: &'a str,
    pub from_status: Option<&'a str>,
    pub to_status: &'a str,
    pub detail: &'a str,
}

/// Computes the hash of an event from its content and the previous hash.
pub fn event_hash(prev_hash: &str, e: &EventContent<'_>) -> String {
    let mut h = Sha256::new();
    let (mut seq, mut at) = (itoa::Buffer::new(), itoa::Buffer::new());
    // Length-prefix every field so no two different events serialize alike.
    for part in [
        prev_hash.as_bytes(),
        seq.format(e.seq).as_bytes(),
        at.format(e.at).as_bytes(),
        e.task_id.as_bytes(),
        e.kind.as_bytes(),
        e.from_status.unwrap_or("").as_bytes(),
        e.to_status.as_bytes(),
        e.detail.as_bytes(),
    ] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex_lower(&h.finalize())
}

impl AuditEvent {
    /// Recomputes this event's hash from its fields.
    pub fn computed_hash(&self) -> String {
        event_hash(
            &self.prev_hash,
            &EventContent {
                seq: self.seq,
                at: self.at,
                task_id: &self.task_id,
                kind: &self.kind,
                from_status: self.from_status.as_deref(),
                to_status: &self.to_status,
                detail: &self.detail,
            },
        )
    }
}

/// The outcome of `audit verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AuditReport {
    /// Events checked.
    pub events: u64,
    pub ok: bool,
    /// The first broken link, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<BrokenLink>,
}

/// Where the chain breaks and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct BrokenLink {
    pub seq: i64,
    pub task_id: String,
    pub reason: String,
}

/// Walks events in `seq` order and reports the first broken link.
#[derive(Debug)]
pub struct ChainVerifier {
    expected_prev: String,
    expected_seq: i64,
    checked: u64,
    broken: Option<BrokenLink>,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        ChainVerifier {
            expected_prev: GENESIS_HASH.to_string(),
            expected_seq: 1,
            checked: 0,
            broken: None,
        }
    }
}

impl ChainVerifier {
    /// Feeds the next event; returns false once the chain is broken.
    pub fn push(&mut self, e: &AuditEvent) -> bool {
        if self.broken.is_some() {
            return false;
        }
        self.checked += 1;
        let reason = if e.seq != self.expected_seq {
            Some(format!(
                "expected event #{} but found #{}: events were deleted or inserted",
                self.expected_seq, e.seq
            ))
        } else if e.prev_hash != self.expected_prev {
            Some("prev_hash does not match the previous event's hash".to_string())
        } else if e.computed_hash() != e.hash {
            Some("the event's content does not match its hash: the row was altered".to_string())
        } else {
            None
        };
        if let Some(reason) = reason {
            self.broken = Some(BrokenLink {
                seq: e.seq,
                task_id: e.task_id.clone(),
                reason,
            });
            return false;
        }
        self.expected_prev = e.hash.clone();
        self.expected_seq += 1;
        true
    }

    pub fn finish(self) -> AuditReport {
        AuditReport {
            events: self.checked,
            ok: self.broken.is_none(),
            broken: self.broken,
        }
    }
}

/// The first task whose status its last audit event does not explain, as
/// `(id, status, last event's seq, its to_status)`; the same SQL on SQLite
/// and PostgreSQL (`audit_events_task` serves the inner lookup).
pub const HEAD_MISMATCH_SQL: &str = "SELECT t.id, t.status, a.seq, a.to_status FROM tasks t \
     LEFT JOIN audit_events a ON a.seq = \
       (SELECT MAX(seq) FROM audit_events WHERE task_id = t.id) \
     WHERE a.seq IS NULL OR a.to_status != t.status LIMIT 1";

/// A task whose status its last audit event does not explain: its id, its
/// status, and its last event's seq and `to_status` (none if it has none).
pub type HeadMismatch = (String, String, Option<(i64, String)>);

/// The chain alone cannot show that its newest events were deleted: what
/// is left is still a valid chain. Each task's current status must be the
/// status its last event moved it to; `mismatch` is the first task for
/// which it is not: `(task_id, status, last event's seq and to_status)`.
pub fn check_task_heads(report: &mut AuditReport, mismatch: Option<HeadMismatch>) {
    if !report.ok {
        return;
    }
    if let Some((task_id, status, last)) = mismatch {
        report.ok = false;
        let (seq, reason) = match last {
            Some((seq, to)) => (
                seq,
                format!(
                    "task {task_id} is {status} but its last audit event (seq {seq}) moved it to {to}: later events are missing"
                ),
            ),
            None => (
                0,
                format!(
                    "task {task_id} is {status} but has no audit events: its events are missing"
                ),
            ),
        };
        report.broken = Some(BrokenLink {
            seq,
            task_id,
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_lower_writes_what_hex_encode_writes() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_lower(&bytes), hex::encode(&bytes));
        assert_eq!(hex_lower(&[]), "");
        assert_eq!(
            spec_hash("{}"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    fn chain(n: i64) -> Vec<AuditEvent> {
        let mut prev = GENESIS_HASH.to_string();
        (1..=n)
            .map(|seq| {
                let hash = event_hash(
                    &prev,
                    &EventContent {
                        seq,
                        at: 1000 + seq,
                        task_id: "t1",
                        kind: "claimed",
                        from_status: Some("queued"),
                        to_status: "running",
                        detail: "{}",
                    },
                );
                let e = AuditEvent {
                    seq,
                    at: 1000 + seq,
                    task_id: "t1".into(),
                    kind: "claimed".into(),
                    from_status: Some("queued".into()),
                    to_status: "running".into(),
                    detail: "{}".into(),
                    prev_hash: prev.clone(),
                    hash: hash.clone(),
                };
                prev = hash;
                e
            })
            .collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let mut v = ChainVerifier::default();
        for e in chain(5) {
            assert!(v.push(&e));
        }
        let r = v.finish();
        assert!(r.ok);
        assert_eq!(r.events, 5);
    }

    #[test]
    fn altered_row_is_named() {
        let mut events = chain(5);
        events[2].to_status = "succeeded".into();
        let mut v = ChainVerifier::default();
        events.iter().for_each(|e| {
            v.push(e);
        });
        let r = v.finish();
        assert!(!r.ok);
        assert_eq!(r.broken.unwrap().seq, 3);
    }

    #[test]
    fn deleted_row_is_named() {
        let mut events = chain(5);
        events.remove(1);
        let mut v = ChainVerifier::default();
        events.iter().for_each(|e| {
            v.push(e);
        });
        assert_eq!(v.finish().broken.unwrap().seq, 3);
    }
}
