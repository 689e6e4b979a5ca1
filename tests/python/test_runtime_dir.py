"""Which NIXL runtime the connector loads: ``kvbridge.nixl_lib_dir`` finds the libs of an
installed ``nixl-cu12`` or ``nixl-cu13`` wheel, the one matching torch's CUDA first."""

from __future__ import annotations

import sys
import types

import kvbridge


def test_env_wins_then_the_wheel_matching_torchs_cuda(tmp_path, monkeypatch):
    # A stand-in nixl-cu13 install ahead of the real ones on sys.path.
    (tmp_path / "nixl_cu13").mkdir()
    (tmp_path / "nixl_cu13" / "__init__.py").write_text("")
    libs13 = tmp_path / ".nixl_cu13.mesonpy.libs"
    libs13.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    # The real nixl-cu13 wheel may be installed (the `nixl` meta-package pulls both) and
    # already imported by vLLM: find the stand-in, not the cached module.
    monkeypatch.delitem(sys.modules, "nixl_cu13", raising=False)
    monkeypatch.delenv("KVBRIDGE_NIXL_LIB_DIR", raising=False)
    monkeypatch.delenv("NIXL_LIB_DIR", raising=False)

    fake = types.SimpleNamespace(version=types.SimpleNamespace(cuda="13.0"))
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert kvbridge.nixl_lib_dir() == str(libs13)

    fake.version.cuda = "12.8"
    got = kvbridge.nixl_lib_dir()
    assert got is not None and got.endswith(".nixl_cu12.mesonpy.libs"), got

    fake.version.cuda = None  # a CPU torch: cu12 first, as before
    assert kvbridge.nixl_lib_dir() == got

    monkeypatch.setenv("KVBRIDGE_NIXL_LIB_DIR", "/somewhere")
    assert kvbridge.nixl_lib_dir() == "/somewhere"
