"""The transformers reference every backend test compares against.

One place runs a checkpoint through transformers (float32, eager attention, CPU): next-token logits
for a chat, greedy generation, image features. Messages are in the transformers chat style:
`{"role": ..., "content": [{"type": "text", "text": ...}, {"type": "image", "image": PIL.Image}]}`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np


# Prompts the greedy-equality tests of every export format run on the real 270M weights.
GREEDY_PROMPTS = [
    "What is the normal range of adult resting heart rate?",
    "Name three common causes of chest pain.",
    "Explain what an X-ray is in one sentence.",
    "What does the liver do?",
    "Write a short note reminding a patient to take their medicine.",
]
GREEDY_TOKENS = 32


@functools.lru_cache(maxsize=4)
def load(checkpoint: str):
    """(model, processor_or_tokenizer, is_multimodal) for a checkpoint directory, cached per run."""
    import torch
    from transformers import (AutoProcessor, AutoTokenizer, Gemma3ForCausalLM,
                              Gemma3ForConditionalGeneration)

    cfg = json.loads((Path(checkpoint) / "config.json").read_text())
    multimodal = "vision_config" in cfg
    cls = Gemma3ForConditionalGeneration if multimodal else Gemma3ForCausalLM
    model = cls.from_pretrained(checkpoint, torch_dtype=torch.float32, attn_implementation="eager").eval()
    proc = AutoProcessor.from_pretrained(checkpoint) if multimodal else AutoTokenizer.from_pretrained(checkpoint)
    return model, proc, multimodal


def _listed(messages):
    """Processors want every content as a list of items; plain strings become one text item."""
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def encode_chat(checkpoint, messages, add_generation_prompt: bool = True) -> dict:
    """Model inputs (input_ids, attention_mask, pixel_values, token_type_ids) for a chat."""
    _, proc, multimodal = load(str(checkpoint))
    messages = _listed(messages) if multimodal else messages
    return proc.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                    tokenize=True, return_dict=True, return_tensors="pt")


def render_chat(checkpoint, messages) -> str:
    _, proc, multimodal = load(str(checkpoint))
    messages = _listed(messages) if multimodal else messages
    return proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def next_token_logits(checkpoint, messages) -> np.ndarray:
    """Float32 logits (vocab,) for the token after the rendered chat prompt."""
    import torch

    model, _, _ = load(str(checkpoint))
    inputs = encode_chat(checkpoint, messages)
    with torch.no_grad():
        out = model(**inputs)
    return out.logits[0, -1].float().numpy()


def logits_for_ids(checkpoint, ids) -> np.ndarray:
    """Logits (len(ids), vocab) of a teacher-forced pass over a plain token-id sequence."""
    import torch

    model, _, _ = load(str(checkpoint))
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)]))
    return out.logits[0].float().numpy()


def greedy_generate(checkpoint, messages, max_new_tokens: int) -> tuple[list[int], np.ndarray]:
    """Greedy token ids after the prompt and the logits (n, vocab) that chose each one."""
    import torch

    model, _, _ = load(str(checkpoint))
    inputs = encode_chat(checkpoint, messages)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    new = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    return new, torch.stack(out.logits, 1)[0].float().numpy()


def drive_greedy(engine, ids, theirs, their_logits) -> tuple[list[int], float]:
    """Greedy decoding on one of our engines (reset / eval_tokens / logits) from the prompt `ids`,
    step by step beside transformers' greedy tokens `theirs` and their logits: (our tokens, worst
    |d| of the logits). Stops after the first token that differs (it is the last one returned)."""
    engine.reset()
    engine.eval_tokens(ids)
    ours, worst = [], 0.0
    for step, want in enumerate(theirs):
        logits = engine.logits()
        worst = max(worst, float(np.abs(logits - their_logits[step]).max()))
        ours.append(int(logits.argmax()))
        if ours[-1] != want:
            break
        engine.eval_tokens([ours[-1]])
    return ours, worst


def image_features(checkpoint, pixel_values: np.ndarray) -> np.ndarray:
    """Projected image embeddings (N, 256, text_hidden) for float32 pixels (N, 3, S, S)."""
    import torch

    model, _, _ = load(str(checkpoint))
    with torch.no_grad():
        feats = model.get_image_features(torch.from_numpy(np.ascontiguousarray(pixel_values)))
    return feats.float().numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_same_logits(ours: np.ndarray, theirs: np.ndarray, what: str, cos_min: float, digits: int = 6) -> None:
    """Next-token logits of ours vs the reference: same top-1, cosine ≥ cos_min (printed with the
    worst |d| either way)."""
    cos = cosine(ours, theirs)
    print(f"{what}: cosine {cos:.{digits}f}, worst |d| {np.abs(ours - theirs).max():.2e}, "
          f"top-1 {int(ours.argmax())} vs {int(theirs.argmax())}")
    assert int(ours.argmax()) == int(theirs.argmax()), f"{what}: top-1 differs"
    assert cos >= cos_min, f"{what}: cosine {cos:.{digits}f} < {cos_min}"


def manifest_files(bundle: Path) -> tuple[dict, dict]:
    """(manifest, {role: path}) of a bundle folder (a role with several files: the last one)."""
    m = json.loads((Path(bundle) / "manifest.json").read_text())
    return m, {f["role"]: Path(bundle) / f["path"] for f in m["files"]}


def assert_verify_names_the_damage(bundle: Path, role: str, tmp_path: Path) -> str:
    """`medgemma-edge verify` passes a copy of `bundle`; with one byte of its `role` file flipped it
    exits 2 with one line naming that file and its sha256 mismatch."""
    import shutil

    from click.testing import CliRunner

    from medgemma_edge.cli import main

    copy = shutil.copytree(bundle, tmp_path / "copy")
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(copy)])
    assert ok.exit_code == 0 and ok.output.startswith("ok:"), ok.output
    damaged = manifest_files(copy)[1][role]
    flip_byte(damaged)
    bad = runner.invoke(main, ["verify", str(copy)])
    print(bad.output)
    lines = [ln for ln in bad.output.splitlines() if ln.strip()]
    assert bad.exit_code == 2 and len(lines) == 1, bad.output
    assert damaged.name in lines[0] and "sha256" in lines[0], lines[0]
    return lines[0]


def near_tie(logits_row: np.ndarray, rel: float = 1e-4) -> tuple[bool, float]:
    """Whether the top-2 logits are within `rel` of each other (relative to the top logit's size)."""
    top2 = np.sort(logits_row)[-2:]
    gap = float(top2[1] - top2[0])
    return gap < rel * max(abs(float(top2[1])), 1.0), gap


def flip_byte(path) -> None:
    """Damage a file in place: one bit of its middle byte flipped (a bad copy, a failing disk)."""
    size = Path(path).stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
