//! Starting a task's process without copying the engine's page tables.
//!
//! A task's process needs set-up steps that `posix_spawn` cannot express:
//! its own process group, a parent-death signal, a check that the engine did
//! not die before that signal was armed, and rlimits. std's `Command` runs
//! such steps through a `pre_exec` hook and has to `fork` for it, which
//! copies the page tables of the whole engine on every spawn (the spawn loop
//! of `bench command` loses about half its rate to that alone).
//!
//! This module does what glibc's `posix_spawn` does inside: `clone` with
//! `CLONE_VM | CLONE_VFORK`, so the child runs on a small stack of its own in
//! the engine's memory while the calling thread waits, makes its set-up
//! system calls and `execve`s. Everything the child touches is prepared
//! before the clone; the child allocates nothing, takes no lock and calls
//! only async-signal-safe functions. All signals are blocked around the
//! clone, and the child resets caught signals to their defaults before it
//! unblocks them, so no handler of the engine runs on the child's side.
//!
//! The exit is observed through a pidfd (Linux 5.3+) registered with tokio;
//! on older kernels a blocking thread waits instead.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that started the child ends,
//! not the process: spawn from the runtime's worker threads (which live as
//! long as the engine), never from `spawn_blocking` threads, which end
//! when idle.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

/// rlimit values applied in the child.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawLimits {
    pub cpu: Option<u64>,
    pub mem: Option<u64>,
    pub nproc: Option<u64>,
}

impl RawLimits {
    /// Only `setrlimit`: safe to call in the child.
    fn apply(&self) -> Result<(), i32> {
        fn set(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> Result<(), i32> {
            let lim = libc::rlimit {
                rlim_cur: soft as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: valid pointer to a stack value.
            if unsafe { libc::setrlimit(resource, &lim) } != 0 {
                return Err(errno_raw());
            }
            Ok(())
        }
        if let Some(cpu) = self.cpu {
            // Soft limit sends SIGXCPU; the hard limit a second later SIGKILL.
            set(libc::RLIMIT_CPU, cpu, cpu.saturating_add(1))?;
        }
        if let Some(mem) = self.mem {
            set(libc::RLIMIT_AS, mem, mem)?;
        }
        if let Some(n) = self.nproc {
            set(libc::RLIMIT_NPROC, n, n)?;
        }
        Ok(())
    }
}

impl RawLimits {
    /// The limits over what this process may set (its own hard limits;
    /// raising one needs `CAP_SYS_RESOURCE`): (field, asked, hard limit).
    /// `cpu_seconds` counts as over when its hard limit, set one second
    /// above it, would be.
    pub fn over_hard_limits(&self) -> Vec<(&'static str, u64, u64)> {
        fn hard(resource: libc::__rlimit_resource_t) -> Option<u64> {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: valid pointer to a stack value.
            if unsafe { libc::getrlimit(resource, &mut lim) } != 0
                || lim.rlim_max == libc::RLIM_INFINITY
            {
                return None;
            }
            Some(lim.rlim_max)
        }
        // (field, resource, asked, the hard limit `apply` sets for it)
        let asked = [
            (
                "limits.cpu_seconds",
                libc::RLIMIT_CPU,
                self.cpu,
                self.cpu.map(|c| c.saturating_add(1)),
            ),
            ("limits.memory_bytes", libc::RLIMIT_AS, self.mem, self.mem),
            (
                "limits.max_processes",
                libc::RLIMIT_NPROC,
                self.nproc,
                self.nproc,
            ),
        ];
        asked
            .into_iter()
            .filter_map(|(field, resource, asked, sets)| {
                let hard = hard(resource)?;
                (sets? > hard).then_some((field, asked?, hard))
            })
            .collect()
    }
}

/// What to start.
pub struct SpawnSpec<'a> {
    pub argv: &'a [String],
    /// The complete environment.
    pub env: &'a [(String, String)],
    pub cwd: Option<&'a Path>,
    pub limits: RawLimits,
}

/// A started process: leader of its own process group, stdin on
/// `/dev/null`, stdout and stderr on pipes. Dropping it before it was
/// waited for kills it and reaps it in the background.
#[derive(Debug)]
pub struct Child {
    pid: libc::pid_t,
    exit: Exit,
    status: Option<ExitStatus>,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

#[derive(Debug)]
enum Exit {
    /// Readable once the process has exited.
    PidFd(AsyncFd<OwnedFd>),
    /// No pidfd (kernel before 5.3): a blocking thread waits for the exit
    /// (without reaping) and says so.
    Thread(Option<tokio::sync::oneshot::Receiver<()>>),
}

impl Child {
    /// The process id, which is also its process group id.
    pub fn id(&self) -> i32 {
        self.pid
    }

