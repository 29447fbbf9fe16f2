//! One integration test binary: the real `task-queue` binary against real
//! SQLite files (and PostgreSQL, when `TASK_QUEUE_TEST_PG_URL` is set) and
//! real child processes, plus the library API.

mod common;

mod audit;
mod bad_input;
mod bench;
mod client;
mod conformance;
mod crash;
mod execution;
mod library;
mod mcp;
mod multinode;
mod orchestration;
mod rest;
mod sdk;
mod search;
mod workflows;
