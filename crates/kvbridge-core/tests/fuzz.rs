//! Fuzzing every decoder a peer or a user can reach, with proptest: none may panic.
//!
//! Inputs are raw random bytes and, since random bytes rarely get past the first msgpack
//! byte, *mutated valid encodings* (byte flips and overwrites, truncation, insertion,
//! splices of two encodings). Each target feeds the decoded value on into the state
//! machine that consumes it, as the engine would:
//! - the side-channel listener ([`side_channel::answer`]): envelopes carrying handshakes,
//!   push registrations, heartbeats and inspections, with handlers that call into a real
//!   `WorkerBase` and `PushSender`;
//! - transfer notifications into `WorkerBase::on_notif` (P) and `PushReceiver::on_notif` (D);
//! - handshake payloads into a D `PullWorker` (hash, metadata, plan, then a READ plan);
//! - heartbeat replies into `PullWorker::on_heartbeat_reply`;
//! - `ConnectorMetadata` into `PullWorker::on_metadata`;
//! - `kv_transfer_params` (random JSON with the real keys) through both schedulers;
//! - `kv_transfer_config` (random extra config) into `ConnectorConfig::from_json`.
//!
//! `KVBRIDGE_FUZZ_CASES` multiplies every case count (`make fuzz` runs 20x). The default
//! run is 110,000 cases; each test prints how many it ran.
use std::sync::{Arc, Mutex};

use kvbridge_core::config::{CompatInfo, ConnectorConfig, EngineInfo};
use kvbridge_core::layout::KvLayout;
use kvbridge_core::scheduler::{FinishReason, PullScheduler, PushScheduler, SchedulerSide};
use kvbridge_core::side_channel::{self, Handlers, Identity};
use kvbridge_core::testkit::{CacheLayout, Scenario, Spec};
use kvbridge_core::wire::{
    self, ConnectorMetadata, HandshakePayload, HandshakeRequest, HeartbeatReply, HeartbeatRequest, Notif, PushRegistration, RecvReq,
    RemoteRef, SideEnvelope, SideRequest, WIRE_VERSION,
};
use kvbridge_core::worker::pull::PullWorker;
use kvbridge_core::worker::push::{PushReceiver, PushSender};
use kvbridge_core::worker::WorkerBase;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{json, Value};

fn cases(base: u32) -> u32 {
    let k: u32 = std::env::var("KVBRIDGE_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    base * k.max(1)
}

/// Run `f` over `n` generated inputs; panics (a failed case) fail the test.
fn fuzz<S: Strategy>(name: &str, n: u32, strategy: S, f: impl Fn(S::Value)) {
    let mut runner = TestRunner::new(Config { cases: n, failure_persistence: None, ..Config::default() });
    runner
        .run(&strategy, |v| {
            f(v);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("fuzz {name}: {n} cases, no panic");
}

/// A mutation of one of `seeds`: overwrite/flip/insert/truncate, optionally spliced with
/// another seed.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    (0..n, 0..n, prop::collection::vec((any::<u16>(), any::<u8>(), 0u8..4), 0..6), any::<u16>(), any::<bool>()).prop_map(
        move |(a, b, edits, cut, splice)| {
            let mut v = seeds[a].clone();
            for (pos, byte, kind) in edits {
                if v.is_empty() {
                    v.push(byte);
                    continue;
                }
                let i = pos as usize % v.len();
                match kind {
                    0 => v[i] = byte,
                    1 => v[i] ^= 1 << (byte % 8),
                    2 => v.insert(i, byte),
                    _ => {
                        v.remove(i);
                    }
                }
            }
            if splice && !v.is_empty() {
                let other = &seeds[b];
                let i = cut as usize % v.len();
                v.truncate(i);
                v.extend_from_slice(&other[(cut as usize % other.len().max(1)).min(other.len())..]);
            } else if cut % 5 == 0 && !v.is_empty() {
                v.truncate(cut as usize % v.len());
            }
            v
        },
    )
}

fn bytes_or_mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![1 => prop::collection::vec(any::<u8>(), 0..256), 3 => mutated(seeds)]
}

