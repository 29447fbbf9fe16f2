//! The core error type and its stable code table.
//!
//! Every layer above the service (CLI, and later MCP and REST) maps these
//! variants once, at its edge. Internal detail (SQL text, OS errors) is kept
//! in the message for logs; the `code` is what clients branch on.

use std::fmt;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors returned by the service API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something malformed; `field` is a path such as
    /// `tasks[2].retry.max_attempts`.
    #[error("invalid {field}: {message}")]
    InvalidInput { field: String, message: String },

    /// A field that parses but whose behaviour is not available in this build.
    #[error("unsupported {field}: {message}")]
    Unsupported { field: String, message: String },

    /// No such object.
    #[error("{what} {id} not found")]
    NotFound { what: &'static str, id: String },

    /// The request conflicts with the object's current state.
    #[error("{0}")]
    Conflict(String),

    /// Stored data failed an integrity check (spec hash or audit chain).
    #[error("integrity error: {0}")]
    Integrity(String),

    /// The store failed (I/O, SQLite, lock timeout).
    #[error("storage error: {0}")]
    Store(String),

    /// The engine is shutting down and cannot accept the operation.
    #[error("the task queue is shutting down")]
    ShuttingDown,

    /// Configuration could not be loaded.
    #[error("configuration error: {0}")]
    Config(String),

    /// An operating-system error outside the store.
    #[error("{0}")]
    Io(#[from] std::io::Error),

    /// A server answered an HTTP client request with an error that has no
    /// variant of its own (401, 403, 413, 5xx), or could not be reached
    /// (`status` 0, code `unreachable`). `code` is the server's error code.
    #[error("{message} (HTTP {status}, {code})")]
    Remote {
        status: u16,
        code: String,
        message: String,
    },
}

impl Error {
    /// Stable machine-readable code for the variant.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidInput { .. } => "invalid_input",
            Error::Unsupported { .. } => "unsupported",
            Error::NotFound { .. } => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Integrity(_) => "integrity",
            Error::Store(_) => "storage",
            Error::ShuttingDown => "shutting_down",
            Error::Config(_) => "config",
            Error::Io(_) => "io",
            Error::Remote { .. } => "remote",
        }
    }

    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::InvalidInput {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Shorthand for [`Error::Unsupported`].
    pub fn unsupported(field: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Unsupported {
            field: field.into(),
            message: message.to_string(),
        }
    }

    /// Shorthand for a missing task.
    pub fn task_not_found(id: impl Into<String>) -> Self {
        Error::NotFound {
            what: "task",
            id: id.into(),
        }
    }

    /// Shorthand for a missing workflow.
    pub fn workflow_not_found(id: impl Into<String>) -> Self {
        Error::NotFound {
            what: "workflow",
            id: id.into(),
        }
    }

    /// Shorthand for a missing schedule.
    pub fn schedule_not_found(id: impl Into<String>) -> Self {
        Error::NotFound {
            what: "schedule",
            id: id.into(),
        }
    }

    /// The message without the field (for re-wrapping).
    pub fn message(&self) -> String {
        match self {
            Error::InvalidInput { message, .. } | Error::Unsupported { message, .. } => {
                message.clone()
            }
            other => other.to_string(),
        }
    }

    /// Prefixes the field path of an input error (e.g. with `tasks[3]`).
    pub fn in_field(self, prefix: &str) -> Self {
        match self {
            Error::InvalidInput { field, message } => Error::InvalidInput {
                field: join_field(prefix, &field),
                message,
            },
            Error::Unsupported { field, message } => Error::Unsupported {
                field: join_field(prefix, &field),
                message,
            },
            other => other,
        }
    }
}

fn join_field(prefix: &str, field: &str) -> String {
    if field.is_empty() || field == "." {
        prefix.to_string()
    } else if field.starts_with('[') {
        format!("{prefix}{field}")
    } else {
        format!("{prefix}.{field}")
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        // PostgreSQL's SQLSTATE (and constraint) stay in the text: the
        // PostgreSQL writer tells a lost race (retry) from a real failure by
        // them, whatever language the server reports in.
        if let Some(db) = e.as_database_error()
            && let Some(pg) = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        {
            return Error::Store(match pg.constraint() {
                Some(c) => format!("{e} (SQLSTATE {}, constraint {c})", pg.code()),
                None => format!("{e} (SQLSTATE {})", pg.code()),
            });
        }
        Error::Store(e.to_string())
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Store(format!("migration failed: {e}"))
    }
}
