"""Named presets for the model card's tasks: system prompt, answer length, thinking, and for
localization the shipped JSON schema of the answer.

`longitudinal-cxr` (a prior X-ray beside the current one) follows Google's notebook instead
(notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb): no system prompt, 600 tokens,
and its prompt as the default question (`ask --preset longitudinal-cxr --image NOW --prior THEN`).

System prompts follow the card's guidance ("You are an expert radiologist." for image tasks, "You
are a helpful medical assistant." for text); the card evaluated single-turn, greedy answers.
Thinking (MedGemma 1.5 / 27B) is on for text questions, where the 1.5 release reports it helps,
and off for image reports, whose answers are long already. A caller's explicit options override
the preset's (`apply`). The schema is named, not loaded: the shipped files belong to the package's
face (medgemma_edge/structured.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medgemma_edge.runtime.errors import InputError

RADIOLOGIST = "You are an expert radiologist."  # the model card's system prompt for image tasks
ASSISTANT = "You are a helpful medical assistant."  # ... and for text tasks
# Google's longitudinal CXR notebook's prompt, verbatim (medgemma_edge/longitudinal.py cites it).
LONGITUDINAL_CXR = ("Provide a comparison of these two images and include details from\n"
                    "the image which students should take note of when reading longitudinal CXR\n")

LAB_REPORT = "Read every test result of this lab report."  # lab-report's question when PROMPT is left out


@dataclass(frozen=True)
class Preset:
    name: str
    task: str  # one line for `medgemma-edge presets`
    system: str | None  # None: none of its own (with a prior image: no system prompt at all)
    max_new_tokens: int
    think: bool = False
    json_schema: str | None = None  # a shipped schema's name (medgemma_edge/schemas/NAME.json)
    question: str | None = None  # what `ask` asks when no PROMPT is given

    def as_dict(self) -> dict:
        return asdict(self)


PRESETS = {p.name: p for p in (
    Preset("cxr-report", "chest X-ray: findings and impression", RADIOLOGIST, 512),
    Preset("cxr-findings", "chest X-ray: findings as JSON over the CheXpert labels", RADIOLOGIST, 512,
           json_schema="cxr_findings"),
    Preset("localize", "boxes around what is asked for (box_2d JSON, MedGemma 1.5)", RADIOLOGIST, 256,
           json_schema="box_2d"),
    Preset("longitudinal-cxr", "a prior chest X-ray beside the current one (ask --prior; Google's notebook)",
           None, 600, question=LONGITUDINAL_CXR),
    Preset("ct-series", "a question about a CT or MR series (DICOM folder)", RADIOLOGIST, 512),
    Preset("dermatology", "a skin photograph", "You are an expert dermatologist.", 384),
    Preset("pathology", "a histopathology patch", "You are an expert pathologist.", 384),
    Preset("pathology-slide", "a whole slide's patches (ask --image slide.svs; Google's notebook: no system "
           "prompt, the question first)", None, 500),
    Preset("lab-report", "a lab report (text, photo or PDF) as JSON", ASSISTANT, 1024, json_schema="lab_report",
           question=LAB_REPORT),
    Preset("text-qa", "a medical question in text (thinks first)", ASSISTANT, 1024, think=True),
)}


def card_system(has_images: bool) -> str:
    """The model card's system prompt for a question that names none: image task or text."""
    return RADIOLOGIST if has_images else ASSISTANT


def get_preset(name) -> Preset:
    preset = PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        raise InputError(f"unknown preset {str(name)!r:.40} — use one of {', '.join(PRESETS)}")
    return preset


def apply(preset: Preset | None, explicit: dict) -> dict:
    """{system, max_new_tokens, think, json_schema}: the preset's values where `explicit` holds None."""
    base = {"system": None, "max_new_tokens": None, "think": None, "json_schema": None}
    if preset is not None:
        base.update(system=preset.system, max_new_tokens=preset.max_new_tokens, think=preset.think,
                    json_schema=preset.json_schema)
    return {k: explicit.get(k) if explicit.get(k) is not None else v for k, v in base.items()}
