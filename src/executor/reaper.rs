//! A guard process that kills task process groups when the engine dies.
//!
//! `PR_SET_PDEATHSIG` reaches only a task's direct child; the commands a
//! shell starts would survive a `kill -9` of the engine and could finish
//! behind a re-run's back. So at start the engine forks a small guard that
//! reads "track/untrack process group" records from a pipe. When the engine
//! dies, however it dies, the kernel closes the pipe, the guard reads EOF
//! and sends SIGKILL to every group still tracked.
//!
//! The guard is forked from a multi-threaded process, so after `fork` it
//! only makes async-signal-safe system calls and never allocates.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

const RECORD: usize = 5;
const MAX_GROUPS: usize = 16_384;

/// Handle to the guard process. Dropping it lets the guard exit.
#[derive(Debug)]
pub struct Reaper {
    pipe: Mutex<Option<OwnedFd>>,
    pid: libc::pid_t,
}

impl Reaper {
    /// Forks the guard.
    pub fn spawn() -> io::Result<Reaper> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds is a valid two-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        let devnull = c"/dev/null";
        // SAFETY: after fork the child runs only async-signal-safe calls
        // (close, open, dup2, setsid, signal, read, kill, _exit) on stack data.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            let e = io::Error::last_os_error();
            unsafe {
                libc::close(read_fd);
                libc::close(write_fd);
            }
            return Err(e);
        }
        if pid == 0 {
            unsafe { guard_main(read_fd, write_fd, devnull.as_ptr()) }
        }
        // SAFETY: read_fd is ours and no longer needed in the parent.
        unsafe { libc::close(read_fd) };
        Ok(Reaper {
            // SAFETY: write_fd is a fresh descriptor owned by nobody else.
            pipe: Mutex::new(Some(unsafe { OwnedFd::from_raw_fd(write_fd) })),
            pid,
        })
    }

    /// Starts guarding process group `pgid`.
    pub fn track(&self, pgid: i32) {
        self.send(b'+', pgid);
    }

    /// Stops guarding process group `pgid` (it has been cleaned up).
    pub fn untrack(&self, pgid: i32) {
        self.send(b'-', pgid);
    }

    fn send(&self, op: u8, pgid: i32) {
        let mut rec = [0u8; RECORD];
        rec[0] = op;
        rec[1..].copy_from_slice(&pgid.to_le_bytes());
        let guard = self.pipe.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = guard.as_ref() {
            // A 5-byte write to a pipe is atomic (< PIPE_BUF).
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::write(fd.as_raw_fd(), rec.as_ptr().cast(), RECORD) };
            if n != RECORD as isize {
                tracing::warn!(error = %io::Error::last_os_error(), "process guard is gone; task processes may outlive a crash");
            }
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        let fd = self.pipe.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(fd);
        let mut status = 0;
        // SAFETY: pid is our child; reaping it avoids a zombie.
        unsafe { libc::waitpid(self.pid, &mut status, 0) };
    }
}

/// The guard's whole life. Never returns.
unsafe fn guard_main(
    read_fd: libc::c_int,
    write_fd: libc::c_int,
    devnull: *const libc::c_char,
) -> ! {
    unsafe {
        libc::close(write_fd);
        // Own session: a Ctrl-C aimed at the engine's terminal must not kill
        // the guard before it can do its job.
        libc::setsid();
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
        let null = libc::open(devnull, libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::dup2(null, 2);
        }
        // Hold no descriptor of the engine's (sockets, database files).
        let keep = libc::dup2(read_fd, 3);
        if keep == 3 {
            libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        }
        let fd = if keep == 3 { 3 } else { read_fd };
        let mut groups = [0i32; MAX_GROUPS];
        let mut count = 0usize;
        let mut buf = [0u8; RECORD * 800];
        loop {
            let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            if n < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                break;
            }
            if n == 0 {
                break;
            }
            let n = n as usize;
            let mut off = 0;
            while off + RECORD <= n {
                let pgid =
                    i32::from_le_bytes([buf[off + 1], buf[off + 2], buf[off + 3], buf[off + 4]]);
                if buf[off] == b'+' {
                    if count < MAX_GROUPS {
                        groups[count] = pgid;
                        count += 1;
                    }
                } else {
                    let mut i = 0;
                    while i < count {
                        if groups[i] == pgid {
                            count -= 1;
                            groups[i] = groups[count];
                            break;
                        }
                        i += 1;
                    }
                }
                off += RECORD;
            }
        }
        let mut i = 0;
        while i < count {
            if groups[i] > 1 {
                libc::kill(-groups[i], libc::SIGKILL);
            }
            i += 1;
        }
        libc::_exit(0)
    }
}
