//! Property tests of the two inputs `lb` takes from outside: the
//! configuration file (`lb::config::parse`) and the control socket's
//! request line (`lb::api::read_request`). Whatever the bytes, neither
//! panics; a refused configuration names a field (and a line when it has
//! one) and says what is wrong; a refused request gets an error message
//! the daemon sends back as the response's `error`.
//!
//! These stand in for cargo-fuzz targets (which need nightly and
//! libFuzzer): a few thousand cases each, deterministic per proptest's
//! seed, quick enough for every `cargo test`.
#![expect(
    clippy::unwrap_used,
    reason = "test helpers fail loudly, like the tests"
)]

use lb::{
    api::{self, Request, Response},
    config,
};
use proptest::prelude::*;
use tokio::{io::AsyncWriteExt as _, net::UnixStream};

/// The shipped example: every field in use.
const EXAMPLE: &str = include_str!("../../examples/lb.toml");
/// The smallest valid file.
const MINIMAL: &str = r#"
[settings]
interfaces = ["eth0"]

[[service]]
name = "web"
vip = "198.18.1.1"
port = 80
protocol = "tcp"

[[service.backend]]
address = "198.18.0.11"
"#;

/// Cases per property: enough to reach odd corners, few enough for `cargo test`.
const CASES: u32 = 3_000;
/// Longest arbitrary input.
const MAX_INPUT: usize = 512;

/// Values a mutation puts after a `key =`: wrong types, out-of-range
/// numbers, bad addresses and durations, unterminated strings.
const VALUES: &[&str] = &[
    "\"\"",
    "0",
    "-1",
    "4294967296",
    "1e400",
    "\"x\"",
    "[]",
    "[[]]",
    "{}",
    "true",
    "\"198.18.1\"",
    "\"::\"",
    "\"224.0.0.1\"",
    "\"2001:2::1\"",
    "\"0s\"",
    "\"99999999999h\"",
    "\"soon\"",
    "\"/\"",
    "\"a b\"",
    "\"\u{e9}\u{1f600}\"",
    "\"unterminated",
    "'''",
    "nan",
    "",
];

/// One edit of a valid file's lines.
#[derive(Clone, Debug)]
enum Edit {
    /// Remove a line.
    Delete(usize),
    /// Repeat a line (duplicate keys, tables, services).
    Duplicate(usize),
    /// Swap two lines (keys move between tables).
    Swap(usize, usize),
    /// Replace the value of a `key = value` line.
    Value(usize, usize),
    /// Insert text at a character of a line.
    Insert(usize, usize, String),
    /// Cut the file at a character.
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let any_index = any::<usize>();
    prop_oneof![
        any_index.prop_map(Edit::Delete),
        any_index.prop_map(Edit::Duplicate),
        (any_index, any_index).prop_map(|(a, b)| Edit::Swap(a, b)),
        (any_index, 0..VALUES.len()).prop_map(|(a, v)| Edit::Value(a, v)),
        (
            any_index,
            any_index,
            "[\\[\\]=\"'#\n.,{} a-z0-9\u{0}-\u{1f}\u{e9}]{0,8}"
        )
            .prop_map(|(a, b, s)| Edit::Insert(a, b, s)),
        any_index.prop_map(Edit::Truncate),
    ]
}

/// `text` with `edits` made, each index taken modulo what it indexes.
fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for e in edits {
        if lines.is_empty() {
            break;
        }
        let n = lines.len();
        match e {
            Edit::Delete(i) => {
                lines.remove(i % n);
            }
            Edit::Duplicate(i) => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Edit::Swap(a, b) => lines.swap(a % n, b % n),
            Edit::Value(i, v) => {
                let line = &mut lines[i % n];
                if let Some((key, _)) = line.split_once('=') {
                    *line = format!("{key}= {}", VALUES[*v]);
                }
            }
            Edit::Insert(i, at, s) => {
                let line = &mut lines[i % n];
                let mut chars: Vec<char> = line.chars().collect();
                let at = at % (chars.len() + 1);
                chars.splice(at..at, s.chars());
                *line = chars.into_iter().collect();
            }
            Edit::Truncate(at) => {
                let joined = lines.join("\n");
                let chars: Vec<char> = joined.chars().collect();
                let cut: String = chars[..at % (chars.len() + 1)].iter().collect();
                lines = cut.lines().map(str::to_owned).collect();
            }
        }
    }
    lines.join("\n")
}

