"""Write a random-weight Llama checkpoint (config.json + model.safetensors, bf16) without holding the model in memory.

    python examples/make_checkpoint.py --shape 1b /work/ckpt/llama-1b     # TinyLlama's shape, 2.2 GB
    python examples/make_checkpoint.py --shape 7b /work/ckpt/llama-7b     # Llama-2-7B's shape, 13.5 GB
    python examples/make_checkpoint.py --shape tiny /tmp/llama-tiny       # for tests

The safetensors file is written tensor by tensor: the header (names, dtypes, shapes, offsets) first,
then each tensor generated from its own seeded generator and appended, so peak memory is one tensor
(the 7B's embedding: 250 MB in bf16), not the model. Weights are N(0, 0.02) like transformers' init,
norms are ones; the same seed gives the same bytes. The directory loads with
``transformers.AutoModelForCausalLM.from_pretrained`` and as an evo-rewrite source.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of LlamaForCausalLM with this config, in module order."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def _tensor(name: str, shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed * 100003 + index)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_checkpoint(out: str | Path, shape: str = "1b", seed: int = 0) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (bf16) of a random Llama of ``shape`` into ``out``."""
    cfg = SHAPES[shape]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = tensor_shapes(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shp in shapes:
        n = 2
        for s in shp:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes
    tmp = out / "model.safetensors.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, (name, shp) in enumerate(shapes):
            t = _tensor(name, shp, seed, i)
            f.write(t.view(torch.int16).numpy().tobytes())  # bf16 bits, little endian
            del t
    tmp.replace(out / "model.safetensors")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16",
              "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False, "bos_token_id": 1,
              "eos_token_id": 2, "initializer_range": 0.02, "use_cache": True, **cfg}
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    path = write_checkpoint(args.out, args.shape, args.seed)
    size = (path / "model.safetensors").stat().st_size
    print(f"wrote {path} (Llama {args.shape}, bf16, {size / 1e9:.2f} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
