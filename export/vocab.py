"""The checkpoint's tokenizer as llama.cpp's "llama" (sentencepiece) vocabulary, and its chat template.

Tokens, scores and types come from `tokenizer.model` (the sentencepiece proto: exact scores) or,
when that is missing or unreadable, from `tokenizer.json`. Added tokens (MedGemma's
`<image_soft_token>` at 262144) are appended. The list is then padded up to the embedding's row
count, because llama.cpp refuses a GGUF whose token list and embedding disagree; added tokens
past the last row (a text-only model given the multimodal tokenizer) are dropped instead.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from medgemma_edge.runtime.errors import ExportError

# llama.cpp token types (gguf.TokenType); sentencepiece's piece types use the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Score llama.cpp's converter gives to added/special tokens: never chosen by score-driven merges.
ADDED_SCORE = -1000.0

SPECIAL_STRINGS = {
    "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
    "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>",
    "start_of_image": "<start_of_image>", "end_of_image": "<end_of_image>",
    "image_soft_token": "<image_soft_token>",
}
REQUIRED_TEXT = ("bos", "eos", "start_of_turn", "end_of_turn")
REQUIRED_IMAGE = ("start_of_image", "end_of_image", "image_soft_token")


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    source: str  # which file the pieces came from
    tokenizer_entries: int  # as the checkpoint's tokenizer has them, before padding or dropping
    model_pieces: int  # entries of the tokenizer model itself; the rest are added tokens
    dropped: list[str] = dataclasses.field(default_factory=list)  # added tokens without an embedding row

    @property
    def padded(self) -> bool:
        return len(self.tokens) > self.tokenizer_entries

    def id_of(self, text: str) -> int | None:
        try:
            return self.tokens.index(text)
        except ValueError:
            return None


def _from_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int]] | None:
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(path.read_bytes())
    except Exception:  # not a sentencepiece proto (e.g. written by a GGUF round trip)
        return None
    if len(proto.pieces) == 0:
        return None
    return ([p.piece for p in proto.pieces], [float(p.score) for p in proto.pieces],
            [int(p.type) for p in proto.pieces])


def _from_tokenizer_json(tj: dict) -> tuple[list[str], list[float], list[int]]:
    """Pieces of a Gemma BPE tokenizer.json. It stores no scores; sentencepiece BPE scores fall
    with the id for ordinary pieces, so `-id` orders merges the same way."""
    model = tj.get("model", {})
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise ExportError(f"tokenizer.json holds a {model.get('type')} model; a Gemma sentencepiece "
                          "BPE tokenizer (tokenizer.model) is needed")
    tokens = [""] * len(vocab)
    for piece, i in vocab.items():
        tokens[i] = piece
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    unk = model.get("unk_token")
    scores, types = [], []
    for i, piece in enumerate(tokens):
        if i in added:
            kind = CONTROL if added[i].get("special") else USER_DEFINED
            scores.append(ADDED_SCORE)
        else:
            kind = BYTE if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else NORMAL
            scores.append(0.0 if kind == BYTE else -float(i))
        if piece == unk:
            kind = UNKNOWN
        types.append(kind)
    return tokens, scores, types


def _added_tokens(src: Path) -> dict[int, tuple[str, bool]]:
    """id → (content, special) for tokens added on top of the tokenizer model.

    tokenizer_config.json / added_tokens.json are read first: they are small, while parsing
    Gemma's tokenizer.json builds Python objects many times its size (it is the fallback)."""
    out: dict[int, tuple[str, bool]] = {}
    cfg_path = src / "tokenizer_config.json"
    if cfg_path.is_file():
        for i, a in json.loads(cfg_path.read_text(encoding="utf-8")).get("added_tokens_decoder", {}).items():
            out[int(i)] = (a["content"], bool(a.get("special")))
    added_path = src / "added_tokens.json"
    if added_path.is_file():
        for content, i in json.loads(added_path.read_text(encoding="utf-8")).items():
            out.setdefault(int(i), (content, True))
    tj_path = src / "tokenizer.json"
    if not out and tj_path.is_file():
        for a in json.loads(tj_path.read_text(encoding="utf-8")).get("added_tokens", []):
            out[int(a["id"])] = (a["content"], bool(a.get("special")))
    return out