fn spec(tp: u32, rank: u32) -> Spec {
    Spec {
        layers: 2,
        total_heads: 2,
        content: 8,
        tp_size: tp,
        tp_rank: rank,
        block_tokens: 16,
        blocks_per_logical: 1,
        num_blocks: 16,
        layout: CacheLayout::Nhd,
        mla: false,
        swa_layers: 0,
        window: 0,
        state_layers: 0,
        state_bytes: 0,
    }
}

fn cfg(role: &str, mode: &str) -> ConnectorConfig {
    let j = format!(
        r#"{{"kv_role":"{role}","engine_id":"E","kv_connector_extra_config":{{"transfer_mode":"{mode}","side_channel_host":"127.0.0.1","side_channel_port":7000}}}}"#
    );
    ConnectorConfig::from_json(
        &j,
        EngineInfo { tp_size: 1, compat: CompatInfo { block_size: 16, ..Default::default() }, ..Default::default() },
        |_| None,
    )
    .unwrap()
}

fn registration() -> PushRegistration {
    PushRegistration {
        version: WIRE_VERSION,
        transfer_id: "t".into(),
        request_id: "d-req".into(),
        target_engine_id: "P".into(),
        engine_id: "D".into(),
        host: "127.0.0.1".into(),
        port: 5700,
        tp_size: 2,
        tp_rank: 1,
        block_ids: vec![vec![1, 2, 3]],
        num_tokens: 40,
    }
}

fn envelope(hash: &str, req: &SideRequest) -> Vec<u8> {
    wire::encode(
        "e",
        &SideEnvelope {
            version: WIRE_VERSION,
            compat_hash: hash.into(),
            from_engine: "D".into(),
            compat: Some(CompatInfo { model: "m".into(), ..Default::default() }),
            kvbridge_version: wire::KVBRIDGE_VERSION.into(),
            mode: "pull".into(),
            body: wire::encode("r", req).unwrap(),
        },
    )
    .unwrap()
}

#[test]
fn side_channel_listener_never_panics() {
    let scenario = Scenario::new(&spec(1, 0), &spec(1, 0), vec![vec![1, 2]], vec![vec![3, 4]], 20);
    let md = scenario.p_metadata(0, vec![7; 16]);
    let payload: side_channel::PayloadCell = Arc::new(Mutex::new(Some(HandshakePayload {
        compat_hash: "H".into(),
        agent_metadata: wire::encode("m", &md).unwrap(),
        ..Default::default()
    })));
    let base = Arc::new(Mutex::new(WorkerBase::default()));
    let sender = Arc::new(Mutex::new(PushSender::new("P".into(), 30.0)));
    let (b2, s2) = (base.clone(), sender.clone());
    let handlers = Handlers {
        register: Some(Arc::new(move |r| s2.lock().unwrap().on_registration(r, 1000.0).map(|_| ()).map_err(|e| e.to_string()))),
        heartbeat: Some(Arc::new(move |_, hb| b2.lock().unwrap().on_heartbeat(&hb, 1000.0, 20.0))),
        inspect: Some(Arc::new(|| "{}".into())),
    };
    let id = Identity {
        engine_id: "P".into(),
        compat_hash: "H".into(),
        compat: Some(CompatInfo::default()),
        mode: "pull".into(),
        enforce: true,
    };
    let hs = SideRequest::Handshake(HandshakeRequest { version: WIRE_VERSION, from_engine: "D".into(), from_tp_rank: 0 });
    let hb = SideRequest::Heartbeat(HeartbeatRequest { request_ids: vec!["a".into(), "b".into()] });
    let seeds = vec![
        envelope("H", &hs),
        envelope("H", &SideRequest::Register(registration())),
        envelope("H", &hb),
        envelope("", &SideRequest::Inspect),
        envelope("X", &hs),
    ];
    fuzz("side_channel::answer", cases(30_000), bytes_or_mutated(seeds), |b| {
        let reply = side_channel::answer(&id, &payload, &handlers, &b);
        // Every request gets an answer the client can decode.
        assert!(wire::decode::<wire::SideReply>("r", &reply, 1 << 26).is_ok());
    });
}

