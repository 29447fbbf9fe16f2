//! A guard process that kills task process groups when the engine dies.
//!
//! `PR_SET_PDEATHSIG` reaches only a task's direct child; the commands a
//! shell starts would survive a `kill -9` of the engine and could finish
//! behind a re-run's back. So at start the engine forks a small guard. The
//! two share a table of running process groups in shared memory, and a pipe
//! whose write end only the engine holds. The engine enters and clears
//! groups in the table with plain atomic stores (no system call, no
//! wake-up of the guard per task); the guard sleeps in `read` on the pipe.
//! When the engine dies, however it dies, the kernel closes the pipe, the
//! guard reads EOF and sends SIGKILL to every group still in the table.
//!
//! The guard is forked from a multi-threaded process, so after `fork` it
//! only makes async-signal-safe system calls and never allocates.

use std::collections::HashMap;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};

/// Slots in the shared table: more groups than this at once are not guarded
/// (a warning says so).
const MAX_GROUPS: usize = 16_384;
const TABLE_BYTES: usize = MAX_GROUPS * std::mem::size_of::<AtomicI32>();

/// Handle to the guard process. Dropping it lets the guard exit.
#[derive(Debug)]
pub struct Reaper {
    table: Table,
    slots: Mutex<Slots>,
    pipe: Mutex<Option<OwnedFd>>,
    pid: libc::pid_t,
}

/// The shared mapping: `MAX_GROUPS` process group ids, 0 for a free slot.
#[derive(Debug)]
struct Table(*mut AtomicI32);

// SAFETY: the mapping lives as long as the Reaper and is only accessed
// through atomics.
unsafe impl Send for Table {}
unsafe impl Sync for Table {}

impl Table {
    fn slot(&self, i: usize) -> &AtomicI32 {
        assert!(i < MAX_GROUPS);
        // SAFETY: `i` is in bounds of the mapping, which outlives `self`.
        unsafe { &*self.0.add(i) }
    }
}

/// The engine's side of the table: which slot holds which group.
#[derive(Debug, Default)]
struct Slots {
    used: HashMap<i32, usize>,
    free: Vec<usize>,
    next: usize,
    warned: bool,
}

impl Reaper {
    /// Maps the table and forks the guard.
    pub fn spawn() -> io::Result<Reaper> {
        // SAFETY: a fresh anonymous shared mapping; zero-filled by the kernel.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                TABLE_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let table = Table(map.cast());
        let unmap = || {
            // SAFETY: the mapping made above, no longer used.
            unsafe { libc::munmap(map, TABLE_BYTES) };
        };
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds is a valid two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            let e = io::Error::last_os_error();
            unmap();
            return Err(e);
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let devnull = c"/dev/null";
        // SAFETY: after fork the child runs only async-signal-safe calls
        // (close, open, dup2, setsid, signal, read, kill, _exit) and reads
        // the shared table.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = io::Error::last_os_error();
            unsafe {
                libc::close(read_fd);
                libc::close(write_fd);
            }
            unmap();
            return Err(e);
        }
        if pid == 0 {
            unsafe { guard_main(read_fd, write_fd, devnull.as_ptr(), table.0) }
        }
        // SAFETY: read_fd is ours and no longer needed in the parent.
        unsafe { libc::close(read_fd) };
        Ok(Reaper {
            table,
            slots: Mutex::new(Slots::default()),
            // SAFETY: write_fd is a fresh descriptor owned by nobody else.
            pipe: Mutex::new(Some(unsafe { OwnedFd::from_raw_fd(write_fd) })),
            pid,
        })
    }

    /// Starts guarding process group `pgid`.
    pub fn track(&self, pgid: i32) {
        if pgid <= 1 {
            return;
        }
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if s.used.contains_key(&pgid) {
            return;
        }
        let slot = match s.free.pop() {
            Some(i) => i,
            None if s.next < MAX_GROUPS => {
                s.next += 1;
                s.next - 1
            }
            None => {
                if !s.warned {
                    s.warned = true;
                    tracing::warn!(
                        limit = MAX_GROUPS,
                        "more running task processes than the guard can track; the extra ones may outlive a crash of the engine"
                    );
                }
                return;
            }
        };
        self.table.slot(slot).store(pgid, Ordering::SeqCst);
        s.used.insert(pgid, slot);
    }

    /// Stops guarding process group `pgid` (it has been cleaned up);
    /// whether it was guarded.
    pub fn untrack(&self, pgid: i32) -> bool {
        let mut s = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match s.used.remove(&pgid) {
            Some(slot) => {
                self.table.slot(slot).store(0, Ordering::SeqCst);
                s.free.push(slot);
                true
            }
            None => false,
        }
    }

    /// The process groups being guarded now.
    pub fn tracked(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .used
            .len()
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let fd = self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(fd);
        let mut status = 0;
        // SAFETY: pid is our child; reaping it avoids a zombie. Once it is
        // gone nobody reads the table, so it can be unmapped.
        unsafe {
            libc::waitpid(self.pid, &mut status, 0);
            libc::munmap(self.table.0.cast(), TABLE_BYTES);
        }
    }
}

