"""Errors a user can act on: one line saying what is wrong and what to do.

The CLI prints the message and exits 2; the server answers 4xx with it. Messages never carry
patient-identifying DICOM values.
"""


class MedGemmaEdgeError(Exception):
    """Base of every error the project raises on purpose."""


class InputError(MedGemmaEdgeError):
    """The user's input (image, DICOM, prompt, option) cannot be used as given."""


class BundleError(MedGemmaEdgeError):
    """A bundle is missing, incomplete, corrupt or of an unknown version."""


class ExportError(MedGemmaEdgeError):
    """A checkpoint cannot be exported as asked."""


class BusyError(MedGemmaEdgeError):
    """The model is answering another caller and did not become free in time; ask again."""
