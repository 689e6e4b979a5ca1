//! `kv_transfer_params` decoding is unchanged: the parser as it was before it read fields
//! one by one (kept here verbatim as the oracle) and the current one (`KvParams::parse_json`,
//! `KvParams::transfer_id`, `ReqParams::from_json`, `ReqParams::from_fields`) agree on every
//! input: the same variant, or the same typed error with the same message.
#![allow(clippy::all)]
use kvbridge_core::error::ParamsError;
use kvbridge_core::params::{valid_host, Field, KvParams, PushPrefill, RemotePrefill, ReqParams, MAX_TRANSFER_ID};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Map, Value};

/// The parser before this change, verbatim (only `Self` spelled out).
mod old {
    use super::*;

    fn type_name(v: &Value) -> String {
        match v {
            Value::Null => "null".into(),
            Value::Bool(b) => format!("boolean {b}"),
            Value::Number(n) => format!("number {n}"),
            Value::String(s) => format!("string {s:?}"),
            Value::Array(_) => "a list".into(),
            Value::Object(_) => "an object".into(),
        }
    }

    fn flag(m: &Map<String, Value>, field: &'static str) -> Result<bool, ParamsError> {
        match m.get(field) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ParamsError::WrongType { field, expected: "a boolean", got: type_name(v) }),
        }
    }

    fn req<'a>(m: &'a Map<String, Value>, field: &'static str) -> Result<&'a Value, ParamsError> {
        match m.get(field) {
            None | Some(Value::Null) => Err(ParamsError::MissingField(field)),
            Some(v) => Ok(v),
        }
    }

    fn string(m: &Map<String, Value>, field: &'static str) -> Result<String, ParamsError> {
        match req(m, field)? {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            Value::String(_) => Err(ParamsError::WrongType { field, expected: "a non-empty string", got: "\"\"".into() }),
            v => Err(ParamsError::WrongType { field, expected: "a string", got: type_name(v) }),
        }
    }

    fn uint(v: &Value, field: &'static str, max: u64) -> Result<u64, ParamsError> {
        match v.as_u64() {
            Some(n) if n <= max => Ok(n),
            _ => Err(ParamsError::WrongType { field, expected: "a non-negative integer in range", got: type_name(v) }),
        }
    }

    /// Block ids as a flat list, or vLLM's newer per-KV-cache-group list of lists (one group).
    // Since issue 19 (hybrid models): one list of block ids per KV-cache group, at most 16.
    fn block_ids(v: &Value) -> Result<Vec<Vec<u32>>, ParamsError> {
        const F: &str = "remote_block_ids";
        let arr = v.as_array().ok_or_else(|| ParamsError::WrongType { field: F, expected: "a list of block ids", got: type_name(v) })?;
        let ids =
            |flat: &Vec<Value>| flat.iter().map(|b| uint(b, F, u64::from(u32::MAX)).map(|n| n as u32)).collect::<Result<Vec<u32>, _>>();
        match arr.first() {
            Some(Value::Array(_)) => {
                if arr.len() > 16 {
                    return Err(ParamsError::Invalid(format!("remote_block_ids has {} KV cache groups; at most 16", arr.len())));
                }
                arr.iter()
                    .map(|g| match g {
                        Value::Array(flat) => ids(flat),
                        other => Err(ParamsError::WrongType {
                            field: F,
                            expected: "a list of block ids per KV cache group",
                            got: type_name(other),
                        }),
                    })
                    .collect()
            }
            _ => Ok(vec![ids(arr)?]),
        }
    }

    /// P's side-channel address and TP size: `remote_host`, `remote_port`, `tp_size` (default 1).
    fn peer(m: &Map<String, Value>) -> Result<(String, u16, u32), ParamsError> {
        let remote_host = string(m, "remote_host")?;
        if !valid_host(&remote_host) {
            return Err(ParamsError::BadHost(remote_host));
        }
        let remote_port = uint(req(m, "remote_port")?, "remote_port", 65535)? as u16;
        if remote_port == 0 {
            return Err(ParamsError::Invalid("remote_port must be 1..=65535".into()));
        }
        let tp_size = match m.get("tp_size") {
            None | Some(Value::Null) => 1,
            Some(v) => uint(v, "tp_size", 4096)? as u32,
        };
        if tp_size == 0 {
            return Err(ParamsError::Invalid("tp_size must be >= 1".into()));
        }
        Ok((remote_host, remote_port, tp_size))
    }

    fn transfer_id_field(m: &Map<String, Value>) -> Result<Option<String>, ParamsError> {
        match m.get("transfer_id") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= MAX_TRANSFER_ID => Ok(Some(s.clone())),
            Some(Value::String(s)) => {
                Err(ParamsError::Invalid(format!("transfer_id is {} bytes long; at most {MAX_TRANSFER_ID} allowed", s.len())))
            }
            Some(other) => Err(ParamsError::WrongType { field: "transfer_id", expected: "a string", got: type_name(other) }),
        }
    }

    pub mod api {
        use super::*;
        /// Parse the JSON text of a request's `kv_transfer_params` (`None`/`null` = no P/D).
        pub fn parse_json(text: Option<&str>) -> Result<KvParams, ParamsError> {
            match text {
                None => Ok(KvParams::None),
                Some(t) => {
                    let v: Value = serde_json::from_str(t).map_err(|e| ParamsError::NotAnObject(format!("invalid JSON: {e}")))?;
                    parse(&v)
                }
            }
        }

        /// The optional `transfer_id` of a request's params (push mode matches P's and D's
        /// legs on it). Absent or null: `None`.
        pub fn transfer_id(text: Option<&str>) -> Result<Option<String>, ParamsError> {
            let Some(t) = text else { return Ok(None) };
            let v: Value = serde_json::from_str(t).map_err(|e| ParamsError::NotAnObject(format!("invalid JSON: {e}")))?;
            match &v {
                Value::Object(m) => transfer_id_field(m),
                _ => Ok(None),
            }
        }

        /// Parse an already-decoded `kv_transfer_params` value (`null` = no P/D).
        pub fn parse(v: &Value) -> Result<KvParams, ParamsError> {
            let m = match v {
                Value::Null => return Ok(KvParams::None),
                Value::Object(m) => m,
                other => return Err(ParamsError::NotAnObject(type_name(other))),
            };
            let prefill = flag(m, "do_remote_prefill")?;
            let decode = flag(m, "do_remote_decode")?;
            let push = match m.get("transfer_mode") {
                None | Some(Value::Null) => false,
                Some(Value::String(s)) if s == "pull" => false,
                Some(Value::String(s)) if s == "push" => true,
                Some(other) => {
                    return Err(ParamsError::WrongType { field: "transfer_mode", expected: "\"pull\" or \"push\"", got: type_name(other) })
                }
            };
            match (prefill, decode) {
                (false, false) => Ok(KvParams::None),
                (true, true) => Err(ParamsError::Invalid("do_remote_prefill and do_remote_decode are both true".into())),
                (false, true) => Ok(KvParams::RemoteDecode),
                (true, false) if push => {
                    let remote_engine_id = string(m, "remote_engine_id")?;
                    let (remote_host, remote_port, tp_size) = peer(m)?;
                    let transfer_id = transfer_id_field(m)?.unwrap_or_default();
                    Ok(KvParams::PushPrefill(PushPrefill { remote_engine_id, remote_host, remote_port, tp_size, transfer_id }))
                }
                (true, false) => {
                    let remote_engine_id = string(m, "remote_engine_id")?;
                    let remote_request_id = string(m, "remote_request_id")?;
                    let remote_block_ids = block_ids(req(m, "remote_block_ids")?)?;
                    let (remote_host, remote_port, tp_size) = peer(m)?;
                    let remote_num_tokens = match m.get("remote_num_tokens") {
                        None | Some(Value::Null) => None,
                        Some(v) => Some(uint(v, "remote_num_tokens", u64::MAX)?),
                    };
                    let remote_epoch = match m.get("remote_epoch") {
                        None | Some(Value::Null) => 0,
                        Some(v) => uint(v, "remote_epoch", u64::MAX)?,
                    };
                    let remote_expiry_unix = match m.get("remote_blocks_expiry_time") {
                        None | Some(Value::Null) => 0.0,
                        Some(v) => v.as_f64().filter(|x| x.is_finite() && *x >= 0.0).ok_or_else(|| ParamsError::WrongType {
                            field: "remote_blocks_expiry_time",
                            expected: "a non-negative number (Unix seconds)",
                            got: type_name(v),
                        })?,
                    };
                    let remote_staged = match m.get("remote_staged") {
                        None | Some(Value::Null) => false,
                        Some(Value::Bool(b)) => *b,
                        Some(v) => return Err(ParamsError::WrongType { field: "remote_staged", expected: "a boolean", got: type_name(v) }),
                    };
                    Ok(KvParams::RemotePrefill(RemotePrefill {
                        remote_engine_id,
                        remote_request_id,
                        remote_block_ids,
                        remote_host,
                        remote_port,
                        tp_size,
                        remote_num_tokens,
                        remote_epoch,
                        remote_expiry_unix,
                        remote_staged,
                    }))
                }
            }
        }
    }
}