/// The guard's whole life. Never returns.
unsafe fn guard_main(
    read_fd: libc::c_int,
    write_fd: libc::c_int,
    devnull: *const libc::c_char,
    table: *mut AtomicI32,
) -> ! {
    unsafe {
        libc::close(write_fd);
        // Own session: a Ctrl-C aimed at the engine's terminal must not kill
        // the guard before it can do its job.
        libc::setsid();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        // The pipe may have got a number from 0 to 2 if the engine started
        // with those closed: move it above them before they are replaced.
        let high = libc::fcntl(read_fd, libc::F_DUPFD, 3);
        let read_fd = if high >= 0 { high } else { read_fd };
        let null = libc::open(devnull, libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
        }
        // Hold no descriptor of the engine's (sockets, database files).
        let keep = if read_fd == 3 {
            3
        } else {
            libc::dup2(read_fd, 3)
        };
        if keep == 3 {
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        }
        let fd = if keep == 3 { 3 } else { read_fd };
        // Nothing is ever written: read returns at EOF, when the engine is gone.
        let mut buf = [0u8; 64];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            if n <= 0 {
                break;
            }
        }
        let mut i = 0;
        while i < MAX_GROUPS {
            let pgid = (*table.add(i)).load(Ordering::SeqCst);
            if pgid > 1 {
                libc::kill(-pgid, libc::SIGKILL);
            }
            i += 1;
        }
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn alive(pid: i32) -> bool {
        // A zombie counts as gone.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
    }

    #[test]
    fn slots_are_reused_and_untracked_groups_are_spared() {
        let r = Reaper::spawn().unwrap();
        for pgid in 100..200 {
            r.track(pgid);
        }
        for pgid in 100..200 {
            assert!(r.untrack(pgid));
        }
        assert!(!r.untrack(100), "already forgotten");
        assert_eq!(r.tracked(), 0);
        r.track(300);
        assert_eq!(r.tracked(), 1);
        let s = r.slots.lock().unwrap();
        assert_eq!(s.next, 100, "freed slots are used again");
    }

    #[test]
    fn the_guard_kills_tracked_groups_when_the_engine_side_goes() {
        let spawn_group = |secs: &str| {
            let mut c = std::process::Command::new("sleep");
            c.arg(secs);
            std::os::unix::process::CommandExt::process_group(&mut c, 0);
            c.spawn().unwrap()
        };
        let mut tracked = spawn_group("30");
        let mut spared = spawn_group("30");
        let r = Reaper::spawn().unwrap();
        r.track(tracked.id() as i32);
        r.track(spared.id() as i32);
        r.untrack(spared.id() as i32);
        // Dropping closes the pipe, exactly as the engine's death would.
        drop(r);
        let t = tracked.id() as i32;
        let mut gone = false;
        for _ in 0..200 {
            if tracked.try_wait().unwrap().is_some() || !alive(t) {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(gone, "the tracked group is still running");
        assert!(
            spared.try_wait().unwrap().is_none(),
            "the untracked group was killed"
        );
        spared.kill().unwrap();
        spared.wait().unwrap();
    }
}
