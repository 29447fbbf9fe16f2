//! Parsing specs and files from JSON and YAML with errors that name the field.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::spec::{MAX_SPEC_BYTES, Schedule, TaskSpec};
use super::workflow::WorkflowSpec;
use crate::error::{Error, Result};

/// Largest accepted file for `task-queue run` and `submit`.
pub const MAX_FILE_BYTES: usize = 64 << 20;
/// Most tasks accepted in one file or batch.
pub const MAX_BATCH_TASKS: usize = 100_000;

/// A file of tasks: `{tasks: [spec, ...]}`, or a workflow when it has a
/// `name`: `{name, project, tags, description, schedule, idempotency_key, tasks}`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskFile {
    /// Makes the file a workflow with this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// The tasks to submit.
    pub tasks: Vec<TaskSpec>,
    /// The workflow's idempotency key: submitting the file again returns
    /// the first workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// What a file asks to submit.
#[derive(Debug, Clone, PartialEq)]
pub enum Submission {
    /// Independent tasks (they may still depend on each other by name).
    Tasks(Vec<TaskSpec>),
    /// A named workflow.
    Workflow(WorkflowSpec),
}

impl Submission {
    /// The task specs, whichever the form.
    pub fn tasks(&self) -> &[TaskSpec] {
        match self {
            Submission::Tasks(t) => t,
            Submission::Workflow(w) => &w.tasks,
        }
    }
}

/// Deserializes `T` from a JSON value; a failure names the path (`tasks[2].priority`).
pub fn from_value<T: DeserializeOwned>(v: Value) -> Result<T> {
    objects_where_expected(&v)?;
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        // A missing or unknown field is named by the message, not the path.
        let named = ["missing field `", "unknown field `"]
            .iter()
            .find_map(|p| message.strip_prefix(p))
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string);
        let field = match (path.as_str(), named) {
            (".", Some(f)) => f,
            (".", None) => "arguments".to_string(),
            (p, Some(f)) if p == f || p.ends_with(&format!(".{f}")) => p.to_string(),
            (p, Some(f)) => format!("{p}.{f}"),
            (p, None) => p.to_string(),
        };
        Error::InvalidInput { field, message }
    })
}

/// The fields of a task (and a workflow) whose value is an object. serde
/// reads an array as a struct's fields in declaration order (`retry: [5]`
/// would set `max_attempts`); these are refused instead.
const OBJECT_FIELDS: [&str; 5] = ["retry", "limits", "http", "health_check", "schedule"];

/// What kind of JSON value `v` is, for error messages ("an array").
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Refuses an array or a scalar where a task or a workflow has an object:
/// the fields above, at the top level and in each of `tasks`.
fn objects_where_expected(v: &Value) -> Result<()> {
    fn check(obj: &serde_json::Map<String, Value>, prefix: &str) -> Result<()> {
        for key in OBJECT_FIELDS {
            if let Some(x) = obj.get(key)
                && !(x.is_object() || x.is_null())
            {
                return Err(Error::invalid(
                    format!("{prefix}{key}"),
                    format!("expected an object, got {}", json_kind(x)),
                ));
            }
        }
        Ok(())
    }
    let Some(top) = v.as_object() else {
        return Ok(());
    };
    check(top, "")?;
    if let Some(Value::Array(tasks)) = top.get("tasks") {
        for (i, t) in tasks.iter().enumerate() {
            match t {
                Value::Object(t) => check(t, &format!("tasks[{i}]."))?,
                other => {
                    return Err(Error::invalid(
                        format!("tasks[{i}]"),
                        format!("expected a task (an object), got {}", json_kind(other)),
                    ));
                }
            }
        }
    }
    Ok(())
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
        let json = json_strict(text.as_bytes());
        let e = match json {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // YAML in flow style (`{tasks: [{name: a, command: make}]}`) starts
        // the same way, but its first key is not in double quotes as every
        // JSON key is. A file that is JSON in form keeps its JSON error:
        // read as YAML, a broken JSON file could silently mean something
        // else (a line break inside a string becomes a space). JSON's own
        // refusals (a key given twice, an integer wider than 64 bits) stand.
        use serde_json::error::Category;
        let after = trimmed[1..].trim_start();
        let json_form =
            trimmed.starts_with('[') || after.starts_with('"') || after.starts_with('}');
        if !json_form
            && matches!(e.classify(), Category::Syntax | Category::Eof)
            && let Ok(v) = read_yaml(text)
        {
            return Ok(v);
        }
        return Err(Error::invalid("file", format!("malformed JSON: {e}")));
    }
    read_yaml(text)
}