    /// Whether the process has exited (it may not be reaped yet).
    pub fn has_exited(&self) -> io::Result<bool> {
        match self.status {
            Some(_) => Ok(true),
            None => exited(self.pid),
        }
    }

    /// Waits for the exit, calls `before_reap` with the process group id
    /// while the exited leader still holds it (so the id cannot have been
    /// reused: signals sent to the group there reach only what the task
    /// left behind), then reaps the leader. Cancel-safe: dropping the
    /// future loses nothing.
    pub async fn wait(&mut self, before_reap: &(dyn Fn(i32) + Sync)) -> io::Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        match &mut self.exit {
            Exit::PidFd(fd) => loop {
                let mut guard = fd.readable().await?;
                if exited(self.pid)? {
                    break;
                }
                guard.clear_ready();
            },
            Exit::Thread(rx) => {
                if let Some(r) = rx.as_mut() {
                    r.await
                        .map_err(|_| io::Error::other("the waiting thread ended early"))?;
                    rx.take();
                }
            }
        }
        before_reap(self.pid);
        // It has exited: this returns at once.
        let status = blocking_reap(self.pid);
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // SAFETY: plain syscall; the leader is not reaped, so its group id
        // cannot have been reused.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
        // Reaped on a thread of its own: this may run while the runtime
        // shuts down, when a spawned task would never be polled.
        let pid = self.pid;
        let reaper = std::thread::Builder::new()
            .name("task-reap".into())
            .spawn(move || blocking_reap(pid));
        if reaper.is_err() {
            tracing::warn!(pid, "cannot start a thread to reap a killed task process");
        }
    }
}

/// Whether the process has exited, without reaping it.
fn exited(pid: libc::pid_t) -> io::Result<bool> {
    wait_exit(pid, libc::WNOHANG)
}

/// Blocks until the process has exited, without reaping it.
fn blocking_exited(pid: libc::pid_t) {
    let _ = wait_exit(pid, 0);
}

/// `waitid` for the exit with `WNOWAIT` (the process stays reapable) and
/// `flags`; true once it has exited.
fn wait_exit(pid: libc::pid_t, flags: libc::c_int) -> io::Result<bool> {
    loop {
        // SAFETY: a zeroed siginfo_t is valid to fill in.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a stack value.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | flags,
            )
        };
        if r == 0 {
            // SAFETY: filled in by waitid (si_pid stays 0 while it runs).
            return Ok(unsafe { info.si_pid() } != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn blocking_reap(pid: libc::pid_t) -> ExitStatus {
    let mut status = 0;
    // SAFETY: valid pointer to a stack value.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    ExitStatus::from_raw(status)
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn cstring(s: &[u8], what: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} contains a NUL byte"),
        )
    })
}

