"""llama.cpp as a user would drive it directly: llama-cpp-python's `Llama` with its own multimodal
handler (`MTMDChatHandler`, the generic mtmd one in 0.3.36; there is no Gemma 3 specific class),
its own image decoding and preprocessing (stb_image + clip's resize in mtmd), on the same GGUF
files as our bundle.

Stage numbers:
- ttft_s: wall clock from `create_chat_completion(stream=True)` to its first chunk;
- decode tok/s: the wall-clock rate between the first and the last streamed chunk (tokens counted
  by llama.cpp's `llama_perf_context`);
- image_encode_s: mtmd's own log line for the call ("image slice encoded in N ms");
- prefill tok/s: llama_perf_context's prompt tokens over its prompt-eval time minus that encode
  (its clock runs from the first text batch to the next sync, across the image encode);
- preprocessing: `mtmd_helper_bitmap_init_from_buf` (PNG decode) + `mtmd_tokenize` (resize,
  normalize), the first half of what the handler does per call. It reads no DICOM.
"""

from __future__ import annotations

import base64
import ctypes
import re
import time

from benchmarks.backends import Backend, Case


ENCODED = re.compile(r"encoded in (\d+(?:\.\d+)?) ms")  # mtmd: "image slice encoded in 55012 ms"
DECODED = re.compile(r"decoded \(batch [^)]*\) in (\d+(?:\.\d+)?) ms")  # "image decoded (batch 1/1) in 1777 ms"


def _logged_ms(lines: list[str], pattern) -> float:
    return sum(float(m.group(1)) for line in lines for m in [pattern.search(line)] if m)


