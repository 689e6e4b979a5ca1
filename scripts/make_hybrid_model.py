#!/usr/bin/env python3
"""Write a tiny, randomly initialised *hybrid-attention* Llama that vLLM serves with the
hybrid KV-cache manager (HMA): some layers use sliding-window attention, the rest full
attention. No hub access needed.

Usage: python scripts/make_hybrid_model.py OUTDIR [SLIDING_WINDOW]

It is the model of scripts/make_model.py (same tokenizer, same shapes, same seeded bf16
weights, so the two share every tensor byte for byte) plus two config.json keys:

    "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    "sliding_window": 256

vLLM's LlamaForCausalLM (vllm/model_executor/models/llama.py) gives each layer marked
"sliding_attention" a per-layer sliding window, and because the layer types are mixed, vLLM
leaves CacheConfig.sliding_window unset so the full layers stay full. The KV cache then has
two groups: group 0 = SlidingWindowSpec (layers 0 and 2), group 1 = FullAttentionSpec
(layers 1 and 3). With vLLM's CPU block size of 128 tokens a window of 256 spans 2 blocks,
so any prompt longer than ~384 tokens leaves null blocks (id 0) in the sliding group.

Note: Hugging Face's own LlamaForCausalLM ignores layer_types/sliding_window, so a
transformers forward pass is NOT a reference for this model's outputs; only vLLM is.

Idempotent: does nothing if every file is already there with the expected config.
Takes a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

DEFAULT_SLIDING_WINDOW = 256


# make_model.py sits beside this file: on sys.path when this runs as a script (its folder
# comes first) and when the tests import it (they put scripts/ on sys.path).
import make_model as mm  # noqa: E402

LAYER_TYPES = tuple(
    "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(mm.LAYERS)
)


def _hybrid_config(out: Path, sliding_window: int) -> dict:
    config = json.loads((out / "config.json").read_text())
    config["layer_types"] = list(LAYER_TYPES)
    config["sliding_window"] = sliding_window
    return config


def _config_ok(out: Path, sliding_window: int) -> bool:
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (
        config.get("layer_types") == list(LAYER_TYPES)
        and config.get("sliding_window") == sliding_window
    )


def make_hybrid_model(
    outdir: str | os.PathLike[str], sliding_window: int = DEFAULT_SLIDING_WINDOW
) -> Path:
    """Create the hybrid model in outdir unless it already exists; return the directory."""
    if sliding_window <= 0:
        raise ValueError(f"sliding_window must be positive, got {sliding_window}")
    out = Path(outdir)
    if all((out / f).is_file() for f in mm.FILES) and _config_ok(out, sliding_window):
        return out
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "tokenizer.json").is_file() or not (out / "tokenizer_config.json").is_file():
        mm.write_tokenizer(out)
    mm.write_configs(out)
    config = _hybrid_config(out, sliding_window)
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, out / "config.json")
    if not (out / "model.safetensors").is_file():
        mm.write_weights(out)  # written last: its presence marks a complete model
    return out


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    window = int(argv[2]) if len(argv) == 3 else DEFAULT_SLIDING_WINDOW
    out = make_hybrid_model(argv[1], window)
    print(f"hybrid model ready: {out} (layer_types={list(LAYER_TYPES)}, sliding_window={window})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
