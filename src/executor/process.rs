//! Running one command attempt: spawn in its own process group with
//! rlimits and a parent-death signal (see [`super::spawn`]), capture output
//! with a cap, enforce the timeout, and stop the whole group (TERM, grace,
//! KILL).

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

use super::reaper::Reaper;
use super::spawn::{self, Child, RawLimits, SpawnSpec};
use crate::model::Limits;

/// Why a running attempt is being stopped from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The task was cancelled.
    Cancelled,
    /// The lease was lost (expired, or the task was taken over).
    LeaseLost,
    /// The engine is shutting down and its grace period is over.
    Shutdown,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ProcessRequest {
    /// Program and arguments (`/bin/sh -c CMD` for shell commands).
    pub argv: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// The complete environment (the child inherits nothing else).
    pub env: Vec<(String, String)>,
    pub limits: Limits,
    pub timeout: Duration,
    pub kill_grace: Duration,
}

/// Captured output of one stream.
#[derive(Debug, Clone, Default)]
pub struct Captured {
    /// The stream's first bytes, up to the output cap.
    pub data: Vec<u8>,
    pub dropped_bytes: u64,
    /// The last bytes of what was dropped (up to two tails' worth), so the
    /// end of the stream is known even when the cap cut it off.
    dropped_end: Vec<u8>,
}

impl Captured {
    /// The last `n` bytes of the whole stream, dropped part included.
    pub fn last_bytes(&self, n: usize) -> Vec<u8> {
        let from_end = self.dropped_end.len().min(n);
        let from_data = (n - from_end).min(self.data.len());
        let mut out = Vec::with_capacity(from_data + from_end);
        out.extend_from_slice(&self.data[self.data.len() - from_data..]);
        out.extend_from_slice(&self.dropped_end[self.dropped_end.len() - from_end..]);
        out
    }
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited,
    TimedOut,
    Stopped(StopReason),
}

/// The outcome of running a process.
#[derive(Debug)]
pub struct ProcessOutcome {
    pub ending: Ending,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub duration: Duration,
    pub stdout: Captured,
    pub stderr: Captured,
}

/// Runs the request to completion. `Err` means it could not be started.
pub async fn run(
    req: &ProcessRequest,
    reaper: Option<&Reaper>,
    mut stop: watch::Receiver<Option<StopReason>>,
) -> std::io::Result<ProcessOutcome> {
    let started = Instant::now();
    let mut child = spawn::spawn(&SpawnSpec {
        argv: &req.argv,
        env: &req.env,
        cwd: req.cwd.as_deref(),
        limits: RawLimits::from(&req.limits),
    })?;
    let pgid = child.id();
    // Dropped before `child` (declared after it): if this future is dropped
    // or fails before the leader was reaped, the group is killed and the
    // guard forgets it; `child`'s drop then reaps the leader.
    let _tracked = Tracked::new(reaper, pgid);
    // Runs once the leader has exited, before it is reaped: its group id
    // cannot have been reused yet.
    let before_reap = |pgid: i32| {
        // Whatever the leader left behind in its group goes with it.
        kill_group(pgid, libc::SIGKILL);
        if let Some(r) = reaper {
            r.untrack(pgid);
        }
    };
    let cap = req.limits.max_output_bytes.map(|b| b.0).unwrap_or(10 << 20) as usize;
    let out = tokio::spawn(capture(child.stdout.take(), cap));
    let err = tokio::spawn(capture(child.stderr.take(), cap));

    // The exit first: an exit ready in the same poll as the deadline ran
    // to its end.
    let (ending, status) = tokio::select! {
        biased;
        s = child.wait(&before_reap) => (Ending::Exited, s?),
        _ = tokio::time::sleep(req.timeout) => {
            end_for(Ending::TimedOut, &mut child, req.kill_grace, &before_reap).await?
        }
        reason = wait_stop(&mut stop) => {
            end_for(Ending::Stopped(reason), &mut child, req.kill_grace, &before_reap).await?
        }
    };
    let duration = started.elapsed();
    // A process that escaped the group could hold the pipes open; don't wait forever.
    let stdout = tokio::time::timeout(Duration::from_secs(2), out)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let stderr = tokio::time::timeout(Duration::from_secs(2), err)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    Ok(ProcessOutcome {
        ending,
        exit_code: status.code(),
        signal: status.signal(),
        duration,
        stdout,
        stderr,
    })
}

