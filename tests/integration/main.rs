//! One integration test binary: the real `task-queue` binary against real
//! SQLite files and real child processes, plus the library API.

mod common;

mod audit;
mod bad_input;
mod client;
mod crash;
mod execution;
mod library;
mod mcp;
mod orchestration;
mod rest;
mod search;
mod workflows;
