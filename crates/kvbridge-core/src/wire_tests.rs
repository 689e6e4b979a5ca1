//! Unit tests of `wire.rs`.
use super::*;
use crate::config::TransferMode;

#[test]
fn metadata_roundtrip_and_limits() {
    let m = ConnectorMetadata {
        version: WIRE_VERSION,
        reqs_to_recv: vec![RecvReq {
            req_id: "r".into(),
            local_block_ids: vec![vec![1, 2]],
            num_tokens: 20,
            notify_only: false,
            remote: RemoteRef {
                engine_id: "p".into(),
                host: "h".into(),
                port: 1,
                request_id: "x".into(),
                block_ids: vec![vec![5, 6]],
                tp_size: 1,
                epoch: 7,
                expiry_unix: 2.5,
                staged: true,
            },
        }],
        reqs_to_send: vec![SendLease { req_id: "s".into(), expiry_unix: 1.5, expected_readers: 1, num_blocks: 2 }],
        reqs_failed: vec![],
        ..Default::default()
    };
    let b = m.to_bytes().unwrap();
    assert_eq!(ConnectorMetadata::from_bytes(&b).unwrap(), m);
    assert!(ConnectorMetadata::from_bytes(&[]).unwrap().is_empty());
    assert!(matches!(ConnectorMetadata::from_bytes(b"\xc1garbage"), Err(WireError::Decode { .. })));
    let big = vec![0u8; MAX_NOTIF_BYTES + 1];
    assert!(matches!(Notif::from_bytes(&big), Err(WireError::TooLarge { .. })));
    let mut old = m.clone();
    old.version = 99;
    assert!(matches!(ConnectorMetadata::from_bytes(&old.to_bytes().unwrap()), Err(WireError::Version { .. })));
}

#[test]
fn compat_hash_depends_on_model_facts() {
    let a = CompatInfo { model: "m".into(), block_size: 16, ..Default::default() };
    let mut b = a.clone();
    assert_eq!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull));
    b.block_size = 32;
    assert_eq!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull), "block sizes may differ");
    b.head_size = 64;
    assert_ne!(compat_hash(&a, TransferMode::Pull), compat_hash(&b, TransferMode::Pull));
}
