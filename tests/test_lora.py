"""Fine-tuned models: PEFT LoRA adapters on `tiny`, merged at export (GGUF, ONNX) or applied at load
as a llama.cpp LoRA, against transformers + peft's PeftModel as the reference.

Adapters (seeded, random, B nonzero so they change the outputs):
- `text`: r 8, alpha 16, on q/k/v/o/gate/up/down of the text decoder only (fits a llama.cpp LoRA);
- `rslora`: r 4, alpha 8, use_rslora, an alpha_pattern, on q_proj/v_proj/fc1/down_proj of both towers;
- `saved`: LoRA on q/v plus modules_to_save lm_head and embed_tokens, both copies changed
  differently (Google's notebook recipe; the merged model is no longer tied).
"""

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from medgemma_edge.runtime.errors import ExportError, InputError
from tests import reference as ref

COS_MIN = 0.9999
TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT = [{"role": "system", "content": "You are a helpful medical assistant."},
        {"role": "user", "content": "What does a pleural effusion look like on a chest X-ray?"}]


def _image_chat():
    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:480, 0:640] / 640
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(5 * (x + y))], -1)
    img = (127.5 + 100 * base + rng.normal(0, 12, (480, 640, 3))).clip(0, 255).astype(np.uint8)
    return [{"role": "system", "content": "You are an expert radiologist."},
            {"role": "user", "content": [{"type": "image", "image": Image.fromarray(img)},
                                         {"type": "text", "text": "What does this image show?"}]}]


def _base_model(src):
    import torch
    from transformers import Gemma3ForConditionalGeneration

    return Gemma3ForConditionalGeneration.from_pretrained(src, torch_dtype=torch.float32,
                                                          attn_implementation="eager").eval()


