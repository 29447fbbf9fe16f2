//! The stdio transport, with an answer for every line a client sends.
//!
//! The MCP library reads one JSON-RPC message per line and silently skips
//! a line it cannot read: a client that sent malformed JSON, JSON nested
//! deeper than the parser goes, or a `tools/call` whose `arguments` is not
//! an object would wait for an answer that never comes. [`checked_stdio`]
//! sits between stdin/stdout and the library: it answers such lines itself
//! with the JSON-RPC error they call for (`-32700` parse error, `-32600`
//! invalid request, `-32602` invalid params) and passes every other line
//! through unchanged. The library's answers and these errors are written
//! to stdout whole lines at a time, never interleaved.

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, DuplexStream};
use tokio::sync::mpsc;

/// Room in each direction between the checker and the library.
const PIPE_BYTES: usize = 1 << 16;

/// A reader and a writer for the MCP library's `serve`, wired to this
/// process's stdin and stdout through the line checker.
pub fn checked_stdio() -> (DuplexStream, DuplexStream) {
    let (to_library, library_in) = tokio::io::duplex(PIPE_BYTES);
    let (library_out, from_library) = tokio::io::duplex(PIPE_BYTES);
    let (errors_tx, errors_rx) = mpsc::unbounded_channel();
    tokio::spawn(pump_in(tokio::io::stdin(), to_library, errors_tx));
    tokio::spawn(pump_out(from_library, errors_rx, tokio::io::stdout()));
    (library_in, library_out)
}

/// What to do with one line from the client.
#[derive(Debug, PartialEq)]
enum Line {
    /// Hand it to the library.
    Pass,
    /// Nothing to do (a blank line).
    Skip,
    /// Answer it with this error response.
    Answer(Value),
}

fn error(id: Value, code: i64, message: String) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

fn check(line: &[u8]) -> Line {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Line::Skip;
    }
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Line::Answer(error(Value::Null, -32700, format!("Parse error: {e}"))),
    };
    let Some(obj) = v.as_object() else {
        return Line::Answer(error(
            Value::Null,
            -32600,
            "Invalid Request: a JSON-RPC message is a JSON object".into(),
        ));
    };
    let Some(id) = obj.get("id").cloned() else {
        // A notification: nothing to answer.
        return Line::Pass;
    };
    if !["method", "result", "error"]
        .iter()
        .any(|k| obj.contains_key(*k))
    {
        return Line::Answer(error(
            id,
            -32600,
            "Invalid Request: a message with an `id` is a request (with a `method`) or a response (with a `result` or an `error`)".into(),
        ));
    }
    if obj.get("method").and_then(Value::as_str) != Some("tools/call") {
        return Line::Pass;
    }
    let params = obj.get("params");
    if !params
        .and_then(|p| p.get("name"))
        .is_some_and(Value::is_string)
    {
        return Line::Answer(error(
            id,
            -32602,
            "Invalid params: `name`, the tool to call, must be a string".into(),
        ));
    }
    if let Some(args) = params.and_then(|p| p.get("arguments"))
        && !(args.is_object() || args.is_null())
    {
        return Line::Answer(error(
            id,
            -32602,
            "Invalid params: `arguments` must be an object of the tool's arguments".into(),
        ));
    }
    // The arguments as the tools' own parsers would refuse them elsewhere
    // (REST bodies, task files): no key twice in one object, no integer
    // wider than 64 bits (which would silently become a float).
    if let Err(e) = crate::model::json_strict(line) {
        return Line::Answer(error(id, -32602, format!("Invalid params: {e}")));
    }
    Line::Pass
}

/// The JSON-RPC error a tool call or request in `body` gets before it
/// reaches the MCP library, if any: the checks of the stdio transport,
/// for the HTTP transports. Only answers that carry the request's `id`:
/// a body that does not parse is left to the library's own refusal.
pub(crate) fn refusal(body: &[u8]) -> Option<Value> {
    match check(body) {
        Line::Answer(v) if !v["id"].is_null() => Some(v),
        _ => None,
    }
}

async fn pump_in(
    input: impl AsyncRead + Unpin,
    mut to_library: DuplexStream,
    errors: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut input = BufReader::new(input);
    let mut line = Vec::new();
    loop {
        line.clear();
        match input.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let body = line.strip_suffix(b"\n").unwrap_or(&line);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        match check(body) {
            Line::Skip => {}
            Line::Answer(e) => {
                tracing::warn!(error = %e["error"]["message"], "answered an unreadable MCP message");
                let mut out = serde_json::to_vec(&e).unwrap_or_default();
                out.push(b'\n');
                if errors.send(out).is_err() {
                    break;
                }
            }
            Line::Pass => {
                if to_library.write_all(body).await.is_err()
                    || to_library.write_all(b"\n").await.is_err()
                {
                    break;
                }
            }
        }
    }
    // End of input: the library sees it and ends the session.
    let _ = to_library.shutdown().await;
}

