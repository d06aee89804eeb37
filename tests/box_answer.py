"""Test helpers for box_2d answers through the real Model: the tiny random model never writes a
box, so only its decoding loop is replaced; decode, preprocessing, encode and prefill all run, and
every picture decode is counted."""

from collections import Counter

BOX_ANSWER = '```json\n[{"box_2d": [500, 250, 750, 750], "label": "nodule"}]\n```'


def answer_with(monkeypatch, answer: str = BOX_ANSWER, piece: int = 9) -> None:
    """Every Model answer becomes `answer`, streamed in pieces of `piece` characters."""
    from medgemma_edge.runtime import generate

    def decode(engine, sampling, vocab, constraint=None, lookahead=None):
        for i in range(0, len(answer), piece):
            yield generate.Step(i, answer[i:i + piece])
        yield generate.Step(None, "", "stop")

    monkeypatch.setattr(generate, "decode", decode)


def count_decodes(monkeypatch) -> Counter:
    """Counts decodes: picture files and bytes (runtime/images.load_image, by a short name of the
    source) and DICOM slices (runtime/dicom/convert, key "dicom slices")."""
    from medgemma_edge.runtime import images
    from medgemma_edge.runtime.dicom import convert

    counted = Counter()
    load_image, decode_all = images.load_image, convert._decode_all

    def counting_image(src, *args, **kwargs):
        counted[f"{len(src)} bytes" if isinstance(src, (bytes, bytearray)) else str(src)] += 1
        return load_image(src, *args, **kwargs)

    def counting_slices(slices):
        counted["dicom slices"] += len(slices)
        return decode_all(slices)

    monkeypatch.setattr(images, "load_image", counting_image)
    monkeypatch.setattr(convert, "_decode_all", counting_slices)
    return counted
