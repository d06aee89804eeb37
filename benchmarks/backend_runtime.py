"""Our runtime, exactly as a user calls it: `runtime.load(bundle).chat(messages)`.

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
    def __init__(self, bundle: str, threads: int, context: int = 4096, fit: str | None = None):
        self.bundle, self.threads, self.context, self.fit = bundle, threads, context, fit
        self.model = None
        self._history: list = []

    def preprocess(self, kind: str, path: str):
        """File -> float32 (N, 3, 896, 896), the default fit (pad), as `medgemma-edge preprocess`."""
        from runtime.inputs import load_pictures
        from runtime.preprocess import DEFAULT_FIT, to_model_input

        return lambda: to_model_input(load_pictures(path), fit=self.fit or DEFAULT_FIT)

    def imports(self) -> None:
        import llama_cpp  # noqa: F401
        import runtime.model  # noqa: F401

    def load(self) -> dict:
        import runtime

        t0 = time.perf_counter()
        self.model = runtime.load(self.bundle, device="cpu", threads=self.threads,
                                  context=self.context, fit=self.fit)
        text_s = time.perf_counter() - t0
        if self.model._vision_path is not None:
            # The runtime opens the vision file on the first image; open it now, so that "load"
            # means ready for an image question, as it does for llama.cpp's handler.
            self.model._vision_encoder()
        return {"load_text_s": round(text_s, 3), "model_load_s": self.model.load_s}

    def _chat(self, messages, n: int) -> tuple[str, dict]:
        run = self.model.chat(messages, max_new_tokens=n, stream=True)
        for _ in run:
            pass
        reply = run.reply
        stats = {k: reply.stats.get(k) for k in STAT_KEYS}
        stats["decode_tokens"] = reply.completion_tokens
        stats["finish_reason"] = reply.finish_reason
        return reply.text, stats

    def ask(self, case: Case) -> dict:
        self._history = [{"role": "system", "content": case.system},
                         {"role": "user", "content": [{"type": "image", "image": case.image},
                                                      {"type": "text", "text": case.question}]}]
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