fn read_yaml(text: &str) -> Result<Value> {
    check_flow_depth(text)?;
    Strict::deserialize(serde_norway::Deserializer::from_str(text))
        .map(|v| v.0)
        .map_err(|e| Error::invalid("file", format!("malformed YAML: {e}")))
}

/// Parses JSON like `serde_json::from_slice`, except that a key given twice
/// in one object is an error instead of the last one silently winning, and
/// an integer wider than 64 bits is an error instead of silently becoming
/// a float that no longer holds it.
pub fn json_strict(bytes: &[u8]) -> std::result::Result<Value, serde_json::Error> {
    if let Err(msg) = no_wide_integers(bytes) {
        return Err(<serde_json::Error as serde::de::Error>::custom(msg));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let v = Strict::deserialize(&mut de)?;
    de.end()?;
    Ok(v.0)
}

/// Finds an integer literal outside the 64-bit range (serde_json would read
/// it as an `f64`, dropping digits): a number token outside strings with
/// no fraction or exponent that neither `i64` nor `u64` holds.
fn no_wide_integers(bytes: &[u8]) -> std::result::Result<(), String> {
    let (mut line, mut col) = (1usize, 0usize);
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        col += 1;
        if b == b'\n' {
            line += 1;
            col = 0;
        }
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if b == b'-' || b.is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
            {
                i += 1;
            }
            let token = &bytes[start..i];
            let integer = !token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
            if integer {
                let text = std::str::from_utf8(token).unwrap_or("");
                let digits = text.strip_prefix('-').unwrap_or(text);
                let well_formed = !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit());
                if well_formed && text.parse::<i64>().is_err() && text.parse::<u64>().is_err() {
                    let shown: String = text.chars().take(40).collect();
                    let more = if text.len() > 40 { "..." } else { "" };
                    return Err(format!(
                        "the integer {shown}{more} at line {line} column {col} does not fit in 64 bits; send it as a string"
                    ));
                }
            }
            col += i - start - 1;
            continue;
        }
        i += 1;
    }
    Ok(())
}

/// A JSON value read with duplicate keys refused.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> std::result::Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> std::result::Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> std::result::Result<Value, E> {
        // YAML has .nan and .inf; JSON has no such numbers.
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("{v} is not a number JSON can hold")))
    }
    fn visit_str<E>(self, v: &str) -> std::result::Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> std::result::Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_none<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_unit<E>(self) -> std::result::Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<Value, D::Error> {
        Strict::deserialize(d).map(|s| s.0)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> std::result::Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<Value>()? {
            let key = match key {
                Value::String(s) => s,
                // YAML keys may be numbers or booleans; JSON keys are text.
                Value::Number(n) => n.to_string(),
                Value::Bool(b) => b.to_string(),
                other => {
                    return Err(serde::de::Error::custom(format!(
                        "a key must be text, got {other}"
                    )));
                }
            };
            let Strict(v) = map.next_value()?;
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!(
                    "the key {key:?} is given twice in one object"
                )));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// Deepest nesting of YAML flow collections (`[...]`, `{...}`) accepted;
/// the parser's own recursion limit is about as deep.
const MAX_FLOW_DEPTH: usize = 128;