async fn pump_out(
    from_library: DuplexStream,
    mut errors: mpsc::UnboundedReceiver<Vec<u8>>,
    mut output: impl AsyncWrite + Unpin,
) {
    let mut from_library = BufReader::new(from_library);
    let mut line = Vec::new();
    let mut errors_open = true;
    loop {
        // `read_until` may be cut short by the other branch after reading
        // part of an answer: the part stays in `line`, and the next turn
        // reads on from there. `line` is emptied only once written whole.
        tokio::select! {
            n = from_library.read_until(b'\n', &mut line) => match n {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    if output.write_all(&line).await.is_err() {
                        return;
                    }
                    line.clear();
                }
            },
            e = errors.recv(), if errors_open => match e {
                Some(e) => {
                    if output.write_all(&e).await.is_err() {
                        return;
                    }
                }
                None => errors_open = false,
            },
        }
        if output.flush().await.is_err() {
            return;
        }
    }
    // The library is done; write what it left unfinished, then answer
    // what is still queued.
    if !line.is_empty() {
        let _ = output.write_all(&line).await;
    }
    while let Ok(e) = errors.try_recv() {
        let _ = output.write_all(&e).await;
    }
    let _ = output.flush().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_answer_read_in_pieces_is_never_cut_by_an_error() {
        use tokio::io::AsyncReadExt;
        let (mut library, from_library) = tokio::io::duplex(1024);
        let (errors, errors_rx) = mpsc::unbounded_channel();
        let (output, mut client) = tokio::io::duplex(1 << 20);
        let pump = tokio::spawn(pump_out(from_library, errors_rx, output));
        let big = format!("{{\"id\":1,\"x\":\"{}\"}}\n", "y".repeat(200_000));
        let answer = tokio::spawn(async move {
            for chunk in big.as_bytes().chunks(1000) {
                library.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        for i in 0..50 {
            errors
                .send(format!("{{\"error\":{i}}}\n").into_bytes())
                .unwrap();
            tokio::task::yield_now().await;
        }
        drop(errors);
        answer.await.unwrap();
        pump.await.unwrap();
        let mut all = String::new();
        client.read_to_string(&mut all).await.unwrap();
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 51);
        for l in &lines {
            serde_json::from_str::<Value>(l)
                .unwrap_or_else(|e| panic!("{e}: {}", &l[..80.min(l.len())]));
        }
        assert!(lines.iter().any(|l| l.len() > 200_000));
    }

    #[test]
    fn lines_the_library_would_drop_are_answered() {
        let code = |l: &str| match check(l.as_bytes()) {
            Line::Answer(v) => (v["id"].clone(), v["error"]["code"].as_i64().unwrap()),
            other => panic!("{l}: {other:?}"),
        };
        assert_eq!(code("garbage"), (Value::Null, -32700));
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":2,"method":"#),
            (Value::Null, -32700)
        );
        let deep = format!(
            r#"{{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{{"name":"x","arguments":{{"a":{}1{}}}}}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        assert_eq!(code(&deep), (Value::Null, -32700));
        assert_eq!(code("[1, 2]"), (Value::Null, -32600));
        assert_eq!(
            code(
                r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"get_task","arguments":[1,2]}}"#
            ),
            (json!(4), -32602)
        );
        assert_eq!(code(r#"{"jsonrpc":"2.0","id":6}"#), (json!(6), -32600));
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"arguments":{}}}"#),
            (json!(7), -32602)
        );
        assert_eq!(
            code(r#"{"jsonrpc":"2.0","id":8,"method":"tools/call","params":{"name":1}}"#),
            (json!(8), -32602)
        );
        let twice = r#"{"jsonrpc":"2.0","id":9,"method":"tools/call","params":{"name":"get_task","arguments":{"id":"a","id":"b"}}}"#;
        assert_eq!(code(twice), (json!(9), -32602));
        let wide = r#"{"jsonrpc":"2.0","id":10,"method":"tools/call","params":{"name":"submit_task","arguments":{"name":"w","command":"true","priority":123456789012345678901234}}}"#;
        assert_eq!(code(wide), (json!(10), -32602));
        match check(twice.as_bytes()) {
            Line::Answer(v) => assert!(
                v["error"]["message"].as_str().unwrap().contains("twice"),
                "{v}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(refusal(twice.as_bytes()).unwrap()["id"], 9);
        assert_eq!(refusal(b"garbage"), None);
        assert_eq!(check(b"  "), Line::Skip);
        for ok in [
            r#"{"jsonrpc":"2.0","id":11,"result":{}}"#,
            r#"{"jsonrpc":"2.0","id":12,"method":"initialize","params":{"a":1,"a":2}}"#,
            r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"get_task","arguments":{"id":"x"}}}"#,
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            r#"{"jsonrpc":"2.0","method":"tools/call","params":{"arguments":"x"}}"#,
        ] {
            assert_eq!(check(ok.as_bytes()), Line::Pass, "{ok}");
        }
    }
}