def _make_adapter(src, out, seed, **config):
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(_base_model(src), LoraConfig(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.05)
            elif "modules_to_save" in name:  # the trained copies: moved away from the base
                p.add_(torch.randn_like(p) * 0.02)
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("adapters")
    text_only = r".*language_model.*\.(" + "|".join(TEXT_MODULES) + ")"
    return {
        "text": _make_adapter(tiny_dir, root / "text", 1, r=8, lora_alpha=16, target_modules=text_only),
        "rslora": _make_adapter(tiny_dir, root / "rslora", 2, r=4, lora_alpha=8, use_rslora=True,
                                target_modules=["q_proj", "v_proj", "fc1", "down_proj"],
                                alpha_pattern={"down_proj": 2}),
        "saved": _make_adapter(tiny_dir, root / "saved", 3, r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                               modules_to_save=["lm_head", "embed_tokens"]),
    }


@pytest.fixture(scope="module")
def peft_logits(tiny_dir, adapters):
    """Reference next-token logits: (adapter, chat) → PeftModel logits; (None, chat) → the base's."""
    import torch
    from peft import PeftModel

    chats = {"text": CHAT, "image": _image_chat()}
    out = {(None, c): ref.next_token_logits(tiny_dir, m) for c, m in chats.items()}
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(_base_model(tiny_dir), path).eval()
        for c, m in chats.items():
            with torch.no_grad():
                out[(name, c)] = model(**ref.encode_chat(tiny_dir, m)).logits[0, -1].float().numpy()
    return out, chats


def _compare(ours, theirs, what):
    ref.assert_same_logits(ours, theirs, what, COS_MIN, digits=7)


def _changed(adapted, base, what):
    """The adapter must move the logits, or the parity above proves nothing."""
    cos = ref.cosine(adapted, base)
    print(f"{what}: adapter vs base cosine {cos:.5f}, max |d| {np.abs(adapted - base).max():.2e}")
    assert cos < 0.999, f"{what}: the adapter hardly changes the logits (cosine {cos:.6f} to the base)"


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_dir, adapters):
    """`tiny` + each adapter, merged into an f32 GGUF bundle (f32 mmproj)."""
    from medgemma_edge.export.bundle import export_gguf

    root = tmp_path_factory.mktemp("lora-bundles")
    out = {}
    for name, path in adapters.items():
        t0 = time.perf_counter()
        out[name] = export_gguf(tiny_dir, root / name, "f32", "f32", quality=False, adapter=path).bundle
        print(f"export with adapter {name}: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.mark.parametrize("name", ["text", "rslora", "saved"])
def test_merged_gguf_matches_peft(bundles, peft_logits, adapters, name):
    import medgemma_edge

    want, chats = peft_logits
    model = medgemma_edge.load(bundles[name], threads=2, context=2048, fit="stretch")
    for chat, messages in chats.items():
        got = model.next_token_logits(messages)
        _compare(got, want[(name, chat)], f"gguf f32 + {name}, {chat}")
        _changed(want[(name, chat)], want[(None, chat)], f"{name}, {chat}")
    entry = model.manifest["adapter"]
    assert entry["name"] == name and entry["r"] == json.loads((adapters[name] / "adapter_config.json").read_text())["r"]
    assert len(entry["weights_sha256"]) == 64
    if name == "saved":
        assert entry["modules_to_save"] == ["embed_tokens", "lm_head"]


def test_lora_gguf_on_base_bundle_matches_merged(tmp_path, tiny_bundle_f32, bundles, adapters, tiny_dir, peft_logits):
    import medgemma_edge
    from medgemma_edge.export.gguf_lora import export_lora

    lora = export_lora(tiny_dir, adapters["text"], tmp_path / "text-lora.gguf")
    want, chats = peft_logits
    base = medgemma_edge.load(tiny_bundle_f32, threads=2, context=2048, fit="stretch", lora=[lora])
    merged = medgemma_edge.load(bundles["text"], threads=2, context=2048, fit="stretch")
    for chat, messages in chats.items():
        got = base.next_token_logits(messages)
        _compare(got, merged.next_token_logits(messages), f"base + LoRA GGUF vs merged, {chat}")
        _compare(got, want[("text", chat)], f"base + LoRA GGUF vs peft, {chat}")


def test_lora_gguf_layout(tmp_path, adapters, tiny_dir):
    """llama.cpp's names and shapes: `<gguf name>.lora_a` (r, in) and `.lora_b` (out, r), alpha, type."""
    import gguf

    from medgemma_edge.export.gguf_lora import KEY_BASE_CONFIG, export_lora

    r = gguf.GGUFReader(str(export_lora(tiny_dir, adapters["text"], tmp_path / "a.gguf")))
    field = lambda k: r.fields[k].contents()  # noqa: E731
    assert field("general.type") == "adapter" and field("adapter.type") == "lora"
    assert field("general.architecture") == "gemma3" and field("adapter.lora.alpha") == 16.0
    assert len(field(KEY_BASE_CONFIG)) == 64
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in r.tensors}  # ggml ne order
    assert shapes["blk.0.attn_q.weight.lora_a"] == (256, 8)  # ne [in, r]
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 256)  # ne [r, out]: 4 heads x 64
    assert shapes["blk.5.ffn_down.weight.lora_a"] == (512, 8)
    assert len(shapes) == 2 * 7 * 6


def test_lora_out_refuses_what_llama_cpp_cannot_apply(tmp_path, adapters, tiny_dir):
    from medgemma_edge.export.gguf_lora import export_lora

    with pytest.raises(ExportError, match="modules_to_save") as err:
        export_lora(tiny_dir, adapters["saved"], tmp_path / "x.gguf")
    assert "\n" not in str(err.value)
    with pytest.raises(ExportError, match="vision"):
        export_lora(tiny_dir, adapters["rslora"], tmp_path / "y.gguf")


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A Gemma 3 shaped like `tiny` but narrower: an adapter made on it belongs to another model."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from medgemma_edge.testing.models import TINY_TEXT, TINY_VISION

    torch.manual_seed(0)
    cfg = Gemma3Config(text_config={**TINY_TEXT, "hidden_size": 128, "vocab_size": 1024, "num_hidden_layers": 2,
                                    "layer_types": ["sliding_attention", "full_attention"]},
                       vision_config=TINY_VISION, mm_tokens_per_image=256)
    root = tmp_path_factory.mktemp("other")
    Gemma3ForConditionalGeneration(cfg).save_pretrained(root / "base")
    return root / "base"