#[test]
fn notifications_never_panic() {
    let n = Notif { version: WIRE_VERSION, request_id: "r".into(), from_engine: "D".into(), from_tp_rank: 0, ok: true, expected: 2 };
    let seeds = vec![n.to_bytes().unwrap(), Notif { ok: false, expected: u32::MAX, ..n.clone() }.to_bytes().unwrap()];
    let base = Mutex::new(WorkerBase::default());
    let recv = Mutex::new(PushReceiver::default());
    recv.lock().unwrap().on_registered("r", 2, 1e12);
    fuzz("Notif", cases(20_000), bytes_or_mutated(seeds), |b| {
        base.lock().unwrap().on_notif(&b, 1000.0);
        if let Ok(n) = Notif::from_bytes(&b) {
            recv.lock().unwrap().on_notif(&n);
        }
    });
}

#[test]
fn push_registrations_never_panic() {
    let seeds = vec![registration().to_bytes().unwrap(), PushRegistration { tp_rank: 0, tp_size: 1, ..registration() }.to_bytes().unwrap()];
    let sender = Mutex::new(PushSender::new("P".into(), 30.0));
    fuzz("PushRegistration", cases(10_000), bytes_or_mutated(seeds), |b| {
        if let Ok(r) = PushRegistration::from_bytes(&b) {
            let _ = sender.lock().unwrap().on_registration(r, 1000.0);
        }
    });
}

fn d_worker(layout: &KvLayout) -> PullWorker {
    let mut w = PullWorker::new("D".into(), 0, 1, "H".into(), true);
    w.on_registered(layout.clone(), 16);
    w
}

fn recv_md() -> ConnectorMetadata {
    ConnectorMetadata {
        version: WIRE_VERSION,
        reqs_to_recv: vec![RecvReq {
            req_id: "d1".into(),
            local_block_ids: vec![vec![3, 4]],
            num_tokens: 20,
            notify_only: false,
            remote: RemoteRef {
                engine_id: "P".into(),
                host: "127.0.0.1".into(),
                port: 7000,
                request_id: "r1".into(),
                block_ids: vec![vec![1, 2]],
                tp_size: 1,
                epoch: 5,
                expiry_unix: 2000.0,
            },
        }],
        ..Default::default()
    }
}

#[test]
fn handshake_payloads_never_panic_and_bad_ones_fail_the_request() {
    let scenario = Scenario::new(&spec(1, 0), &spec(1, 0), vec![vec![1, 2]], vec![vec![3, 4]], 20);
    let d_layout = scenario.d_metadata(0, vec![]).layout();
    let md = scenario.p_metadata(0, vec![7; 16]);
    let good = HandshakePayload {
        compat_hash: "H".into(),
        agent_metadata: wire::encode("m", &md).unwrap(),
        epoch: 5,
        now_unix: 1000.0,
        ..Default::default()
    };
    let seeds = vec![
        wire::encode("p", &good).unwrap(),
        wire::encode("p", &HandshakePayload { compat_hash: "X".into(), compat: Some(CompatInfo::default()), ..good.clone() }).unwrap(),
        wire::encode("m", &md).unwrap(),
    ];
    // Mutations that reach inside the metadata (region sizes, strides, counts) too.
    let nested = mutated(vec![wire::encode("m", &md).unwrap()])
        .prop_map(move |m| wire::encode("p", &HandshakePayload { agent_metadata: m, ..good.clone() }).unwrap());
    let strategy = prop_oneof![2 => bytes_or_mutated(seeds), 1 => nested];
    fuzz("HandshakePayload+AgentMetadata+plan", cases(15_000), strategy, |b| {
        let mut w = d_worker(&d_layout);
        let peer = "P@127.0.0.1:7000";
        let a = w.on_metadata(recv_md(), 1000.0);
        assert_eq!(a.len(), 1);
        let a = w.on_handshake_payload(peer, 0, "x", Ok(b), 1000.0, 1000.0);
        if !a.is_empty() {
            // The metadata passed every check: the plan was built; plan the READ.
            let _ = w.on_remote_added(peer, 0, Ok(()), 1000.0);
        }
        let f = w.base.take_finished();
        assert!(f.failed_recving.len() <= 1);
    });
}

