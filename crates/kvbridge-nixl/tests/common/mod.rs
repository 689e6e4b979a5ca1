//! Shared by the NIXL integration tests.

/// True if the NIXL runtime can be loaded. Without it the test skips, except under
/// `CI=true`, where a missing runtime is a failure.
pub fn runtime_or_skip() -> bool {
    if kvbridge_nixl::NixlTransport::runtime_available(None) {
        return true;
    }
    assert!(
        std::env::var("CI").map(|v| v != "true").unwrap_or(true),
        "CI=true but the NIXL runtime is missing: set KVBRIDGE_NIXL_LIB_DIR (make test does)"
    );
    eprintln!("SKIP: NIXL runtime not found (set KVBRIDGE_NIXL_LIB_DIR)");
    false
}

/// A TCP port free on 127.0.0.1 right now (for a side-channel listener).
#[allow(dead_code)] // not every test binary uses it
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free port")
}

/// A single-rank pull config on 127.0.0.1 (`model` names the compat facts, 16-token blocks),
/// with `extra` appended to `kv_connector_extra_config` (`,"key":value...`).
#[allow(dead_code)] // not every test binary uses it
pub fn local_config(role: &str, engine: &str, port: u16, model: &str, extra: &str) -> kvbridge_core::ConnectorConfig {
    let compat = kvbridge_core::config::CompatInfo { model: model.into(), block_size: 16, ..Default::default() };
    let json = format!(
        r#"{{"kv_role":"{role}","engine_id":"{engine}","kv_connector_extra_config":{{"side_channel_host":"127.0.0.1","side_channel_port":{port},"handshake_timeout":2{extra}}}}}"#
    );
    let info = kvbridge_core::config::EngineInfo { tp_size: 1, compat, ..Default::default() };
    kvbridge_core::ConnectorConfig::from_json(&json, info, |_| None).expect("config")
}

/// A port `a` free on 127.0.0.1 with `a + 1` free too (a TP-2 engine's two listeners).
#[allow(dead_code)] // not every test binary uses it
pub fn free_port_pair() -> u16 {
    loop {
        let a = free_port();
        if a < 60000 && std::net::TcpListener::bind(("127.0.0.1", a + 1)).is_ok() {
            return a;
        }
    }
}

/// Poll `w` until `want` returns true on what it reported (accumulated).
#[allow(dead_code)] // not every test binary uses it
pub fn poll_until(
    w: &kvbridge_nixl::NixlWorker,
    secs: u64,
    want: impl Fn(&kvbridge_core::worker::FinishedSets) -> bool,
) -> kvbridge_core::worker::FinishedSets {
    let t0 = std::time::Instant::now();
    let mut all = kvbridge_core::worker::FinishedSets::default();
    loop {
        let f = w.get_finished();
        all.sending.extend(f.sending);
        all.recving.extend(f.recving);
        all.failed_recving.extend(f.failed_recving);
        all.invalid_block_ids.extend(f.invalid_block_ids);
        if want(&all) || t0.elapsed() > std::time::Duration::from_secs(secs) {
            return all;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Pull-mode P: prefill `req` over `blocks` (one KV-cache group, `tokens` tokens), finish it
/// for a remote decode and hand the step's metadata to every P worker; what P returns for
/// D (its `kv_transfer_params`).
#[allow(dead_code)] // not every test binary uses it
pub fn offer(
    sched: &mut kvbridge_core::scheduler::PullScheduler,
    workers: &[kvbridge_nixl::NixlWorker],
    req: &str,
    blocks: &[u32],
    tokens: u64,
) -> serde_json::Value {
    use kvbridge_core::scheduler::{FinishReason, SchedulerSide};
    let dec = r#"{"do_remote_decode":true}"#;
    sched.get_num_new_matched_tokens(req, tokens, 0, Some(dec));
    let f = sched.request_finished(req, blocks, FinishReason::LengthCapped, tokens, Some(dec), kvbridge_driver::clock::now_unix());
    let md = sched.build_connector_meta().to_bytes().expect("metadata");
    for w in workers {
        w.start_load(&md).expect("P start_load");
    }
    f.kv_transfer_params.expect("params")
}