def test_mismatched_adapter_is_refused(tmp_path, tiny_dir, other_base, adapters):
    from medgemma_edge.cli import main
    from medgemma_edge.export.bundle import export_gguf

    wrong = _make_adapter(other_base, tmp_path / "wrong", 4, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ExportError, match="another model") as err:
        export_gguf(tiny_dir, tmp_path / "b", "f32", "f32", quality=False, adapter=wrong)
    print(err.value)
    assert "\n" not in str(err.value)
    res = CliRunner().invoke(main, ["export", str(tiny_dir), "-o", str(tmp_path / "c"), "--quant", "f32",
                                    "--adapter", str(wrong), "--no-quality"])
    print(res.output)
    assert res.exit_code == 2 and "another model" in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(main, ["export", str(tiny_dir), "--adapter", str(adapters["saved"]),
                                    "--lora-out", str(tmp_path / "s.gguf")])
    assert res.exit_code == 2 and "modules_to_save" in res.output
    not_lora = tmp_path / "notlora"
    not_lora.mkdir()
    (not_lora / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ExportError, match="only LoRA"):
        export_gguf(tiny_dir, tmp_path / "d", "f32", "f32", quality=False, adapter=not_lora)


def test_lora_for_another_base_is_refused_at_load(tmp_path, tiny_bundle_f32, other_base):
    import medgemma_edge
    from medgemma_edge.export.gguf_lora import export_lora

    wrong = _make_adapter(other_base, tmp_path / "wrong", 5, r=4, lora_alpha=8,
                          target_modules=r".*language_model.*\.q_proj")
    lora = export_lora(other_base, wrong, tmp_path / "wrong.gguf")
    with pytest.raises(InputError, match="does not fit|another base") as err:
        medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024, lora=[lora])
    print(err.value)
    with pytest.raises(InputError, match="not found"):
        medgemma_edge.load(tiny_bundle_f32, threads=2, context=1024, lora=[tmp_path / "missing.gguf"])


def test_merged_hf_folder_matches_peft(tmp_path, tiny_dir, adapters, peft_logits):
    """The merged checkpoint folder the ONNX export builds from, read back by transformers."""
    from medgemma_edge.export.lora import open_with_adapter
    from medgemma_edge.export.lora_hf import write_merged_checkpoint

    want, chats = peft_logits
    for name in ("rslora", "saved"):
        merged = write_merged_checkpoint(open_with_adapter(tiny_dir, adapters[name]), tmp_path / name / "tiny")
        for chat, messages in chats.items():
            _compare(ref.next_token_logits(merged, messages), want[(name, chat)], f"merged folder {name}, {chat}")


def test_merged_onnx_matches_peft(tmp_path, tiny_dir, adapters, peft_logits):
    import medgemma_edge
    from medgemma_edge.export.lora_hf import export_onnx_merged

    want, chats = peft_logits
    t0 = time.perf_counter()
    bundle = export_onnx_merged(tiny_dir, tmp_path / "onnx", "fp32", "onnx-f32", quality=False,
                                adapter=adapters["saved"]).bundle
    print(f"onnx export with adapter: {time.perf_counter() - t0:.1f} s")
    model = medgemma_edge.load(bundle, threads=2, context=2048, fit="stretch")
    assert model.manifest["adapter"]["name"] == "saved"
    for chat, messages in chats.items():
        _compare(model.next_token_logits(messages), want[("saved", chat)], f"onnx fp32 + saved, {chat}")


def test_cli_lora_out_then_ask_with_lora(tmp_path, tiny_dir, tiny_bundle_f32, adapters):
    """`export SRC --adapter DIR --lora-out FILE` (no bundle) and `ask --lora FILE` on the base bundle."""
    from medgemma_edge.cli import main

    lora = tmp_path / "text-lora.gguf"
    res = CliRunner().invoke(main, ["export", str(tiny_dir), "--adapter", str(adapters["text"]), "--lora-out", str(lora)])
    print(res.output)
    assert res.exit_code == 0 and lora.is_file() and not (tmp_path / "bundle").exists()
    args = ["ask", "Hi", "-m", str(tiny_bundle_f32), "--max-tokens", "2", "--threads", "2", "--context", "512"]
    res = CliRunner().invoke(main, args + ["--lora", str(lora)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, args + ["--lora", str(tmp_path / "nope.gguf")])
    print(res.output)
    assert res.exit_code == 2 and "not found" in res.output