#[test]
fn heartbeat_replies_and_metadata_never_panic() {
    let scenario = Scenario::new(&spec(1, 0), &spec(1, 0), vec![vec![1, 2]], vec![vec![3, 4]], 20);
    let d_layout = scenario.d_metadata(0, vec![]).layout();
    let reply = HeartbeatReply {
        epoch: 5,
        held: vec![("r1".into(), 20.0), ("r2".into(), f64::NAN)],
        released: vec!["r3".into()],
        expired: vec!["r1".into()],
        unknown: vec![],
    };
    let seeds = vec![wire::encode("h", &reply).unwrap()];
    let w = Mutex::new(d_worker(&d_layout));
    fuzz("HeartbeatReply", cases(10_000), bytes_or_mutated(seeds), |b| {
        let res = wire::decode::<HeartbeatReply>("h", &b, 1 << 20).map_err(Into::into);
        w.lock().unwrap().on_heartbeat_reply("P@127.0.0.1:7000", res, 1000.0, 1000.1);
    });
    let seeds = vec![recv_md().to_bytes().unwrap()];
    fuzz("ConnectorMetadata", cases(10_000), bytes_or_mutated(seeds), |b| {
        if let Ok(md) = ConnectorMetadata::from_bytes(&b) {
            let _ = d_worker(&d_layout).on_metadata(md, 1000.0);
        }
    });
}

fn json_value() -> impl Strategy<Value = Value> {
    let keys = prop::sample::select(vec![
        "do_remote_prefill",
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
    ]);
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u32>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        "[a-z0-9:.\\-\\[\\] ]{0,12}".prop_map(Value::String),
        Just(json!("push")),
        Just(json!("127.0.0.1")),
    ];
    let value = leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(inner, 0..4).prop_map(|v| json!([v]))
        ]
    });
    prop::collection::vec((keys, value), 0..12).prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

#[test]
fn kv_transfer_params_never_panic_in_either_scheduler() {
    let good = json!({"do_remote_prefill": true, "remote_engine_id": "P", "remote_request_id": "r", "remote_block_ids": [[1, 2]],
        "remote_host": "127.0.0.1", "remote_port": 7000, "tp_size": 1, "remote_epoch": 3, "remote_blocks_expiry_time": 1.5});
    let strategy = prop_oneof![
        3 => json_value().prop_map(|v| v.to_string()),
        1 => mutated(vec![good.to_string().into_bytes()]).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ];
    let scheds: Vec<Mutex<Box<dyn SchedulerSide + Send>>> = vec![
        Mutex::new(Box::new(PullScheduler::new(cfg("kv_consumer", "pull")))),
        Mutex::new(Box::new(PullScheduler::new(cfg("kv_producer", "pull")))),
        Mutex::new(Box::new(PushScheduler::new(cfg("kv_consumer", "push")))),
        Mutex::new(Box::new(PushScheduler::new(cfg("kv_producer", "push")))),
    ];
    fuzz("kv_transfer_params", cases(12_000), strategy, |params| {
        for s in &scheds {
            let mut s = s.lock().unwrap();
            s.on_new_request("q", Some(&params));
            let m = s.get_num_new_matched_tokens("q", 40, 0, Some(&params));
            s.update_state_after_alloc("q", &[5, 6, 7], m.num_tokens);
            s.prefill_completing("q", &[5, 6, 7], 40);
            s.tick(1000.0);
            let _ = s.build_connector_meta().to_bytes();
            let _ = s.request_finished("q", &[5, 6, 7], FinishReason::LengthCapped, 40, Some(&params), 1000.0);
            s.update_connector_output(&["q".into()], &["q".into()]);
        }
    });
}

#[test]
fn kv_transfer_config_never_panics() {
    let strategy = json_value().prop_map(|extra| {
        json!({"kv_role": "kv_consumer", "engine_id": "e", "kv_connector_extra_config": extra, "kv_load_failure_policy": "recompute"})
            .to_string()
    });
    fuzz("kv_transfer_config", cases(3_000), strategy, |j| {
        let _ = ConnectorConfig::from_json(&j, EngineInfo::default(), |_| None);
    });
}