class LlamaCppBackend(Backend):
    needs_load_to_preprocess = True

    def __init__(self, text_gguf: str, threads: int, mmproj: str | None = None, context: int = 4096):
        self.text_gguf, self.mmproj, self.threads, self.context = text_gguf, mmproj, threads, context
        self.llm = self.handler = None
        self._history: list = []

    # -- load ----------------------------------------------------------------------------------
    def imports(self) -> None:
        import llama_cpp
        from llama_cpp import mtmd_cpp
        import llama_cpp.llama_chat_format  # noqa: F401

        # mtmd logs every prompt and image at info level even with verbose=False, its own
        # timings among them ("image slice encoded in N ms"): keep those lines, print nothing.
        @llama_cpp.llama_log_callback
        def keep_timings(level, text, user_data):
            line = text.decode("utf-8", "replace") if text else ""
            if " in " in line and " ms" in line:
                self._timing_lines.append(line)

        self._timing_lines: list[str] = []
        self._log_callback = keep_timings  # must outlive every call from C
        llama_cpp.llama_log_set(keep_timings, None)
        mtmd_cpp.mtmd_log_set(keep_timings, None)
        mtmd_cpp.mtmd_helper_log_set(keep_timings, None)

    def load(self) -> dict:
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import MTMDChatHandler

        if self.mmproj:
            self.handler = MTMDChatHandler(clip_model_path=self.mmproj, verbose=False, use_gpu=False)
        self.llm = Llama(model_path=self.text_gguf, chat_handler=self.handler, n_ctx=self.context,
                         n_batch=512, n_ubatch=512, n_threads=self.threads,
                         n_threads_batch=self.threads, n_gpu_layers=0, verbose=False)
        if self.handler is not None:
            # The handler opens the vision file on its first call; open it now so that "load"
            # means ready for an image question (private method, llama-cpp-python 0.3.36).
            self.handler._init_mtmd_context(self.llm)
        return {}

    # -- preprocessing -------------------------------------------------------------------------
    def preprocess(self, kind: str, path: str):
        if kind != "png" or self.handler is None:
            return None  # llama.cpp reads PNG/JPEG through stb_image; no DICOM
        with open(path, "rb") as fh:
            data = fh.read()
        return lambda: self._free(self._tokenize_image(data))

    def _tokenize_image(self, data: bytes):
        """Bytes -> mtmd chunks holding the preprocessed image, the way the handler makes them."""
        m = self.handler._mtmd_cpp
        ctx = self.handler.mtmd_ctx
        buf = (ctypes.c_uint8 * len(data)).from_buffer(bytearray(data))
        bitmap = m.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(data), False)
        if not bitmap:
            raise RuntimeError("mtmd could not decode the image")
        marker = m.mtmd_default_marker()
        text = m.mtmd_input_text()
        text.text, text.text_len, text.add_special, text.parse_special = marker, len(marker), False, True
        chunks = m.mtmd_input_chunks_init()
        rc = m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), (m.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
        m.mtmd_bitmap_free(bitmap)
        if rc != 0:
            m.mtmd_input_chunks_free(chunks)
            raise RuntimeError(f"mtmd_tokenize failed ({rc})")
        return chunks

    def _free(self, chunks) -> None:
        self.handler._mtmd_cpp.mtmd_input_chunks_free(chunks)

    # -- conversation --------------------------------------------------------------------------
    def _complete(self, messages, n: int) -> tuple[str, dict]:
        import llama_cpp

        ctx = self.llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        self._timing_lines.clear()
        t0 = time.perf_counter()
        stream = self.llm.create_chat_completion(messages=messages, stream=True, max_tokens=n,
                                                 temperature=0.0, top_k=1, repeat_penalty=1.0)
        stamps, text = [], ""
        for chunk in stream:
            stamps.append(time.perf_counter())
            text += chunk["choices"][0]["delta"].get("content") or ""
        perf = llama_cpp.llama_perf_context(ctx)
        # n_eval counts the one-token batches: the prompt's last token, evaluated again by
        # Llama.generate before sampling, and one per generated token after the first.
        decode_evals = max(perf.n_eval - 1, 0)
        wall = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
        encode_ms = _logged_ms(self._timing_lines, ENCODED)
        # The prompt-eval clock runs from the first text batch to the next sync, so it holds the
        # image encode too; mtmd's own "encoded in" lines say how much of it that was.
        prompt_ms = perf.t_p_eval_ms - encode_ms
        stats = {
            "ttft_s": round(stamps[0] - t0, 4) if stamps else None,
            "prompt_tokens": int(perf.n_p_eval),
            "prefill_tok_s": round(perf.n_p_eval / prompt_ms * 1e3, 2) if prompt_ms > 0 else None,
            "image_encode_s": round(encode_ms / 1e3, 3) if encode_ms else None,
            "image_decode_s": round(_logged_ms(self._timing_lines, DECODED) / 1e3, 3) or None,
            "decode_tok_s": round(decode_evals / wall, 2) if wall > 0 and decode_evals else None,
            "decode_tok_s_c": round(perf.n_eval / perf.t_eval_ms * 1e3, 2) if perf.t_eval_ms else None,
            "decode_tokens": decode_evals + 1,
        }
        return text, stats

    def _image_messages(self, case: Case) -> list:
        with open(case.image, "rb") as fh:
            url = "data:image/png;base64," + base64.b64encode(fh.read()).decode()
        return [{"role": "system", "content": case.system},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": case.question}]}]

    def ask(self, case: Case) -> dict:
        self._history = self._image_messages(case)
        text, stats = self._complete(self._history, case.decode_tokens)
        self._history.append({"role": "assistant", "content": text})
        return stats

    def follow_up(self, case: Case) -> dict:
        # The handler clears the KV cache and encodes every image again on each call.
        return self._complete(self._history + [{"role": "user", "content": case.follow_up}], 2)[1]

    def text_only(self, case: Case) -> dict:
        messages = [{"role": "system", "content": "You are a helpful medical assistant."},
                    {"role": "user", "content": case.text_prompt()}]
        return self._complete(messages, case.decode_tokens)[1]

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
        self.llm = self.handler = None
