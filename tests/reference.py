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
