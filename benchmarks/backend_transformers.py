"""transformers on CPU, the reference implementation users reach for first, on the same checkpoint.

Preprocessing is HF's: `transformers.image_utils.load_image` + the checkpoint's
`Gemma3ImageProcessor`. For DICOM, which transformers does not read, the anchor is what a user
writes after Google's notebooks: pydicom, the modality LUT, a window, uint8 RGB, then the same
processor (written here for the benchmark, kept to the notebook recipe's steps).

Generation is greedy with the KV cache, one stage at a time so each has its own clock:
`get_image_features` (encode), one forward over the prompt embeddings with the image features
scattered in (prefill, with token_type_ids so the image block is bidirectional, as in
`generate`), then one-token forwards (decode).
"""

from __future__ import annotations

import time

import numpy as np

from benchmarks.backends import Backend, Case

CT_WINDOWS = ((-1024, 1024), (-135, 215), (0, 80))  # MedGemma 1.5 notebook: R, G, B in HU


def _dicom_xray_rgb(path: str):
    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-6) * 255
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = 255 - arr
    return Image.fromarray(np.round(arr).astype(np.uint8)).convert("RGB")


def _dicom_ct_rgb(folder: str) -> list:
    from pathlib import Path

    import pydicom
    from PIL import Image
    from pydicom.pixels import apply_modality_lut

    slices = sorted((pydicom.dcmread(p) for p in Path(folder).glob("*.dcm")), key=lambda d: int(d.InstanceNumber))
    images = []
    for ds in slices:
        hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
        rgb = [np.round((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255) for lo, hi in CT_WINDOWS]
        images.append(Image.fromarray(np.stack(rgb, -1).astype(np.uint8)))
    return images


class TransformersBackend(Backend):
    def __init__(self, checkpoint: str, threads: int, dtype: str = "float32"):
        self.checkpoint, self.threads, self.dtype = checkpoint, threads, dtype
        self.model = self.processor = None
        self._image_processor = None

    def _processor(self):
        from transformers import AutoProcessor

        if self.processor is None:
            self.processor = AutoProcessor.from_pretrained(self.checkpoint)
        return self.processor

    def preprocess(self, kind: str, path: str):
        from transformers.image_utils import load_image

        proc = self._processor().image_processor
        readers = {"png": lambda: load_image(path), "dicom16": lambda: _dicom_xray_rgb(path),
                   "ct_series": lambda: _dicom_ct_rgb(path)}
        read = readers.get(kind)
        return None if read is None else (lambda: proc(read(), return_tensors="pt")["pixel_values"])

    def imports(self) -> None:
        import torch  # noqa: F401
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration  # noqa: F401

    def load(self) -> dict:
        import torch
        from transformers import Gemma3ForConditionalGeneration

        torch.set_num_threads(self.threads)
        self.model = Gemma3ForConditionalGeneration.from_pretrained(
            self.checkpoint, torch_dtype=getattr(torch, self.dtype), low_cpu_mem_usage=True).eval()
        self._processor()
        return {"dtype": self.dtype}

    def _inputs(self, messages) -> dict:
        return self._processor().apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt")

    def _generate(self, inputs: dict, n: int, stats: dict, t0: float) -> dict:
        """Prefill (image features already in `inputs['inputs_embeds']` if any) and greedy decode."""
        t1 = time.perf_counter()
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        tok = out.logits[0, -1].argmax()
        t2 = time.perf_counter()
        stats["ttft_s"] = round(t2 - t0, 4)
        n_prompt = int(inputs["attention_mask"].shape[1])
        stats["prompt_tokens"] = n_prompt
        stats["prefill_tok_s"] = round(n_prompt / (t2 - t1), 2)
        cache = out.past_key_values
        for _ in range(n - 1):
            out = self.model(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache, tok = out.past_key_values, out.logits[0, -1].argmax()
        t3 = time.perf_counter()
        stats["decode_tok_s"] = round((n - 1) / (t3 - t2), 2) if n > 1 else None
        stats["decode_tokens"] = n
        return stats

    def ask(self, case: Case) -> dict:
        import torch
        from transformers.image_utils import load_image

        t0 = time.perf_counter()
        messages = [{"role": "system", "content": [{"type": "text", "text": case.system}]},
                    {"role": "user", "content": [{"type": "image", "image": load_image(case.image)},
                                                 {"type": "text", "text": case.question}]}]
        inputs = self._inputs(messages)
        stats = {"preprocess_ms": round((time.perf_counter() - t0) * 1e3, 2)}
        with torch.inference_mode():
            te = time.perf_counter()
            pixels = inputs.pop("pixel_values").to(self.model.dtype)
            features = self.model.get_image_features(pixels)
            stats["image_encode_s"] = round(time.perf_counter() - te, 3)
            ids = inputs.pop("input_ids")
            embeds = self.model.get_input_embeddings()(ids)
            mask = (ids == self.model.config.image_token_id).unsqueeze(-1).expand_as(embeds)
            inputs["inputs_embeds"] = embeds.masked_scatter(mask, features.to(embeds.dtype))
            return self._generate(inputs, case.decode_tokens, stats, t0)

    def text_only(self, case: Case) -> dict:
        import torch

        messages = [{"role": "system", "content": [{"type": "text", "text": "You are a helpful medical assistant."}]},
                    {"role": "user", "content": [{"type": "text", "text": case.text_prompt()}]}]
        t0 = time.perf_counter()
        inputs = self._inputs(messages)
        inputs.pop("token_type_ids", None)
        with torch.inference_mode():
            return self._generate(inputs, case.decode_tokens, {}, t0)

    def close(self) -> None:
        self.model = None
