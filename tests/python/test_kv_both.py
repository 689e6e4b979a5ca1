"""The ``kv_both`` deprecation, as vLLM's own tests check NixlConnector's
(``test_kv_both_deprecation_warning``, ``test_explicit_kv_role_no_deprecation_warning``):
one warning per engine, from its scheduler, naming a guide a wheel user can read; none for
explicit roles; and the opt-in refusal (phase 3). Each case runs the native scheduler and
worker, as the vLLM connector constructs them, in a fresh process so that the Rust log
lines reach a logging handler of its own (the first ``init_logging`` of a process wins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO  # puts kvbridge on sys.path

import kvbridge

#: The directory holding the kvbridge package in use (an installed wheel or <repo>/python).
PACKAGE_ROOT = str(os.path.dirname(os.path.dirname(os.path.abspath(kvbridge.__file__))))

PROBE = r"""
import json, logging, sys, time
from kvbridge import _native, nixl_lib_dir
records = []
class Keep(logging.Handler):
    def emit(self, r):
        records.append([r.levelname, r.getMessage()])
log = logging.getLogger("kvbridge")
log.addHandler(Keep()); log.setLevel(1); log.propagate = False
_native.init_logging(None, True)
role, extra = sys.argv[1], json.loads(sys.argv[2])
cfg = json.dumps({"kv_role": role, "engine_id": "e", "kv_connector_extra_config": extra})
info = json.dumps({"tp_size": 2, "tp_rank": 0})
try:
    # An engine: one scheduler, and a worker per rank (TP 2).
    _native.Scheduler(cfg, info)
    workers = [_native.Worker(cfg, json.dumps({"tp_size": 2, "tp_rank": r}), nixl_lib_dir()) for r in (0, 1)]
    error = None
except _native.ConfigError as e:
    error = str(e)
deadline = time.time() + 5
while time.time() < deadline and error is None and sum("side=\"worker\"" in m for _, m in records) < 2:
    time.sleep(0.05)
print(json.dumps({"records": records, "error": error}))
"""


def probe(role: str, extra: dict | None = None, env: dict[str, str] | None = None) -> dict:
    e = {k: v for k, v in os.environ.items() if k != "KVBRIDGE_REJECT_KV_BOTH"}
    e.update(UCX_NET_DEVICES="lo", PYTHONPATH=PACKAGE_ROOT, **(env or {}))
    out = subprocess.run([sys.executable, "-c", PROBE, role, json.dumps(extra or {})], env=e,
                         capture_output=True, text=True, timeout=120, cwd="/tmp")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def deprecations(r: dict) -> list[str]:
    return [m for level, m in r["records"] if "kv_both" in m and "deprecated" in m and level == "WARNING"]


def test_kv_both_deprecation_warning() -> None:
    r = probe("kv_both")
    assert r["error"] is None
    started = [m for _, m in r["records"] if "kvbridge connector starting" in m]
    assert len(started) == 3, started  # the scheduler and both workers came up...
    (w,) = deprecations(r)  # ...and the engine warned once, from its scheduler
    assert 'kv_role="kv_producer"' in w and 'kv_role="kv_consumer"' in w, w
    assert "python -m kvbridge.docs migration" in w and "KVBRIDGE_REJECT_KV_BOTH" in w, w


@pytest.mark.parametrize("role", ["kv_producer", "kv_consumer"])
def test_explicit_kv_role_no_deprecation_warning(role: str) -> None:
    r = probe(role)
    assert r["error"] is None and not [m for _, m in r["records"] if "deprecated" in m], r["records"]
    # Refusing kv_both never touches an explicit role.
    assert probe(role, env={"KVBRIDGE_REJECT_KV_BOTH": "1"})["error"] is None


@pytest.mark.parametrize("how", ["env", "key"])
def test_kv_both_refused_when_opted_in(how: str) -> None:
    r = probe("kv_both", {"reject_kv_both": True}) if how == "key" else probe("kv_both", env={"KVBRIDGE_REJECT_KV_BOTH": "1"})
    assert r["error"] and "kv_role" in r["error"] and "python -m kvbridge.docs migration" in r["error"], r


def test_the_guide_ships_with_the_package_and_prints() -> None:
    from kvbridge import docs

    shipped = docs.guide("migration")
    assert shipped == (REPO / "docs" / "migration-kv-both.md").read_text(encoding="utf-8"), (
        "python/kvbridge/guides/migration-kv-both.md must be a copy of docs/migration-kv-both.md"
    )
    out = subprocess.run([sys.executable, "-m", "kvbridge.docs", "migration"], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=PACKAGE_ROOT), cwd="/tmp")  # fmt: skip
    assert out.returncode == 0 and out.stdout == shipped
    assert "KVBRIDGE_REJECT_KV_BOTH" in shipped and "What each role skips" in shipped
