//! Parsing specs and files from JSON and YAML with errors that name the field.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{MAX_SPEC_BYTES, TaskSpec};
use crate::error::{Error, Result};

/// Largest accepted file for `task-queue run` and `submit`.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Most tasks accepted in one file or batch.
pub const MAX_BATCH_TASKS: usize = 100_000;

/// A file of tasks: `{tasks: [spec, ...]}`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    /// The tasks to submit.
    pub tasks: Vec<TaskSpec>,
}

/// Deserializes `T` from a JSON value; a failure names the path (`tasks[2].priority`).
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { String::new() } else { path };
        Error::InvalidInput {
            field: if field.is_empty() {
                "spec".into()
            } else {
                field
            },
            message: e.into_inner().to_string(),
        }
    })
}

/// Reads JSON or YAML text (YAML is a superset; JSON is tried first for exact errors).
pub fn parse_document(text: &str) -> Result<Value> {
    if text.len() > MAX_FILE_BYTES {
        return Err(Error::invalid(
            "file",
            format!(
                "is {} bytes; at most {MAX_FILE_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        return serde_json::from_str(text)
            .map_err(|e| Error::invalid("file", format!("malformed JSON: {e}")));
    }
    let v: Value = serde_norway::from_str(text)
        .map_err(|e| Error::invalid("file", format!("malformed YAML: {e}")))?;
    Ok(v)
}

/// Parses a task file's text into validated specs.
pub fn parse_task_file(text: &str) -> Result<Vec<TaskSpec>> {
    let v = parse_document(text)?;
    if !v.is_object() {
        return Err(Error::invalid(
            "file",
            "expected a mapping with a `tasks` list, e.g. {tasks: [{name: build, command: make}]}",
        ));
    }
    if let Some(tasks) = v.get("tasks").and_then(Value::as_array)
        && tasks.len() > MAX_BATCH_TASKS
    {
        return Err(Error::invalid(
            "tasks",
            format!(
                "has {} tasks; at most {MAX_BATCH_TASKS} in one file",
                tasks.len()
            ),
        ));
    }
    let file: TaskFile = from_value(v)?;
    if file.tasks.is_empty() {
        return Err(Error::invalid("tasks", "must list at least one task"));
    }
    for (i, t) in file.tasks.iter().enumerate() {
        t.validate()
            .map_err(|e| e.in_field(&format!("tasks[{i}]")))?;
    }
    Ok(file.tasks)
}

/// Serializes `v` with object keys sorted at every level: the canonical form hashed for integrity.
pub fn canonical_json<T: Serialize>(v: &T) -> Result<String> {
    let value = serde_json::to_value(v).map_err(|e| Error::invalid("spec", e))?;
    let mut out = String::with_capacity(256);
    write_canonical(&value, &mut out);
    if out.len() > MAX_SPEC_BYTES {
        return Err(Error::invalid(
            "spec",
            format!(
                "is {} bytes as JSON; at most {MAX_SPEC_BYTES} are accepted",
                out.len()
            ),
        ));
    }
    Ok(out)
}

fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap_or_default());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_field_of_a_type_error() {
        let err = parse_task_file("tasks:\n  - name: a\n    command: 'true'\n    priority: high\n")
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("tasks[0].priority"), "{msg}");
    }

    #[test]
    fn rejects_unknown_fields() {
        let err = parse_task_file(r#"{"tasks":[{"name":"a","command":"true","colour":"red"}]}"#)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("colour"), "{msg}");
        assert!(msg.contains("tasks[0]"), "{msg}");
    }

    #[test]
    fn rejects_malformed_yaml() {
        let err = parse_task_file("tasks: [name: a\n  - : :").unwrap_err();
        assert!(err.to_string().contains("malformed YAML"), "{err}");
    }

    #[test]
    fn validation_errors_carry_the_task_index() {
        let err = parse_task_file(
            "tasks:\n  - {name: ok, command: 'true'}\n  - {name: 'bad name', command: 'true'}\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("tasks[1].name"), "{err}");
    }

    #[test]
    fn later_features_are_refused_not_ignored() {
        let err = parse_task_file("tasks:\n  - {name: b, command: 'true', depends_on: [a]}\n")
            .unwrap_err();
        assert_eq!(err.code(), "unsupported");
        assert!(err.to_string().contains("tasks[0].depends_on"), "{err}");
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let v: Value =
            serde_json::from_str(r#"{"b":1,"a":{"d":[1,{"z":0,"y":1}],"c":null}}"#).unwrap();
        assert_eq!(
            canonical_json(&v).unwrap(),
            r#"{"a":{"c":null,"d":[1,{"y":1,"z":0}]},"b":1}"#
        );
    }
}
