//! Crash recovery at start-up.
//!
//! Every engine records itself (host, pid, process start time). A restarted
//! engine looks at the workers on its own host that still hold leases: if
//! the process is gone (or the pid now belongs to another process), their
//! tasks are taken back at once instead of waiting for the lease to expire.
//! Leases of workers on other hosts are left to expire.

use crate::error::Result;
use crate::store::{Reclaim, WorkerInfo};

use super::Shared;

/// This machine's host name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: buf is valid for its length.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".to_string()
    }
}

/// Start time of a process in clock ticks since boot (field 22 of /proc/PID/stat).
pub fn process_start(pid: i64) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces; fields resume after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_alive(w: &WorkerInfo) -> bool {
    match process_start(w.pid) {
        Some(start) => start == w.pid_start,
        None => false,
    }
}

pub(super) async fn register_and_recover(shared: &Shared) -> Result<()> {
    let host = host_name();
    let pid = std::process::id() as i64;
    shared
        .store
        .register_worker(WorkerInfo {
            id: shared.worker_id.clone(),
            host: host.clone(),
            pid,
            pid_start: process_start(pid).unwrap_or(0),
            started_at: shared.clock.now_ms(),
        })
        .await?;
    let dead: Vec<String> = shared
        .store
        .workers_with_leases(&host)
        .await?
        .into_iter()
        .filter(|w| w.id != shared.worker_id && !is_alive(w))
        .map(|w| w.id)
        .collect();
    let now = shared.clock.now_ms();
    if !dead.is_empty() {
        let events = shared
            .store
            .reclaim(Reclaim::Workers(dead.clone()), now)
            .await?;
        tracing::warn!(workers = ?dead, tasks = events.len(), "took back the tasks of engines that died on this host");
    }
    let expired = shared.store.reclaim(Reclaim::Expired, now).await?;
    if !expired.is_empty() {
        tracing::warn!(tasks = expired.len(), "took back tasks whose lease expired");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_start_time() {
        let pid = std::process::id() as i64;
        let a = process_start(pid).expect("own /proc entry");
        assert_eq!(Some(a), process_start(pid));
        assert!(!is_alive(&WorkerInfo {
            id: "x".into(),
            host: host_name(),
            pid,
            pid_start: a + 1,
            started_at: 0,
        }));
    }
}