def read_vocab(src: Path) -> Vocab:
    """Token list, scores and types of a checkpoint's tokenizer, with its added tokens appended."""
    sp_path, tj_path = src / "tokenizer.model", src / "tokenizer.json"
    pieces = _from_sentencepiece(sp_path) if sp_path.is_file() else None
    source = "tokenizer.model"
    if pieces is None:
        if not tj_path.is_file():
            what = "tokenizer.model is not a sentencepiece model and there is no tokenizer.json" \
                if sp_path.is_file() else "no tokenizer.model or tokenizer.json"
            raise ExportError(f"{what} in {src}; copy the tokenizer files of the original model into it")
        pieces = _from_tokenizer_json(json.loads(tj_path.read_text(encoding="utf-8")))
        source = "tokenizer.json"
    tokens, scores, types = (list(x) for x in pieces)
    model_pieces = len(tokens)
    for i, (content, special) in sorted(_added_tokens(src).items()):
        if i < len(tokens):
            continue  # already a piece of the model (Gemma's control tokens)
        if i != len(tokens):
            raise ExportError(f"added token {content!r} has id {i} but the vocabulary ends at {len(tokens)}; "
                              "the tokenizer files disagree")
        tokens.append(content)
        scores.append(ADDED_SCORE)
        types.append(CONTROL if special else USER_DEFINED)
    return Vocab(tokens, scores, types, source, tokenizer_entries=len(tokens), model_pieces=model_pieces)


def fit_vocab(vocab: Vocab, embedding_rows: int) -> Vocab:
    """Make the token list exactly as long as the embedding has rows.

    MedGemma's embedding has 262208 rows for 262145 tokenizer entries; llama.cpp checks that the
    token list and the embedding agree. Padding (rather than trimming rows) keeps every row of the
    checkpoint, so ids and weights stay exactly as trained. Placeholders continue Gemma's own
    `<unusedN>` numbering and are typed UNUSED, so no text ever tokenizes to them.
    A tokenizer longer than the embedding is accepted only when the surplus is added tokens the
    model could never embed (Gemma 3 text models shipped with `<image_soft_token>`); they are dropped.
    """
    n = len(vocab.tokens)
    if n > embedding_rows:
        if vocab.model_pieces > embedding_rows:
            raise ExportError(f"tokenizer has {vocab.model_pieces} pieces but the embedding only {embedding_rows} "
                              "rows; the tokenizer belongs to another model")
        return dataclasses.replace(vocab, tokens=vocab.tokens[:embedding_rows], scores=vocab.scores[:embedding_rows],
                                   types=vocab.types[:embedding_rows], dropped=vocab.tokens[embedding_rows:])
    used = [int(m.group(1)) for t in vocab.tokens if (m := re.fullmatch(r"<unused(\d+)>", t))]
    first = max(used, default=-1) + 1
    extra = [f"<unused{first + k}>" for k in range(embedding_rows - n)]
    clash = set(extra) & set(vocab.tokens)
    if clash:
        raise ExportError(f"placeholder token {sorted(clash)[0]} already exists; cannot pad the vocabulary")
    return dataclasses.replace(vocab, tokens=vocab.tokens + extra, scores=vocab.scores + [ADDED_SCORE] * len(extra),
                               types=vocab.types + [UNUSED] * len(extra))


def read_chat_template(src: Path) -> str:
    """The checkpoint's chat template (chat_template.jinja, chat_template.json or tokenizer_config.json)."""
    jinja = src / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        path = src / name
        if not path.is_file():
            continue
        tpl = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        if isinstance(tpl, str) and tpl.strip():
            return tpl
    raise ExportError(f"no chat template in {src} (chat_template.jinja or tokenizer_config.json); "
                      "copy it from the original model")


def special_token_ids(vocab: Vocab, multimodal: bool) -> dict[str, int | None]:
    """Ids of the tokens the runtime needs, looked up by their text in the vocabulary."""
    index = {t: i for i, t in enumerate(vocab.tokens[:vocab.tokenizer_entries])}  # not the placeholders
    ids = {key: index.get(text) for key, text in SPECIAL_STRINGS.items()}
    required = REQUIRED_TEXT + (REQUIRED_IMAGE if multimodal else ())
    missing = [SPECIAL_STRINGS[k] for k in required if ids[k] is None]
    if missing:
        raise ExportError(f"tokenizer lacks {', '.join(missing)}; it is not a Gemma 3 / MedGemma tokenizer")
    return ids