/// The program to `execve`: `argv[0]` itself when it holds a `/`, else
/// the first executable match on the child's `PATH` (`/bin:/usr/bin`
/// without one), as `execvp` searches after the child's `chdir`.
fn resolve(program: &str, env: &[(String, String)], cwd: Option<&Path>) -> io::Result<CString> {
    if program.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "the program name is empty",
        ));
    }
    if program.contains('/') {
        return cstring(program.as_bytes(), "the program");
    }
    let path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/bin:/usr/bin");
    let mut denied = false;
    for dir in path.split(':') {
        let dir = Path::new(if dir.is_empty() { "." } else { dir });
        // The child changes directory before it execs: a relative entry
        // means a directory under the task's working directory.
        let candidate = match cwd {
            Some(cwd) if dir.is_relative() => cwd.join(dir).join(program),
            _ => dir.join(program),
        };
        let c = cstring(candidate.as_os_str().as_bytes(), "the program or PATH")?;
        // SAFETY: valid C string.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 {
            if candidate.is_file() {
                return Ok(c);
            }
        } else if errno() == libc::EACCES {
            denied = true;
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// Everything the child needs, prepared before the clone.
struct ChildArgs {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    /// `/bin/sh PATH ARGS...`, run when the program is not an executable
    /// format (a script without `#!`), as `execvp` does.
    sh_argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    stdin: libc::c_int,
    stdout: libc::c_int,
    stderr: libc::c_int,
    parent: libc::pid_t,
    limits: RawLimits,
    /// Set by the child when a step fails; read after the clone returns.
    error: libc::c_int,
}

const CHILD_STACK: usize = 64 * 1024;

/// Starts the process. Errors are the ones `execve` and the set-up steps
/// give (`NotFound` for a missing program or working directory).
pub fn spawn(spec: &SpawnSpec<'_>) -> io::Result<Child> {
    let Some(program) = spec.argv.first() else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "argv is empty"));
    };
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other(
            "starting a task's process needs a tokio runtime",
        ));
    }
    let path = resolve(program, spec.env, spec.cwd)?;
    let argv_c = spec
        .argv
        .iter()
        .map(|a| cstring(a.as_bytes(), "an argument"))
        .collect::<io::Result<Vec<_>>>()?;
    let env_c = spec
        .env
        .iter()
        .map(|(k, v)| cstring(format!("{k}={v}").as_bytes(), "the environment"))
        .collect::<io::Result<Vec<_>>>()?;
    let cwd_c = spec
        .cwd
        .map(|c| cstring(OsStr::as_bytes(c.as_os_str()), "the working directory"))
        .transpose()?;
    let mut argv_p: Vec<*const libc::c_char> = argv_c.iter().map(|c| c.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut sh_argv_p: Vec<*const libc::c_char> = vec![c"/bin/sh".as_ptr(), path.as_ptr()];
    sh_argv_p.extend(argv_c.iter().skip(1).map(|c| c.as_ptr()));
    sh_argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = env_c.iter().map(|c| c.as_ptr()).collect();
    envp_p.push(std::ptr::null());

    let devnull = devnull()?;
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;

    // SAFETY: a zeroed sigset_t is a valid value to fill in.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers.
    unsafe { libc::sigfillset(&mut all) };
    let mut args = ChildArgs {
        path: path.as_ptr(),
        argv: argv_p.as_ptr(),
        sh_argv: sh_argv_p.as_ptr(),
        envp: envp_p.as_ptr(),
        cwd: cwd_c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr()),
        stdin: devnull.as_raw_fd(),
        stdout: out_w.as_raw_fd(),
        stderr: err_w.as_raw_fd(),
        parent: std::process::id() as libc::pid_t,
        limits: spec.limits,
        error: 0,
    };
    // The child's stack; nothing here reads it, so it is left uninitialised.
    let mut stack: Vec<u8> = Vec::with_capacity(CHILD_STACK);
    // The stack grows down: hand over its 16-byte aligned top.
    let top = {
        let end = stack.as_mut_ptr() as usize + CHILD_STACK;
        (end & !15) as *mut libc::c_void
    };
    // SAFETY: blocking signals on this thread; restored right after.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    // SAFETY: CLONE_VM | CLONE_VFORK suspends this thread until the child
    // has exec'd or exited, so `args`, `stack` and every pointer in `args`
    // stay valid for as long as the child uses them. The child only makes
    // async-signal-safe calls (see `child_main`).
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &mut args as *mut ChildArgs as *mut libc::c_void,
        )
    };
    let clone_err = errno();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    drop((out_w, err_w));
    if pid < 0 {
        return Err(io::Error::from_raw_os_error(clone_err));
    }
    // The child has exec'd or exited: `error` is final.
    // SAFETY: the child is done with `args`; read through a volatile load so
    // the compiler does not assume its value from before the clone.
    let child_error = unsafe { std::ptr::read_volatile(&args.error) };
    if child_error != 0 {
        blocking_reap(pid);
        return Err(io::Error::from_raw_os_error(child_error));
    }
    let pidfd = pidfd_open(pid).ok();
    // SAFETY: an OwnedFd stays open and keeps its number while the AsyncFd
    // owns it; registering needs a runtime, checked at the top.
    let exit =
        match pidfd.map(|fd| unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }) {
            Some(Ok(fd)) => Exit::PidFd(fd),
            _ => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                std::thread::Builder::new()
                    .name("task-wait".into())
                    .spawn(move || {
                        blocking_exited(pid);
                        let _ = tx.send(());
                    })
                    .inspect_err(|_| {
                        // SAFETY: our unreaped child.
                        unsafe { libc::kill(-pid, libc::SIGKILL) };
                        blocking_reap(pid);
                    })?;
                Exit::Thread(Some(rx))
            }
        };
    // From here on, dropping `child` kills and reaps the process.
    let mut child = Child {
        pid,
        exit,
        status: None,
        stdout: None,
        stderr: None,
    };
    child.stdout = Some(pipe::Receiver::from_owned_fd(out_r)?);
    child.stderr = Some(pipe::Receiver::from_owned_fd(err_r)?);
    Ok(child)
}

