"""Our runtime, exactly as a user calls it: `medgemma_edge.load(bundle).chat(messages)`.

Every number comes from the Reply's own stats (preprocess_ms, image_encode_s, prefill_tok_s,
decode_tok_s, ttft_s, reused_tokens, images_from_cache), so the benchmark measures what the
runtime reports to its users.
"""

from __future__ import annotations

import time

from benchmarks.backends import Backend, Case

STAT_KEYS = ("preprocess_ms", "image_encode_s", "prefill_tok_s", "decode_tok_s", "ttft_s",
             "prompt_tokens", "reused_tokens", "images_from_cache")


class RuntimeBackend(Backend):
    """vision: "auto" (what a user gets) or one of the bundle's encodings; repack: "auto" (what a
    user gets: runtime/repack_choice) or True / False (--repack-weights / --no-repack-weights);
    image_cache_dir: the disk image cache a prepared study lives in (`prepare` fills it in one
    process, `ask` in the next reads it); speculative: off here, as a same-file comparison with
    llama.cpp needs — a random-weight model's answers repeat in ways real text does not, so guesses
    would be kept at rates no clinic sees (speculative decoding is measured on real weights:
    benchmarks/bench_speculative.py)."""

    def __init__(self, bundle: str, threads: int, context: int = 4096, fit: str | None = None,
                 vision: str = "auto", repack="auto", image_cache_dir: str | None = None,
                 prepare: bool = False, open_vision: bool = True, speculative: str = "off"):
        self.bundle, self.threads, self.context, self.fit = bundle, threads, context, fit
        self.speculative = speculative
        self.vision, self.repack, self.image_cache_dir = vision, repack, image_cache_dir
        self.open_vision = open_vision  # False for text-only entries: their RSS is the text model's
        self.model = None
        self._history: list = []

    def preprocess(self, kind: str, path: str):
        """File -> uint8 (N, 896, 896, 3) views, the default fit (pad): what Model runs before the
        encoder (its preprocess_ms). Normalizing to float32 is a step of the ONNX vision backend
        (timed as part of its encode); mtmd takes the uint8 view as is."""
        from medgemma_edge.runtime.preprocess import DEFAULT_FIT, model_view
        from medgemma_edge.runtime.sources import load_pictures

        fit = self.fit or DEFAULT_FIT
        return lambda: model_view(load_pictures(path), fit=fit, threads=self.threads)

    def imports(self) -> None:
        import llama_cpp  # noqa: F401
        import medgemma_edge.runtime.model  # noqa: F401

    def load(self) -> dict:
        import medgemma_edge

        t0 = time.perf_counter()
        self.model = medgemma_edge.load(self.bundle, device="cpu", threads=self.threads,
                                        context=self.context, fit=self.fit, vision=self.vision,
                                        repack=self.repack, image_cache_dir=self.image_cache_dir,
                                        speculative=self.speculative)
        text_s = time.perf_counter() - t0
        if self.model.vision_path is not None and self.open_vision:
            # The runtime opens the vision file on the first image; open it now, so that "load"
            # means ready for an image question, as it does for llama.cpp's handler.
            self.model.load_vision()
        vision = (self.model.vision_file or {}).get("quant")
        return {"load_text_s": round(text_s, 3), "model_load_s": self.model.load_s, "vision": vision}

    def prepare(self, case: Case) -> dict:
        """Pre-encode the study (`medgemma-edge encode`): the image and the prompt up to it."""
        t0 = time.perf_counter()
        stats = self.model.prepare(self._study(case))
        return {"prepare_s": round(time.perf_counter() - t0, 3), "image_encode_s": stats.image_encode_s}

    @staticmethod
    def _study(case: Case) -> list:
        return [{"role": "system", "content": case.system},
                {"role": "user", "content": [{"type": "image", "image": case.image}]}]

    def _chat(self, messages, n: int) -> tuple[str, dict]:
        # n tokens, as the other engines decode (a random-weight checkpoint loops: the guard would stop it)
        reply = self.model.chat(messages, max_new_tokens=n, repetition_guard=False)
        stats = {k: reply.stats.as_dict().get(k) for k in STAT_KEYS}
        stats["decode_tokens"] = reply.completion_tokens
        stats["finish_reason"] = reply.finish_reason
        return reply.text, stats

    def ask(self, case: Case) -> dict:
        self._history = self._study(case)
        self._history[-1]["content"].append({"type": "text", "text": case.question})
        text, stats = self._chat(self._history, case.decode_tokens)
        self._history.append({"role": "assistant", "content": text})
        return stats

    def follow_up(self, case: Case) -> dict:
        messages = self._history + [{"role": "user", "content": case.follow_up}]
        _, stats = self._chat(messages, 2)
        return stats

    def text_only(self, case: Case) -> dict:
        messages = [{"role": "system", "content": "You are a helpful medical assistant."},
                    {"role": "user", "content": case.text_prompt()}]
        return self._chat(messages, case.decode_tokens)[1]

    def close(self) -> None:
        self.model = None
