"""A MedGemma-4B-shaped checkpoint with random weights, for speed measurements only.

Same config, tensor names (published spelling: `language_model.model.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`), bf16 dtype and sharded layout
(`model-0000k-of-0000n.safetensors` + `model.safetensors.index.json`) as the published
MedGemma 4B files; tokenizer, chat template and processor settings come from the tiny test model.

Written streaming: the tensor list comes from a model built on the `meta` device (no memory),
and each tensor is generated in chunks straight into its shard, so peak memory is one chunk
(~100 MB), never the 8.6 GB model. Values are drawn by seeded RNG through a 65536-entry table of
normal quantiles already rounded to bf16: a uniform 16-bit draw picks one, much faster
than numpy's normal generator plus a bf16 conversion and gives the same distribution to bf16
precision.

    python -m benchmarks.checkpoint4b      # builds it (once) and prints where it is
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from medgemma_edge.runtime.cache import cache_root

RECIPE_VERSION = "1"
SEED = 4
SHARD_BYTES = 5_000_000_000  # the published 4B files come in two shards of up to ~5 GB
CHUNK = 1 << 25  # values generated per step: 64 MB of bf16

# MedGemma 4B (google/medgemma-4b-it config.json), see shared/REFERENCE.md.
TEXT_4B = dict(
    vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
    num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=1024,
    layer_types=[("full_attention" if (i + 1) % 6 == 0 else "sliding_attention") for i in range(34)],
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=None, attn_logit_softcapping=None,
    bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
)
VISION_4B = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False,
    hidden_act="gelu_pytorch_tanh",
)
# Files taken from the tiny test model: everything but its config and weights.
SIDE_FILES_SKIP = ("config.json", "model.safetensors", ".stamp")


def config_4b():
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=TEXT_4B, vision_config=VISION_4B, mm_tokens_per_image=256,
        boi_token_index=255999, eoi_token_index=256000, image_token_index=262144,
        initializer_range=0.02, tie_word_embeddings=True,
        architectures=["Gemma3ForConditionalGeneration"],
    )


def tensor_specs(config) -> list[tuple[str, tuple[int, ...]]]:
    """(published name, shape) of every stored tensor, from a model built on `meta` (no memory)."""
    import torch
    from transformers import Gemma3ForConditionalGeneration

    from medgemma_edge.testing.models import published_state_dict

    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    return [(name, tuple(t.shape)) for name, t in published_state_dict(model).items()]


def init_of(name: str) -> tuple[float, float]:
    """(mean, std) for a tensor, by what it is."""
    if "vision_tower" in name and ("layer_norm" in name or "post_layernorm" in name):
        return (0.0, 0.02) if name.endswith("bias") else (1.0, 0.05)  # SigLIP LayerNorm: w ~ 1
    if name.endswith("norm.weight"):
        return 0.0, 0.05  # Gemma RMSNorm stores w and applies (1 + w): random around 0
    return 0.0, 0.02


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _normal_table(mean: float, std: float) -> np.ndarray:
    """65536 bf16 values at the normal quantiles (i + 0.5) / 65536: a uniform index draws N(mean, std)."""
    dist = statistics.NormalDist(mean, std)
    return _bf16_bits(np.array([dist.inv_cdf((i + 0.5) / 65536) for i in range(65536)], np.float32))


def _plan_shards(specs) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards, size = [[]], 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_shard(path: Path, specs, tables: dict, progress) -> None:
    """One bf16 safetensors file: 8-byte header length, JSON header padded to 8 bytes, data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(len(blob).to_bytes(8, "little"))
        fh.write(blob)
        for name, shape in specs:
            table = tables.setdefault(init_of(name), _normal_table(*init_of(name)))
            rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
            left = int(np.prod(shape))
            while left:
                n = min(left, CHUNK)
                idx = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16)
                fh.write(table[idx].tobytes())
                left -= n
                progress(2 * n)


def _build(out: Path) -> None:
    from medgemma_edge.testing.models import build_tiny

    config = config_4b()
    specs = tensor_specs(config)
    shards = _plan_shards(specs)
    total = sum(2 * int(np.prod(s)) for _, s in specs)
    n_params = total // 2
    print(f"[4b] writing {n_params / 1e9:.2f} B random bf16 parameters ({total / 1e9:.1f} GB) "
          f"in {len(shards)} shards to {out}", file=sys.stderr, flush=True)
    done, t0, last = [0], time.perf_counter(), [0.0]

    def progress(nbytes: int) -> None:
        done[0] += nbytes
        now = time.perf_counter()
        if now - last[0] > 10 or done[0] == total:
            last[0] = now
            print(f"[4b]   {done[0] / 1e9:5.1f} / {total / 1e9:.1f} GB  ({now - t0:.0f} s)",
                  file=sys.stderr, flush=True)

    weight_map, tables = {}, {}
    for k, shard in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_shard(out / fname, shard, tables, progress)
        weight_map.update({name: fname for name, _ in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.to_json_file(str(out / "config.json"))
    for f in build_tiny().iterdir():  # tokenizer, chat template, image processor settings
        if f.is_file() and f.name not in SIDE_FILES_SKIP:
            shutil.copy2(f, out / f.name)


def _stamp() -> str:
    return f"recipe={RECIPE_VERSION} seed={SEED}"


def build_4b() -> Path:
    """The cached checkpoint folder, built on first use (~9 GB of disk, a few minutes)."""
    out = cache_root() / "bench" / "medgemma-4b-shaped"
    stamp = out / ".stamp"
    if stamp.is_file() and stamp.read_text() == _stamp():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _build(tmp)
    (tmp / ".stamp").write_text(_stamp())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(build_4b())