fn pidfd_open(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `/dev/null` for the children's stdin, opened once (close-on-exec).
fn devnull() -> io::Result<&'static OwnedFd> {
    static FD: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(fd) = FD.get() {
        return Ok(fd);
    }
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // Another thread may have won the race; its descriptor is kept, ours closed.
    Ok(FD.get_or_init(|| fd))
}

/// A pipe, both ends close-on-exec: (read, write).
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: fds is a valid two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The child's side. Runs on its own stack in the engine's memory while the
/// parent thread waits: only async-signal-safe system calls, no allocation,
/// no locks, no unwinding. A failed step records its errno and exits 127.
extern "C" fn child_main(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points to the parent's `ChildArgs`, alive until we exec
    // or exit; all pointers in it were prepared for this call.
    unsafe {
        let a = &mut *(arg as *mut ChildArgs);
        unsafe fn fail(a: &mut ChildArgs, e: i32) -> ! {
            // SAFETY: `a` is the parent's live `ChildArgs`.
            unsafe {
                std::ptr::write_volatile(&mut a.error, if e == 0 { libc::EIO } else { e });
                libc::_exit(127)
            }
        }
        // No handler of the engine may run here: reset every caught signal
        // (the table is the child's own copy) before unblocking.
        for sig in 1..=libc::SIGRTMAX() {
            if sig == libc::SIGKILL || sig == libc::SIGSTOP {
                continue;
            }
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                continue;
            }
            // SIGPIPE is ignored by Rust programs; the command gets the default.
            if old.sa_sigaction != libc::SIG_DFL
                && (old.sa_sigaction != libc::SIG_IGN || sig == libc::SIGPIPE)
            {
                let mut dfl: libc::sigaction = std::mem::zeroed();
                dfl.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        if libc::setpgid(0, 0) != 0 {
            fail(a, errno_raw());
        }
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        );
        // The engine may have died before the parent-death signal was armed.
        if libc::getppid() != a.parent {
            libc::_exit(137);
        }
        if let Err(e) = a.limits.apply() {
            fail(a, e);
        }
        for (src, dst) in [
            (a.stdin, libc::STDIN_FILENO),
            (a.stdout, libc::STDOUT_FILENO),
            (a.stderr, libc::STDERR_FILENO),
        ] {
            if src == dst {
                // dup2 onto itself keeps close-on-exec: clear it.
                if libc::fcntl(src, libc::F_SETFD, 0) != 0 {
                    fail(a, errno_raw());
                }
            } else if libc::dup2(src, dst) < 0 {
                fail(a, errno_raw());
            }
        }
        if !a.cwd.is_null() && libc::chdir(a.cwd) != 0 {
            fail(a, errno_raw());
        }
        // The command starts with an empty signal mask, as std's Command
        // gives it.
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::execve(a.path, a.argv, a.envp);
        if errno_raw() == libc::ENOEXEC {
            libc::execve(c"/bin/sh".as_ptr(), a.sh_argv, a.envp);
        }
        fail(a, errno_raw())
    }
}