/// Refuses YAML whose flow collections nest deeper than the parser goes,
/// before parsing it: the parser only notices after a scan whose time
/// grows with the square of the depth (seconds for a few hundred KB).
/// Brackets inside quotes and comments do not count.
fn check_flow_depth(text: &str) -> Result<()> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut chars = text.chars().peekable();
    let mut prev = '\n';
    // The last character on this line that was not a space: a quote only
    // opens a quoted scalar where a scalar can start (after `:`, `-`, `?`,
    // `,`, `[`, `{`, or at the start of a line); `it's` or `x"` inside a
    // plain scalar is text.
    let mut last = '\n';
    while let Some(c) = chars.next() {
        let opens = matches!(last, '\n' | ':' | '-' | '?' | ',' | '[' | '{');
        if !c.is_whitespace() {
            last = c;
        }
        match c {
            '\n' => {
                line += 1;
                last = '\n';
            }
            '#' if prev.is_whitespace() => {
                // A comment runs to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        line += 1;
                        break;
                    }
                }
                prev = '\n';
                last = '\n';
                continue;
            }
            '"' if opens => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\n' => line += 1,
                        '\\' if !escaped => {
                            escaped = true;
                            continue;
                        }
                        '"' if !escaped => break,
                        _ => {}
                    }
                    escaped = false;
                }
            }
            '\'' if opens => {
                // Single-quoted: '' is a quote inside, and the loop sees it
                // as the end and a new start, which is the same.
                for c in chars.by_ref() {
                    match c {
                        '\n' => line += 1,
                        '\'' => break,
                        _ => {}
                    }
                }
            }
            '[' | '{' => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Err(Error::invalid(
                        "file",
                        format!(
                            "malformed YAML: collections nest deeper than {MAX_FLOW_DEPTH} levels (line {line})"
                        ),
                    ));
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = c;
    }
    Ok(())
}

