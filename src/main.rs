//! The `task-queue` binary: parse the command line and hand over to the library.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = task_queue::cli::Cli::parse();
    if args.default_sigpipe() {
        // SAFETY: restores the default action before any thread starts.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    task_queue::cli::init_tracing(&args);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    let code = runtime.block_on(task_queue::cli::main(args));
    // A read of stdin can still be blocked on a thread of the runtime (the
    // MCP stdio transport's, after a signal ended the server): it must not
    // keep the process alive once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
