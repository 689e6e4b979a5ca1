//! Unit tests of `config.rs`.
use super::*;

fn no_env(_: &str) -> Option<String> {
    None
}

#[test]
fn host_buffer_follows_kv_buffer_device_on_gpu_engines() {
    let gpu = EngineInfo { cuda_device: Some(0), ..Default::default() };
    let cfg = |j: &str, e: &EngineInfo| ConnectorConfig::from_json(j, e.clone(), no_env);
    let on = cfg(r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"cpu"}"#, &gpu).expect("cpu buffer");
    assert!(on.host_buffer);
    let off = cfg(r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"cuda"}"#, &gpu).expect("cuda buffer");
    assert!(!off.host_buffer);
    // A CPU engine's cache is host memory already (vLLM ignores kv_buffer_device there)...
    let cpu = cfg(r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"cpu"}"#, &EngineInfo::default()).expect("cpu");
    assert!(!cpu.host_buffer);
    // ...unless forced.
    let forced =
        cfg(r#"{"kv_role":"kv_consumer","engine_id":"e","kv_connector_extra_config":{"kv_host_buffer":true}}"#, &EngineInfo::default())
            .expect("forced");
    assert!(forced.host_buffer);
    // Push: whole-request writes from the host buffer, never layer by layer.
    let push = cfg(
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"cpu","kv_connector_extra_config":{"transfer_mode":"push"}}"#,
        &gpu,
    )
    .expect("push with a host buffer");
    assert!(push.host_buffer && !push.push_layerwise);
    for bad in [
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"tpu"}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":7}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_connector_extra_config":{"kv_host_buffer":"yes"}}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_buffer_device":"cpu","kv_connector_extra_config":{"kv_staging_blocks":8}}"#,
    ] {
        assert!(matches!(cfg(bad, &gpu), Err(ConfigError::InvalidValue { .. })), "{bad}");
    }
}

#[test]
fn parses_roles_and_defaults() {
    let c = ConnectorConfig::from_json(r#"{"kv_role":"kv_producer","engine_id":"e1"}"#, EngineInfo::default(), no_env).unwrap();
    assert_eq!(c.role, KvRole::Producer);
    assert_eq!(c.backends, vec!["UCX"]);
    assert_eq!(c.side_channel_port, 5600);
    assert_eq!(c.side_channel_host, "localhost");
    assert_eq!(c.load_failure_policy, LoadFailurePolicy::Fail);
    assert_eq!(c.tp_size, 1);
}

#[test]
fn env_and_extra_override() {
    let env = |k: &str| match k {
        "VLLM_NIXL_SIDE_CHANNEL_PORT" => Some("6000".to_string()),
        "VLLM_NIXL_SIDE_CHANNEL_HOST" => Some("127.0.0.1".to_string()),
        _ => None,
    };
    let c = ConnectorConfig::from_json(
        r#"{"kv_role":"kv_consumer","engine_id":"e","kv_connector_extra_config":{"backends":["UCX","LIBFABRIC"],"kv_lease_duration":7}}"#,
        EngineInfo { tp_size: 2, tp_rank: 1, dp_rank: 1, ..Default::default() },
        env,
    )
    .unwrap();
    assert_eq!(c.side_channel_port, 6000);
    assert_eq!(c.side_channel_host, "127.0.0.1");
    assert_eq!(c.backends, vec!["UCX", "LIBFABRIC"]);
    assert_eq!(c.kv_lease_duration, Duration::from_secs(7));
    assert_eq!(c.local_listener_port(), Some(6003));
    assert_eq!(c.advertised_port(), Some(6002));
}

#[test]
fn rejects_bad_values() {
    let bad = [
        r#"{"kv_role":"kv_sideways","engine_id":"e"}"#,
        r#"{"kv_role":"kv_producer"}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_connector_extra_config":{"backends":"UCX"}}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_connector_extra_config":{"kv_lease_duration":-1}}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_connector_extra_config":{"transfer_mode":"sideways"}}"#,
        r#"{"kv_role":"kv_producer","engine_id":"e","kv_load_failure_policy":"retry"}"#,
        r#"[1,2]"#,
    ];
    for b in bad {
        assert!(ConnectorConfig::from_json(b, EngineInfo::default(), no_env).is_err(), "{b}");
    }
    let e = ConnectorConfig::from_json(r#"{"kv_role":"kv_producer","engine_id":"e"}"#, EngineInfo::default(), |_| Some("notaport".into()));
    assert!(matches!(e, Err(ConfigError::InvalidValue { .. })));
}

#[test]
fn kv_both_is_accepted_with_one_warning_per_engine() {
    let c = ConnectorConfig::from_json(r#"{"kv_role":"kv_both","engine_id":"e"}"#, EngineInfo::default(), no_env).unwrap();
    assert!(c.role.can_consume() && c.role.can_produce());
    let w = c.deprecation("scheduler").expect("the scheduler warns");
    assert!(w.contains("python -m kvbridge.docs migration") && w.contains("KVBRIDGE_REJECT_KV_BOTH"), "{w}");
    assert_eq!(c.deprecation("worker"), None, "workers stay quiet: one warning per engine");
    for role in ["kv_producer", "kv_consumer"] {
        let c = ConnectorConfig::from_json(&format!(r#"{{"kv_role":"{role}","engine_id":"e"}}"#), EngineInfo::default(), no_env).unwrap();
        assert_eq!(c.deprecation("scheduler"), None, "{role}");
    }
}

#[test]
fn kv_both_is_refused_when_opted_in() {
    let key = r#"{"kv_role":"kv_both","engine_id":"e","kv_connector_extra_config":{"reject_kv_both":true}}"#;
    let env = |k: &str| (k == "KVBRIDGE_REJECT_KV_BOTH").then(|| "1".to_string());
    for e in [
        ConnectorConfig::from_json(key, EngineInfo::default(), no_env).unwrap_err(),
        ConnectorConfig::from_json(r#"{"kv_role":"kv_both","engine_id":"e"}"#, EngineInfo::default(), env).unwrap_err(),
    ] {
        let m = e.to_string();
        assert!(m.contains("kv_role") && m.contains("kv_producer") && m.contains("python -m kvbridge.docs migration"), "{m}");
    }
    // Explicit roles are never refused; reject_kv_both=false keeps kv_both working.
    assert!(ConnectorConfig::from_json(r#"{"kv_role":"kv_producer","engine_id":"e"}"#, EngineInfo::default(), env).is_ok());
    let off = r#"{"kv_role":"kv_both","engine_id":"e","kv_connector_extra_config":{"reject_kv_both":false}}"#;
    assert!(ConnectorConfig::from_json(off, EngineInfo::default(), no_env).is_ok());
}

#[test]
fn huge_durations_are_errors_not_panics() {
    // Found by the fuzz: 6.45e242 s made `Duration::from_secs_f64` panic.
    for v in ["6.4537579842453165e+242", "1e20", "31536001"] {
        let j = format!(r#"{{"kv_role":"kv_consumer","engine_id":"d","kv_connector_extra_config":{{"kv_lease_duration":{v}}}}}"#);
        let e = ConnectorConfig::from_json(&j, EngineInfo::default(), |_| None).unwrap_err();
        assert!(e.to_string().contains("kv_lease_duration"), "{e}");
    }
    let j = r#"{"kv_role":"kv_consumer","engine_id":"d","kv_connector_extra_config":{"engine_ttl":31536000}}"#;
    assert!(ConnectorConfig::from_json(j, EngineInfo::default(), |_| None).is_ok());
}
