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