/// Resolves with the first stop reason sent; never, once the sender is gone.
pub(super) async fn wait_stop(stop: &mut watch::Receiver<Option<StopReason>>) -> StopReason {
    loop {
        if let Some(r) = *stop.borrow_and_update() {
            return r;
        }
        if stop.changed().await.is_err() {
            // Sender gone: nobody can stop us any more.
            std::future::pending::<()>().await;
        }
    }
}

/// Ends the process for `why` (its deadline, or a stop), unless it has
/// already exited by itself: it then ended as `Exited`, with its own
/// status, and no signal is sent. Otherwise a process that exited just as
/// its deadline came would be recorded as timed out with exit code 0.
async fn end_for(
    why: Ending,
    child: &mut Child,
    grace: Duration,
    before_reap: &(dyn Fn(i32) + Sync),
) -> std::io::Result<(Ending, std::process::ExitStatus)> {
    if child.has_exited()? {
        return Ok((Ending::Exited, child.wait(before_reap).await?));
    }
    let pgid = child.id();
    Ok((why, terminate(child, pgid, grace, before_reap).await?))
}

async fn terminate(
    child: &mut Child,
    pgid: i32,
    grace: Duration,
    before_reap: &(dyn Fn(i32) + Sync),
) -> std::io::Result<std::process::ExitStatus> {
    kill_group(pgid, libc::SIGTERM);
    match tokio::time::timeout(grace, child.wait(before_reap)).await {
        Ok(s) => s,
        Err(_) => {
            kill_group(pgid, libc::SIGKILL);
            child.wait(before_reap).await
        }
    }
}

/// A process group the crash guard watches, forgotten when this is dropped.
struct Tracked<'a> {
    reaper: Option<&'a Reaper>,
    pgid: i32,
}

impl<'a> Tracked<'a> {
    fn new(reaper: Option<&'a Reaper>, pgid: i32) -> Self {
        if let Some(r) = reaper {
            r.track(pgid);
        }
        Tracked { reaper, pgid }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        // Still tracked means `before_reap` did not run, so the leader is
        // not reaped and the group id is still ours.
        if let Some(r) = self.reaper
            && r.untrack(self.pgid)
        {
            kill_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Signals a whole process group; a group that is already gone is fine.
pub fn kill_group(pgid: i32, sig: libc::c_int) {
    if pgid > 1 {
        // SAFETY: plain syscall; negative pid addresses the group.
        unsafe { libc::kill(-pgid, sig) };
    }
}

async fn capture(stream: Option<impl AsyncRead + Unpin>, cap: usize) -> Captured {
    let mut c = Captured::default();
    let Some(mut s) = stream else { return c };
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(c.data.len());
                let keep = n.min(room);
                c.data.extend_from_slice(&buf[..keep]);
                c.dropped_bytes += (n - keep) as u64;
                if keep < n {
                    c.dropped_end.extend_from_slice(&buf[keep..n]);
                    if c.dropped_end.len() > 2 * super::TAIL_BYTES {
                        let cut = c.dropped_end.len() - super::TAIL_BYTES;
                        c.dropped_end.drain(..cut);
                    }
                }
            }
        }
    }
    c
}

impl From<&Limits> for RawLimits {
    fn from(l: &Limits) -> Self {
        RawLimits {
            cpu: l.cpu_seconds,
            mem: l.memory_bytes.map(|b| b.0),
            nproc: l.max_processes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start(script: &str) -> Child {
        let argv = vec!["/bin/sh".to_string(), "-c".to_string(), script.to_string()];
        spawn::spawn(&SpawnSpec {
            argv: &argv,
            env: &[],
            cwd: None,
            limits: RawLimits::default(),
        })
        .unwrap()
    }

    /// A process whose exit is there when its deadline comes ran to its
    /// end: it is not signalled and keeps its own status. One still
    /// running is ended for the deadline.
    #[tokio::test]
    async fn a_process_that_exited_at_its_deadline_ran_to_its_end() {
        let mut done = start("exit 0");
        while !done.has_exited().unwrap() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (ending, status) =
            end_for(Ending::TimedOut, &mut done, Duration::from_secs(1), &|_| {})
                .await
                .unwrap();
        assert!(matches!(ending, Ending::Exited), "{ending:?}");
        assert_eq!(status.code(), Some(0));

        let mut running = start("exec /bin/sleep 5");
        let (ending, status) = end_for(
            Ending::TimedOut,
            &mut running,
            Duration::from_secs(1),
            &|_| {},
        )
        .await
        .unwrap();
        assert!(matches!(ending, Ending::TimedOut), "{ending:?}");
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