/// errno without going through `io::Error` (no allocation either way, but
/// this is the smallest path).
fn errno_raw() -> i32 {
    // SAFETY: reads this thread's errno slot.
    unsafe { *libc::__errno_location() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn spec<'a>(argv: &'a [String], env: &'a [(String, String)]) -> SpawnSpec<'a> {
        SpawnSpec {
            argv,
            env,
            cwd: None,
            limits: RawLimits::default(),
        }
    }

    async fn read_all(stream: Option<pipe::Receiver>) -> String {
        let mut s = String::new();
        stream.unwrap().read_to_string(&mut s).await.unwrap();
        s
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn runs_a_command_with_its_env_and_own_group() {
        let argv = strings(&[
            "/bin/sh",
            "-c",
            "echo out=$FOO; echo err >&2; ps -o pgid= -p $$ | tr -d ' '; exit 3",
        ]);
        let env = vec![
            ("FOO".to_string(), "bar".to_string()),
            ("PATH".to_string(), "/usr/bin:/bin".to_string()),
        ];
        let mut child = spawn(&spec(&argv, &env)).unwrap();
        let pid = child.id();
        let out = read_all(child.stdout.take()).await;
        let err = read_all(child.stderr.take()).await;
        let status = child.wait(&|_| {}).await.unwrap();
        assert_eq!(status.code(), Some(3));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "out=bar");
        assert_eq!(lines[1], pid.to_string(), "leader of its own group");
        assert_eq!(err, "err\n");
    }

    #[tokio::test]
    async fn missing_program_and_cwd_are_not_found() {
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let argv = strings(&["no-such-program-here"]);
        let e = spawn(&spec(&argv, &env)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let argv = strings(&["/no/such/program"]);
        let e = spawn(&spec(&argv, &env)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        let argv = strings(&["true"]);
        let mut s = spec(&argv, &env);
        let missing = Path::new("/no/such/dir");
        s.cwd = Some(missing);
        let e = spawn(&s).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn limits_apply_and_signals_start_default() {
        let argv = strings(&[
            "/bin/sh",
            "-c",
            "ulimit -t; grep -E '^(SigBlk|SigIgn)' /proc/self/status",
        ]);
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let mut s = spec(&argv, &env);
        s.limits.cpu = Some(7);
        let mut child = spawn(&s).unwrap();
        let out = read_all(child.stdout.take()).await;
        assert!(child.wait(&|_| {}).await.unwrap().success());
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "7");
        assert!(lines[1].ends_with("0000000000000000"), "{out}");
        // SIGPIPE (bit 13) is not ignored.
        let ign = u64::from_str_radix(lines[2].split_whitespace().nth(1).unwrap(), 16).unwrap();
        assert_eq!(ign & (1 << (libc::SIGPIPE - 1)), 0, "{out}");
    }

    #[tokio::test]
    async fn scripts_without_shebang_and_relative_path_entries_work_as_with_execvp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let script = dir.path().join("bin/hello");
        std::fs::write(&script, "echo hello from $0 $1\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        let argv = strings(&["hello", "there"]);
        // `bin` is relative: it names a directory under the task's cwd.
        let env = vec![("PATH".to_string(), "bin:/usr/bin:/bin".to_string())];
        let mut s = spec(&argv, &env);
        s.cwd = Some(dir.path());
        // Another test's child started between our write and its exec
        // holds a copy of the write descriptor for a moment, and exec of a
        // file open for writing fails with ETXTBSY: try again briefly.
        let mut tries = 0;
        let mut child = loop {
            match spawn(&s) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                r => break r.unwrap(),
            }
        };
        let out = read_all(child.stdout.take()).await;
        assert!(child.wait(&|_| {}).await.unwrap().success());
        assert_eq!(
            out,
            format!("hello from {} there\n", script.display()),
            "run by /bin/sh with its arguments"
        );
    }

    #[tokio::test]
    async fn before_reap_sees_the_group_while_the_leader_is_unreaped() {
        // The leader exits at once; its grandchild lives on in the group.
        let argv = strings(&["/bin/sh", "-c", "sleep 30 & exit 0"]);
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let mut child = spawn(&spec(&argv, &env)).unwrap();
        let pid = child.id();
        let seen = std::sync::Mutex::new(None);
        let status = child
            .wait(&|pgid| {
                // The leader is a zombie, not yet reaped.
                let stat = std::fs::read_to_string(format!("/proc/{pgid}/stat")).unwrap();
                *seen.lock().unwrap() = Some(stat.contains(") Z "));
                // SAFETY: plain syscall on our group.
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            })
            .await
            .unwrap();
        assert!(status.success());
        assert_eq!(*seen.lock().unwrap(), Some(true));
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "reaped after");
    }

    #[tokio::test]
    async fn dropping_an_unwaited_child_kills_and_reaps_it() {
        let argv = strings(&["sleep", "30"]);
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let child = spawn(&spec(&argv, &env)).unwrap();
        let pid = child.id();
        drop(child);
        for _ in 0..200 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("process {pid} is still there (or a zombie)");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_spawns() {
        let env = vec![("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let mut handles = Vec::new();
        for _ in 0..8 {
            let env = env.clone();
            handles.push(tokio::spawn(async move {
                let argv = strings(&["true"]);
                for _ in 0..50 {
                    let mut c = spawn(&spec(&argv, &env)).unwrap();
                    assert!(c.wait(&|_| {}).await.unwrap().success());
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    }
}
