#!/usr/bin/env python3
"""Write a tiny, randomly initialised Llama model that vLLM can serve, without any hub access.

Usage: python scripts/make_model.py OUTDIR

OUTDIR receives tokenizer.json + tokenizer_config.json (a byte-level BPE with vocab 4096 trained
locally on Python stdlib sources; <s>=0, </s>=1), config.json (LlamaForCausalLM: hidden 256,
4 layers, 4 heads, 2 KV heads, head_dim 64), generation_config.json and model.safetensors
(bf16 weights drawn from N(0, 0.02) with torch.manual_seed(0); norms = 1).
Idempotent: does nothing if every file is already there. Takes a few seconds.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
from pathlib import Path

VOCAB = 4096
HIDDEN = 256
INTERMEDIATE = 512
LAYERS = 4
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
MAX_POS = 4096
N_TRAIN_FILES = 80

FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
)


def _training_text() -> list[str]:
    """Return the text of the first N_TRAIN_FILES stdlib .py files, in sorted (deterministic) order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())[:N_TRAIN_FILES]
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


def write_tokenizer(out: Path) -> None:
    """Train a byte-level BPE tokenizer and save it in the HF fast-tokenizer format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    assert tok.token_to_id("<s>") == 0 and tok.token_to_id("</s>") == 1
    assert tok.get_vocab_size() == VOCAB, tok.get_vocab_size()
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": MAX_POS,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_configs(out: Path) -> None:
    """Write config.json and generation_config.json."""
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POS,
        "torch_dtype": "bfloat16",
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "initializer_range": 0.02,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def write_weights(out: Path) -> None:
    """Write seeded random bf16 weights with HF Llama parameter names."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": normal(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        w[f"{p}.self_attn.q_proj.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.k_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.v_proj.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        w[f"{p}.self_attn.o_proj.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        w[f"{p}.mlp.gate_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.up_proj.weight"] = normal(INTERMEDIATE, HIDDEN)
        w[f"{p}.mlp.down_proj.weight"] = normal(HIDDEN, INTERMEDIATE)
        w[f"{p}.input_layernorm.weight"] = ones(HIDDEN)
        w[f"{p}.post_attention_layernorm.weight"] = ones(HIDDEN)
    w["model.norm.weight"] = ones(HIDDEN)
    w["lm_head.weight"] = normal(VOCAB, HIDDEN)
    tmp = out / "model.safetensors.tmp"
    save_file(w, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / "model.safetensors")


def make_model(outdir: str | os.PathLike[str]) -> Path:
    """Create the model in outdir unless all its files already exist; return the directory."""
    out = Path(outdir)
    if all((out / f).is_file() for f in FILES):
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(out)
    write_configs(out)
    write_weights(out)  # written last: its presence marks a complete model
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = make_model(argv[1])
    print(f"model ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