const KEYS: &[&str] = &[
    "do_remote_prefill",
    "remote_staged",
    "do_remote_decode",
    "remote_engine_id",
    "remote_request_id",
    "remote_block_ids",
    "remote_host",
    "remote_port",
    "tp_size",
    "remote_num_tokens",
    "transfer_mode",
    "transfer_id",
    "remote_blocks_expiry_time",
    "remote_epoch",
    "x",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        (0u64..70_000).prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        "[a-z0-9:.\\-\\[\\] ]{0,12}".prop_map(Value::String),
        "x{250,260}".prop_map(Value::String),
        prop::sample::select(vec![json!("push"), json!("pull"), json!("127.0.0.1"), json!(""), json!(true), json!(1), json!(0)]),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(inner, 0..4).prop_map(|v| json!([v])),
        ]
    })
}

/// Objects keyed by the real names, biased towards the valid pull and push shapes so the
/// later checks are reached.
fn params() -> impl Strategy<Value = Value> {
    let base = prop::sample::select(vec![
        json!({"do_remote_prefill": true, "remote_engine_id": "P", "remote_request_id": "r", "remote_block_ids": [[1, 2]],
               "remote_host": "127.0.0.1", "remote_port": 7000, "tp_size": 1, "remote_num_tokens": 20, "remote_epoch": 3,
               "remote_blocks_expiry_time": 1.5, "remote_staged": false}),
        json!({"do_remote_prefill": true, "transfer_mode": "push", "remote_engine_id": "P", "remote_host": "h",
               "remote_port": 7000, "tp_size": 2, "transfer_id": "t"}),
        json!({"do_remote_decode": true, "transfer_id": "t"}),
        json!({}),
    ]);
    let edits = prop::collection::vec((prop::sample::select(KEYS.to_vec()), prop::option::of(value())), 0..4);
    prop_oneof![
        4 => (base, edits).prop_map(|(mut b, edits)| {
            if let Some(m) = b.as_object_mut() {
                for (k, v) in edits {
                    match v {
                        Some(v) => { m.insert(k.to_string(), v); }
                        None => { m.remove(k); }
                    }
                }
            }
            b
        }),
        1 => value(),
    ]
}

