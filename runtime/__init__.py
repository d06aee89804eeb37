"""medgemma-edge runtime: images and DICOM in, MedGemma answers out. No torch, no transformers."""

__version__ = "0.1.0"

from runtime.errors import BundleError, InputError, MedGemmaEdgeError  # noqa: E402

__all__ = ["__version__", "MedGemmaEdgeError", "InputError", "BundleError"]
