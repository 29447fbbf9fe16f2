//! Where a task goes after an attempt: the retry decision.

use crate::executor::AttemptReport;
use crate::model::{AttemptStatus, RetryPolicy, TaskStatus};
use crate::store::Next;

/// Decides the task's next state from how the attempt ended.
///
/// * success → `succeeded`; a cancelled attempt → `cancelled`;
/// * a retryable failure with attempts left → `retrying` after the
///   policy's backoff (exponential, capped, jittered);
/// * an attempt cut short by a graceful shutdown → `retrying` at once;
/// * otherwise `timed_out` (if the last attempt timed out) or `failed`.
pub fn next_state(
    report: &AttemptReport,
    attempt: u32,
    policy: &RetryPolicy,
    now: i64,
    shutdown: bool,
) -> Next {
    match report.status {
        AttemptStatus::Succeeded => Next::Done(TaskStatus::Succeeded),
        AttemptStatus::Cancelled => Next::Done(TaskStatus::Cancelled),
        AttemptStatus::Lost if shutdown => Next::Retry { run_at: now },
        _ if report.retryable && attempt < policy.max_attempts() => {
            let delay = policy.delay_after(attempt, &mut rand::rng());
            Next::Retry {
                run_at: now + delay.as_millis() as i64,
            }
        }
        AttemptStatus::TimedOut => Next::Done(TaskStatus::TimedOut),
        _ => Next::Done(TaskStatus::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Dur, TaskResult};

    fn report(status: AttemptStatus, retryable: bool) -> AttemptReport {
        AttemptReport {
            status,
            error: None,
            retryable,
            result: TaskResult::default(),
            logs: vec![],
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: Some(4),
            initial_delay: Some(Dur::from_secs(1)),
            max_delay: Some(Dur::from_secs(5)),
            multiplier: Some(2.0),
            jitter: Some(0.0),
        }
    }

    #[test]
    fn backoff_grows_and_caps() {
        let p = policy();
        let r = report(AttemptStatus::Failed, true);
        assert_eq!(
            next_state(&r, 1, &p, 0, false),
            Next::Retry { run_at: 1000 }
        );
        assert_eq!(
            next_state(&r, 2, &p, 0, false),
            Next::Retry { run_at: 2000 }
        );
        assert_eq!(
            next_state(&r, 3, &p, 0, false),
            Next::Retry { run_at: 4000 }
        );
        assert_eq!(
            next_state(&r, 4, &p, 0, false),
            Next::Done(TaskStatus::Failed)
        );
        let mut rng = rand::rng();
        assert_eq!(p.delay_after(10, &mut rng).as_secs(), 5);
    }

    #[test]
    fn jitter_stays_in_bounds() {
        let mut p = policy();
        p.jitter = Some(0.5);
        let mut rng = rand::rng();
        for _ in 0..1000 {
            let d = p.delay_after(1, &mut rng).as_millis();
            assert!((500..=1500).contains(&d), "{d}");
        }
    }

    #[test]
    fn fatal_and_timeouts() {
        let p = policy();
        assert_eq!(
            next_state(&report(AttemptStatus::Failed, false), 1, &p, 0, false),
            Next::Done(TaskStatus::Failed)
        );
        assert_eq!(
            next_state(&report(AttemptStatus::TimedOut, true), 4, &p, 0, false),
            Next::Done(TaskStatus::TimedOut)
        );
        assert_eq!(
            next_state(&report(AttemptStatus::Lost, true), 4, &p, 7, true),
            Next::Retry { run_at: 7 }
        );
    }
}
