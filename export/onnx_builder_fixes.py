"""onnxruntime-genai 0.18.0's model builder, made to build MedGemma's text decoder correctly.

Each fix answers one defect of the builder as published (checked with transformers 4.57):

- It imports `Qwen3_5*ForConditionalGeneration`, names only transformers 5 has: placeholders are
  put into the transformers namespace for the import and taken out again (`import_builder`).
- It needs `onnx_ir`, which it does not declare: the `export` extra lists it.
- It loads a tokenizer from the checkpoint folder and writes genai_config.json and the tokenizer
  files beside the graph: we read neither (the runtime has its own vocabulary), so the config is
  given to it directly and both writers are skipped (`DecoderBuilder.make_genai_config`, …).
- It crashes on `rope_scaling: null` (Gemma 3 270M / 1B): such a config gets the default rope.
- **Rope of the sliding layers.** Gemma 3 4B+ scales rope linearly ×8 on the *global* layers only;
  transformers builds the sliding layers' rope with the default type and `rope_local_base_freq`.
  The builder applies the ×8 to the local cos/sin caches too (5 of 6 layers wrong). We build the
  local caches unscaled (`fix_local_rope`; tests/test_onnx_decoder.py shows it matters).
- **Attention mask.** Its GroupQueryAttention nodes are causal with a sliding window; Gemma 3's
  image tokens see each other both ways within one image. Every GQA node gets `causal=0`,
  `local_window_size=-1` and an `attention_bias` input (one graph input per layer type, named in
  `BIAS_INPUTS`), which the runtime fills with the causal, window and same-image rules.
- **Memory.** It loads the checkpoint in float32 and quantizes a whole-graph copy: ~33 GB for
  MedGemma 4B by arithmetic. `lean` builds the same graph on a 24 GB machine (export/onnx_lean.py).
"""

from __future__ import annotations

import contextlib
import importlib
import sys

# Graph inputs we add: the additive attention bias [1, 1, S, total] per layer type.
BIAS_INPUTS = {"sliding": "attention_bias_sliding", "full": "attention_bias_full"}
TRANSFORMERS_5_NAMES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")


@contextlib.contextmanager
def _transformers_5_placeholders():
    import transformers

    added = []
    for name in TRANSFORMERS_5_NAMES:
        if not hasattr(transformers, name):
            setattr(transformers, name, type(name, (), {"__doc__": "placeholder: needs transformers 5"}))
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            delattr(transformers, name)


def import_builder():
    """The builder module (`onnxruntime_genai.models.builder`), imported under transformers 4."""
    if "onnxruntime_genai.models.builder" in sys.modules:
        return sys.modules["onnxruntime_genai.models.builder"]
    try:
        import onnx_ir  # noqa: F401  (the builder needs it but does not declare it)
    except ImportError as e:
        raise ImportError("the ONNX decoder export needs onnx_ir: pip install 'medgemma-edge[export]'") from e
    with _transformers_5_placeholders():
        return importlib.import_module("onnxruntime_genai.models.builder")


def load_config(src, architecture: str):
    """The checkpoint's config as the builder reads it: `architectures` filled in (a config saved
    from a bare config object has none) and `rope_scaling: null` made the default rope."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src))
    config.architectures = [architecture]
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is not None and getattr(cfg, "rope_scaling", "absent") is None:
            cfg.rope_scaling = {"rope_type": "default"}
    return config


def decoder_builder_class(Gemma3Model, *, fix_local_rope: bool = True, lean: bool = True, progress=None):
    """A subclass of the builder's Gemma3Model with the rope and attention fixes; lean: weights in
    their stored width and quantization one weight at a time (export/onnx_lean.py)."""
    import onnx_ir as ir

    from medgemma_edge.export import onnx_lean

    class DecoderBuilder(Gemma3Model):
        def load_weights(self, input_path):
            plain = input_path.endswith(".gguf") or self.quant_type is not None or "adapter_path" in self.extra_options
            if not lean or plain:
                return super().load_weights(input_path)
            return onnx_lean.load_lean(self, input_path)

        def to_nbits(self):
            if not lean or self.quant_attrs["use_qdq"]:
                return super().to_nbits()
            return onnx_lean.quantize_streamed(self, progress)

        def make_rotary_embedding_multi_cache(self):
            if not fix_local_rope:
                return super().make_rotary_embedding_multi_cache()
            # Global caches: the checkpoint's rope (linear ×8 on MedGemma 4B). Local caches: the
            # default rope at rope_local_base_freq, no scaling — as transformers' Gemma3 does.
            self.cos_cache_global_name, self.sin_cache_global_name = "cos_cache_global", "sin_cache_global"
            self.cos_cache_local_name, self.sin_cache_local_name = "cos_cache_local", "sin_cache_local"
            super().make_rotary_embedding_caches(
                cos_cache_name=self.cos_cache_global_name, sin_cache_name=self.sin_cache_global_name)
            scale = self.rope_attrs["rescale_factors"]
            self.rope_attrs.update(create_caches=True, theta=self.rope_local_theta, rescale_factors=1.0)
            super().make_rotary_embedding_caches(
                cos_cache_name=self.cos_cache_local_name, sin_cache_name=self.sin_cache_local_name)
            self.rope_attrs["rescale_factors"] = scale

        def make_model(self, input_path):
            super().make_model(input_path)
            self.open_attention()

        def open_attention(self):
            """causal=0 and no window on every GQA node; the mask comes from an attention_bias input."""
            graph, biases, n = self.model.graph, {}, 0
            for node in graph:
                if node.op_type != "GroupQueryAttention":
                    continue
                layer = int(node.name.split("/model/layers.")[1].split("/")[0])
                kind = "sliding" if self.is_local(layer) else "full"
                if kind not in biases:
                    biases[kind] = self.make_value(BIAS_INPUTS[kind], ir.DataType.FLOAT,
                                                   [1, 1, "sequence_length", "total_sequence_length"])
                    graph.inputs.append(biases[kind])
                node.attributes["causal"] = ir.AttrInt64("causal", 0)
                node.attributes["local_window_size"] = ir.AttrInt64("local_window_size", -1)
                node.replace_input_with(10, biases[kind])  # GQA input 10: attention_bias
                n += 1
            if n != self.num_layers:
                raise RuntimeError(f"found {n} GroupQueryAttention nodes for {self.num_layers} layers — "
                                   "this onnxruntime-genai builder lays out attention differently; pin 0.18.0")

        def make_genai_config(self, *args, **kwargs):
            pass  # onnxruntime-genai's own runtime config: unused (and it wants the tokenizer)

        def save_processing(self, *args, **kwargs):
            pass  # tokenizer files: the bundle carries its own vocabulary

    return DecoderBuilder


def details(builder, src, config) -> dict:
    """What `parse_extra_options` wants from `get_hf_details`, without loading a tokenizer."""
    return {"extra_kwargs": {}, "hf_name": str(src), "hf_config": config}


@contextlib.contextmanager
def patched(builder, src, config, *, fix_local_rope: bool = True, lean: bool = True, progress=None):
    """Inside: the builder module reads our config and builds Gemma 3 with DecoderBuilder."""
    saved = builder.get_hf_details, builder.Gemma3Model
    builder.get_hf_details = lambda *a, **k: details(builder, src, config)
    builder.Gemma3Model = decoder_builder_class(saved[1], fix_local_rope=fix_local_rope, lean=lean,
                                                progress=progress)
    try:
        yield
    finally:
        builder.get_hf_details, builder.Gemma3Model = saved
