"""The real Gemma 3 tokenizer, rebuilt from a GGUF's token table, with MedGemma's image tokens.

Why not transformers' own GGUF tokenizer loader: it builds a Unigram model from the scores, which
splits plain words wrongly ("hello" -> "hel" + "lo"). Gemma's tokenizer is a sentencepiece BPE
model, so we write that proto (tokens, scores, types from the GGUF) and let transformers convert it
to a fast tokenizer, which then tokenizes exactly as llama.cpp does on the same GGUF.
"""

from __future__ import annotations

from pathlib import Path

# Token ids as in MedGemma (and every Gemma 3 multimodal checkpoint).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
START_OF_TURN_ID, END_OF_TURN_ID = 105, 106
START_OF_IMAGE_ID, END_OF_IMAGE_ID, IMAGE_SOFT_TOKEN_ID = 255999, 256000, 262144

# Written for this project; renders the Gemma turn format with the system message folded into the
# first user turn, images as <start_of_image> (the processor expands each into 256 soft tokens),
# and refuses what Gemma 3's and MedGemma's own template refuses: roles that do not alternate
# user/assistant, content that is neither text nor a list of items.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 is even) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}"
    "{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<start_of_turn>model\n' }}"
    "{%- endif -%}"
)


def read_gguf_vocab(gguf_path: Path) -> tuple[list[str], list[float], list[int]]:
    """Token strings, scores and llama.cpp token types from a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    scores = reader.fields["tokenizer.ggml.scores"]
    types = reader.fields["tokenizer.ggml.token_type"]
    names = [bytes(tokens.parts[i]).decode("utf-8") for i in tokens.data]
    return (names, [float(scores.parts[i][0]) for i in scores.data],
            [int(types.parts[i][0]) for i in types.data])


def write_sentencepiece_model(names, scores, types, out_path: Path) -> None:
    """A sentencepiece BPE ModelProto equivalent to llama.cpp's SPM tokenizer for Gemma."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece_type = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
                  3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
                  5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    model = pb.ModelProto()
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(names)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = UNK_ID, BOS_ID, EOS_ID, PAD_ID
    # Gemma does no text normalization: no dummy prefix, spaces kept as they are.
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = False
    model.normalizer_spec.remove_extra_whitespaces = False
    model.normalizer_spec.escape_whitespaces = True
    for i, (name, score, kind) in enumerate(zip(names, scores, types)):
        piece = model.pieces.add()
        piece.piece, piece.score = name, score
        piece.type = pb.ModelProto.SentencePiece.UNKNOWN if i == UNK_ID else piece_type[kind]
    out_path.write_bytes(model.SerializeToString())


def build_tokenizer(gguf_path: Path, out_dir: Path):
    """Gemma 3 fast tokenizer with `<image_soft_token>` at 262144 and the chat template; saved to out_dir."""
    from transformers import GemmaTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    names, scores, types = read_gguf_vocab(gguf_path)
    sp_path = out_dir / "tokenizer.model"
    write_sentencepiece_model(names, scores, types, sp_path)
    tok = GemmaTokenizerFast(
        vocab_file=str(sp_path), bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
        pad_token="<pad>", add_bos_token=True, add_eos_token=False,
        extra_special_tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    if len(names) != IMAGE_SOFT_TOKEN_ID:
        raise ValueError(f"expected a Gemma 3 vocabulary of {IMAGE_SOFT_TOKEN_ID} tokens, got {len(names)}")
    tok.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tok.chat_template = CHAT_TEMPLATE
    got = {t: tok.convert_tokens_to_ids(t) for t in
           ("<start_of_image>", "<end_of_image>", "<image_soft_token>", "<end_of_turn>")}
    want = {"<start_of_image>": START_OF_IMAGE_ID, "<end_of_image>": END_OF_IMAGE_ID,
            "<image_soft_token>": IMAGE_SOFT_TOKEN_ID, "<end_of_turn>": END_OF_TURN_ID}
    if got != want:
        raise ValueError(f"special token ids {got} differ from MedGemma's {want}")
    tok.save_pretrained(out_dir)
    return tok