fn check(text: &str) {
    let want = old::api::parse_json(Some(text));
    assert_eq!(KvParams::parse_json(Some(text)), want, "{text}");
    let want_tid = old::api::transfer_id(Some(text));
    assert_eq!(KvParams::transfer_id(Some(text)), want_tid, "{text}");
    let r = ReqParams::from_json(text);
    assert_eq!(r.kind, want, "{text}");
    if matches!(want, Ok(KvParams::RemoteDecode)) {
        assert_eq!(r.transfer_id, want_tid, "{text}");
    }
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        assert_eq!(KvParams::parse(&v), old::api::parse(&v), "{text}");
        if let Value::Object(m) = &v {
            // Field by field, as the Python binding reads a dict.
            let r = ReqParams::from_fields(|f| m.get(f.name()).cloned());
            assert_eq!(r.kind, want, "{text}");
            if matches!(want, Ok(KvParams::RemoteDecode)) {
                assert_eq!(r.transfer_id, want_tid, "{text}");
            }
        }
    }
}

#[test]
fn decoding_matches_the_previous_parser() {
    let n = std::env::var("KVBRIDGE_FUZZ_CASES").ok().and_then(|s| s.parse::<u32>().ok()).unwrap_or(1).max(1) * 20_000;
    let mut runner = TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() });
    let strategy = prop_oneof![
        4 => params().prop_map(|v| v.to_string()),
        1 => any::<String>(),
        1 => params().prop_map(|v| { let s = v.to_string(); s.chars().take(s.chars().count() / 2).collect::<String>() }),
    ];
    runner
        .run(&strategy, |text| {
            check(&text);
            Ok(())
        })
        .unwrap();
    for t in ["null", "[1]", "3", "\"x\"", "{", "", "{\"do_remote_decode\": true, \"transfer_id\": 5}"] {
        check(t);
    }
}

#[test]
fn fields_index_their_table() {
    for (i, f) in Field::ALL.iter().enumerate() {
        assert_eq!(*f as usize, i, "{f:?}");
    }
    let names: std::collections::HashSet<_> = Field::ALL.iter().map(|f| f.name()).collect();
    assert_eq!(names.len(), Field::ALL.len());
    for k in KEYS.iter().filter(|k| **k != "x") {
        assert!(names.contains(k), "{k} is read by the parser but not a Field");
    }
}
