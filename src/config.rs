//! Configuration: a YAML file (`--config`), then CLI flags on top.
//!
//! Every section rejects unknown keys so a typo is a start-up error that
//! names the key, not a silently ignored setting.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::{ByteSize, Dur, Limits, RetryPolicy};

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub storage: StorageConfig,
    pub execution: ExecutionConfig,
}

/// How commits reach the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `synchronous=FULL`: a submit that returned survives power loss.
    #[default]
    Durable,
    /// `synchronous=NORMAL`: survives a crash of the process, may lose the
    /// last commits on power loss.
    Fast,
}

/// `storage:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// SQLite database file.
    pub path: PathBuf,
    pub durability: Durability,
    /// Days finished tasks are kept.
    pub retention_days: u32,
    /// Readers in the read pool.
    pub read_connections: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            path: PathBuf::from("./data/task-queue.db"),
            durability: Durability::Durable,
            retention_days: 30,
            read_connections: 4,
        }
    }
}

/// `execution:` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Tasks this process runs at once.
    pub max_concurrent_tasks: usize,
    /// Timeout of a task that sets none.
    pub default_timeout: Dur,
    /// Retry policy fields a task leaves unset.
    pub default_retry: RetryPolicy,
    /// Limits a task leaves unset.
    pub default_limits: Limits,
    /// How long a claim is valid without renewal; a crashed worker's tasks
    /// are re-run after this.
    pub lease_duration: Dur,
    /// Between SIGTERM and SIGKILL when stopping a task.
    pub kill_grace: Dur,
    /// How often an idle engine looks for work submitted by other processes.
    pub poll_interval: Dur,
    /// Server environment variables passed to tasks.
    pub env_allowlist: Vec<String>,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            max_concurrent_tasks: 10,
            default_timeout: Dur::from_secs(3600),
            default_retry: RetryPolicy::standard(),
            default_limits: Limits {
                max_output_bytes: Some(ByteSize(10 << 20)),
                ..Limits::default()
            },
            lease_duration: Dur::from_secs(30),
            kill_grace: Dur::from_secs(5),
            poll_interval: Dur::from_millis(250),
            env_allowlist: ["PATH", "HOME", "LANG", "TERM"].map(String::from).to_vec(),
        }
    }
}

impl Config {
    /// Loads a YAML file; unknown keys and bad values name the key.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        Self::from_yaml(&text).map_err(|e| match e {
            Error::InvalidInput { field, message } => {
                Error::Config(format!("{}: {field}: {message}", path.display()))
            }
            other => other,
        })
    }

    /// Parses configuration text (YAML or JSON).
    pub fn from_yaml(text: &str) -> Result<Config> {
        let v = if text.trim().is_empty() {
            serde_json::json!({})
        } else {
            crate::model::parse_document(text)?
        };
        let cfg: Config = crate::model::from_value(v)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges the types cannot express.
    pub fn validate(&self) -> Result<()> {
        let e = &self.execution;
        if e.max_concurrent_tasks == 0 || e.max_concurrent_tasks > 100_000 {
            return Err(Error::invalid(
                "execution.max_concurrent_tasks",
                format!(
                    "must be between 1 and 100000, got {}",
                    e.max_concurrent_tasks
                ),
            ));
        }
        if e.lease_duration.0 < std::time::Duration::from_millis(500) {
            return Err(Error::invalid(
                "execution.lease_duration",
                "must be at least 500ms",
            ));
        }
        if e.poll_interval.0.is_zero() {
            return Err(Error::invalid(
                "execution.poll_interval",
                "must be positive",
            ));
        }
        if self.storage.read_connections == 0 {
            return Err(Error::invalid(
                "storage.read_connections",
                "must be at least 1",
            ));
        }
        let probe = crate::model::TaskSpec::new("config-check")
            .with_command("true")
            .with_retry(e.default_retry.clone())
            .with_limits(e.default_limits.clone());
        probe.validate().map_err(|err| match err {
            Error::InvalidInput { field, message } => Error::invalid(
                format!(
                    "execution.{}",
                    field
                        .replace("retry.", "default_retry.")
                        .replace("limits.", "default_limits.")
                ),
                message,
            ),
            other => other,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_is_the_default() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.execution.max_concurrent_tasks, 10);
        assert_eq!(c.storage.durability, Durability::Durable);
    }

    #[test]
    fn the_example_config_is_valid_and_matches_the_defaults() {
        let c = Config::from_yaml(include_str!("../config.example.yml")).unwrap();
        let d = Config::default();
        assert_eq!(
            serde_json::to_value(&c).unwrap(),
            serde_json::to_value(&d).unwrap()
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_yaml("execution:\n  max_concurent_tasks: 4\n").unwrap_err();
        assert!(err.to_string().contains("max_concurent_tasks"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let err = Config::from_yaml("storage:\n  durability: sometimes\n").unwrap_err();
        assert!(err.to_string().contains("storage.durability"), "{err}");
        let err =
            Config::from_yaml("execution:\n  default_retry: {max_attempts: 0}\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("execution.default_retry.max_attempts"),
            "{err}"
        );
    }
}