/// Parses a task or workflow file's text; every task spec is validated on
/// its own (the dependency graph is checked at submit).
pub fn parse_task_file(text: &str) -> Result<Submission> {
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
    let Some(name) = file.name else {
        for (field, set) in [
            ("project", file.project.is_some()),
            ("tags", !file.tags.is_empty()),
            ("description", file.description.is_some()),
            ("schedule", file.schedule.is_some()),
            ("idempotency_key", file.idempotency_key.is_some()),
        ] {
            if set {
                return Err(Error::invalid(
                    field,
                    "belongs to a workflow; give the file a `name` to make it one",
                ));
            }
        }
        return Ok(Submission::Tasks(file.tasks));
    };
    let w = WorkflowSpec {
        name,
        project: file.project,
        tags: file.tags,
        description: file.description,
        schedule: file.schedule,
        tasks: file.tasks,
        idempotency_key: file.idempotency_key,
    };
    w.validate_header()?;
    Ok(Submission::Workflow(w))
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
    #[test]
    fn integers_wider_than_64_bits_are_refused() {
        for ok in [
            r#"{"a": 18446744073709551615, "b": -9223372036854775808}"#,
            r#"{"a": 1.5e300, "b": 123456789012345678901234.5, "c": "123456789012345678901234"}"#,
            r#"{"s": "a \" 99999999999999999999999 \\", "n": [0, -1, 2]}"#,
        ] {
            assert!(super::json_strict(ok.as_bytes()).is_ok(), "{ok}");
        }
        for (bad, at) in [
            (r#"{"big": 12345678901234567890123}"#, "line 1 column 9"),
            (
                "{\n  \"n\": [1,\n  -9223372036854775809]}",
                "line 3 column 3",
            ),
            (r#"{"u": 18446744073709551616}"#, "line 1 column 7"),
        ] {
            let e = super::json_strict(bad.as_bytes()).unwrap_err().to_string();
            assert!(e.contains("does not fit in 64 bits"), "{bad}: {e}");
            assert!(e.contains(at), "{bad}: {e}");
        }
    }

    /// A file that starts like JSON but is YAML in flow style (an unquoted
    /// first key) is read as YAML; a file that is JSON in form keeps its
    /// JSON error, and JSON's own refusals are not read past.
    #[test]
    fn yaml_in_flow_style_is_yaml() {
        let v = super::parse_document("{tasks: [{name: a, command: make}]}\n").unwrap();
        assert_eq!(v["tasks"][0]["name"], "a");
        for (bad, says) in [
            (r#"{"tasks": [}"#, "malformed JSON"),
            // JSON in form stays JSON: YAML would fold the line break.
            ("{\"a\": \"make build\n make test\"}", "malformed JSON"),
            (r#"{"a": 1,}"#, "malformed JSON"),
            ("[a, {b: 1}]", "malformed JSON"),
            (r#"{"a": 1, "a": 2}"#, "twice"),
            (r#"{"a": 123456789012345678901234}"#, "64 bits"),
        ] {
            let e = super::parse_document(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn arrays_are_not_read_as_objects() {
        use serde_json::json;
        for (v, field) in [
            (
                json!({"name": "r", "kind": "external", "retry": [5]}),
                "retry",
            ),
            (
                json!({"name": "l", "command": "true", "limits": [1]}),
                "limits",
            ),
            (json!({"name": "w", "tasks": [["x"]]}), "tasks[0]"),
            (
                json!({"name": "w", "tasks": [{"name": "a", "command": "true", "schedule": "x"}]}),
                "tasks[0].schedule",
            ),
        ] {
            match super::from_value::<serde_json::Value>(v.clone()) {
                Err(crate::error::Error::InvalidInput { field: f, message }) => {
                    assert_eq!(f, field, "{v}: {message}");
                    assert!(message.starts_with("expected"), "{message}");
                }
                other => panic!("{v}: {other:?}"),
            }
        }
        // Parameters are the user's own JSON: anything goes there.
        let ok = json!({"name": "p", "command": "true", "parameters": {"retry": [1, 2]}});
        assert!(super::from_value::<super::TaskSpec>(ok).is_ok());
    }

    #[test]
    fn a_key_given_twice_or_a_nan_is_refused() {
        for (text, want) in [
            (
                r#"{"tasks":[{"name":"a","name":"b","command":"echo"}]}"#,
                "given twice",
            ),
            (
                "tasks:\n  - name: a\n    name: b\n    command: echo\n",
                "name",
            ),
            (
                "tasks:\n  - name: a\n    command: echo\n    retry: {multiplier: .nan}\n",
                "NaN",
            ),
        ] {
            let e = super::parse_document(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let v =
            super::parse_document("tasks:\n  - {name: a, command: echo, env: {A: '1'}}\n").unwrap();
        assert_eq!(v["tasks"][0]["env"]["A"], "1");
        assert_eq!(
            super::json_strict(br#"{"a":[1,2.5,{"b":null}],"c":true}"#).unwrap(),
            serde_json::json!({"a":[1,2.5,{"b":null}],"c":true})
        );
    }
    #[test]
    fn deep_flow_collections_are_refused_before_parsing() {
        let deep = format!(
            "tasks:\n  - name: a\n    command: echo\n    parameters: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let t = std::time::Instant::now();
        let e = super::parse_document(&deep).unwrap_err().to_string();
        assert!(e.contains("nest deeper than 128 levels (line 4)"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
        // A quote inside a plain scalar opens nothing.
        let sneaky = format!(
            "a: x\"\nb: it's\nc: {}{}\n",
            "[".repeat(1000),
            "]".repeat(1000)
        );
        let e = super::parse_document(&sneaky).unwrap_err().to_string();
        assert!(e.contains("nest deeper than 128 levels (line 3)"), "{e}");
        // Brackets in quotes and comments are text; 128 levels are fine.
        let quoted = format!(
            "# {}\na: \"{}\"\nb: '{}'\nc: {}{}\n",
            "[".repeat(500),
            "{".repeat(500),
            "[".repeat(500),
            "[".repeat(128),
            "]".repeat(128)
        );
        let e = super::parse_document(&quoted);
        assert!(
            e.as_ref()
                .map_or_else(|e| !e.to_string().contains("nest deeper"), |_| true),
            "{e:?}"
        );
    }

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
    fn a_named_file_is_a_workflow() {
        let sub = parse_task_file(
            "name: ci\nproject: api\ntasks:\n  - {name: a, command: 'true'}\n  - {name: b, command: 'true', depends_on: [a]}\n",
        )
        .unwrap();
        let Submission::Workflow(w) = sub else {
            panic!("expected a workflow")
        };
        assert_eq!(w.name, "ci");
        assert_eq!(w.project.as_deref(), Some("api"));
        assert_eq!(w.tasks.len(), 2);
        let err =
            parse_task_file("project: api\ntasks:\n  - {name: a, command: 'true'}\n").unwrap_err();
        assert!(err.to_string().contains("project"), "{err}");
        assert!(err.to_string().contains("name"), "{err}");
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