/// Whether an error's field names a field of the file: `file` for what the
/// TOML parser refuses (syntax, types, unknown keys), a table (`fleet`,
/// `announce`: one missing a required field) or a dotted path under
/// `settings`, `fleet`, `announce` or `service[...]` for what validation
/// refuses.
fn names_a_field(field: &str) -> bool {
    field == "file"
        || ["settings", "fleet", "announce"]
            .iter()
            .any(|t| field == *t || field.starts_with(&format!("{t}.")))
        || field.starts_with("service[")
}

/// `parse` does not panic, and a refusal is well formed.
fn check_config(text: &str) -> Result<(), TestCaseError> {
    let Err(errors) = config::parse(text) else {
        return Ok(());
    };
    prop_assert!(!errors.0.is_empty(), "refused without a reason");
    let lines = text.matches('\n').count() + 1;
    for e in &errors.0 {
        prop_assert!(names_a_field(&e.field), "no field named: {e}");
        prop_assert!(!e.message.trim().is_empty(), "no message: {e}");
        if let Some(line) = e.line {
            prop_assert!((1..=lines).contains(&line), "line {line} of {lines}: {e}");
        }
    }
    prop_assert!(!errors.to_string().trim().is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn config_parse_survives_arbitrary_text(text in "\\PC{0,512}") {
        check_config(&text)?;
    }

    #[test]
    fn config_parse_survives_toml_shaped_text(
        text in "((\\[\\[?(settings|service|service\\.backend|service\\.health|x)\\]\\]?|\
                 [a-z_]{1,16} ?= ?(\"[^\"\n]{0,16}\"|-?[0-9]{1,11}|\\[\\]|true|\"[0-9]{1,3}(\\.[0-9]{1,3}){0,3}\"))\n){0,16}"
    ) {
        check_config(&text)?;
    }

    #[test]
    fn config_parse_survives_mutated_valid_files(
        example in any::<bool>(),
        edits in proptest::collection::vec(edit(), 1..5),
    ) {
        let base = if example { EXAMPLE } else { MINIMAL };
        check_config(&apply(base, &edits))?;
    }
}

/// Valid request lines: what the CLI sends. Each must decode.
const VALID_REQUESTS: &[&str] = &[
    r#"{"command":"status"}"#,
    r#"{"command":"services"}"#,
    r#"{"command":"backends","service":"web"}"#,
    r#"{"command":"backends","service":null}"#,
    r#"{"command":"stats"}"#,
    r#"{"command":"health"}"#,
    r#"{"command":"set-weight","service":"web","backend":"198.18.0.11","weight":3}"#,
    r#"{"command":"set-admin","service":"web","backend":"2001:2::21","admin":"drain"}"#,
    r#"{"command":"apply","config":"[settings]\ninterfaces = [\"eth0\"]\n","dry_run":true}"#,
    r#"{"command":"explain","service":"web","client":"198.18.2.7","port":40000}"#,
];

/// Feeds `bytes` to `read_request` through a socket pair, as a client
/// would, and returns its answer.
async fn decode(bytes: &[u8]) -> anyhow::Result<Request> {
    let (mut daemon, mut client) = UnixStream::pair()?;
    // Small inputs fit the socket buffer: write, close, then read.
    client.write_all(bytes).await?;
    drop(client);
    api::read_request(&mut daemon).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// `read_request` does not panic; a refusal carries a message, which the
/// daemon sends back as the response's error; a request it accepts
/// survives a round trip (it is one the CLI could have sent).
fn check_request(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> Result<(), TestCaseError> {
    match rt.block_on(decode(bytes)) {
        Ok(request) => {
            let text = serde_json::to_string(&request).unwrap();
            prop_assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), request);
        }
        Err(e) => {
            let message = format!("{e:#}");
            prop_assert!(!message.trim().is_empty());
            // What the daemon answers (daemon::serve_connection).
            let response = Response {
                error: Some(message),
                data: Default::default(),
            };
            let wire = serde_json::to_string(&response).unwrap();
            let back: Response = serde_json::from_str(&wire).unwrap();
            prop_assert!(back.error.is_some_and(|m| !m.is_empty()));
        }
    }
    Ok(())
}

/// One edit of a valid request line's bytes.
fn mutate(line: &[u8], at: usize, edit: u8, byte: u8) -> Vec<u8> {
    let mut v = line.to_vec();
    let i = at % (v.len() + 1);
    match edit % 4 {
        0 => v.truncate(i),
        1 if i < v.len() => v[i] = byte,
        2 => v.insert(i, byte),
        _ if i < v.len() => {
            v.remove(i);
        }
        _ => v.push(byte),
    }
    v
}

#[test]
fn valid_requests_decode() {
    let rt = runtime();
    for line in VALID_REQUESTS {
        let with_newline = format!("{line}\n");
        assert!(
            rt.block_on(decode(with_newline.as_bytes())).is_ok(),
            "{line}"
        );
    }
}

#[test]
fn an_oversized_request_is_refused() {
    let rt = runtime();
    let result = rt.block_on(async {
        let (mut daemon, mut client) = UnixStream::pair().unwrap();
        // Larger than the socket buffer: write while the daemon reads.
        let writer = tokio::spawn(async move {
            let chunk = vec![b' '; 64 * 1024];
            let mut sent = 0;
            while sent <= api::MAX_REQUEST {
                if client.write_all(&chunk).await.is_err() {
                    break;
                }
                sent += chunk.len() as u64;
            }
        });
        let result = api::read_request(&mut daemon).await;
        drop(daemon);
        writer.await.unwrap();
        result
    });
    let message = format!("{:#}", result.unwrap_err());
    assert!(message.contains("larger than"), "{message}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn request_decoder_survives_arbitrary_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..MAX_INPUT),
        newline in any::<bool>(),
    ) {
        let rt = runtime();
        let mut bytes = bytes;
        if newline {
            bytes.push(b'\n');
        }
        check_request(&rt, &bytes)?;
    }

    #[test]
    fn request_decoder_survives_mutated_requests(
        which in 0..VALID_REQUESTS.len(),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..4),
        newline in any::<bool>(),
    ) {
        let rt = runtime();
        let mut bytes = VALID_REQUESTS[which].as_bytes().to_vec();
        for (at, edit, byte) in edits {
            bytes = mutate(&bytes, at, edit, byte);
        }
        if newline {
            bytes.push(b'\n');
        }
        check_request(&rt, &bytes)?;
    }

    #[test]
    fn request_decoder_survives_json_of_any_shape(
        command in prop_oneof![
            Just("status".to_string()),
            Just("set-weight".to_string()),
            Just("set-admin".to_string()),
            Just("apply".to_string()),
            Just("explain".to_string()),
            Just("edit".to_string()),
            "[a-z-]{0,12}",
        ],
        fields in proptest::collection::btree_map(
            "[a-z_]{1,10}",
            prop_oneof![
                Just(serde_json::Value::Null),
                any::<bool>().prop_map(serde_json::Value::from),
                any::<i64>().prop_map(serde_json::Value::from),
                any::<f64>().prop_map(serde_json::Value::from),
                "\\PC{0,16}".prop_map(serde_json::Value::from),
                Just(serde_json::json!([1, "x", null])),
                Just(serde_json::json!({"nested": {"deeper": []}})),
            ],
            0..6,
        ),
    ) {
        let rt = runtime();
        let mut object: serde_json::Map<String, serde_json::Value> = fields.into_iter().collect();
        object.insert("command".into(), command.into());
        let mut line = serde_json::to_vec(&object).unwrap();
        line.push(b'\n');
        check_request(&rt, &line)?;
    }
}
