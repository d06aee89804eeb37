"""medgemma-edge runtime: images and DICOM in, MedGemma answers out. No torch, no transformers."""

__version__ = "0.1.0"

from runtime.errors import BundleError, InputError, MedGemmaEdgeError  # noqa: E402

__all__ = ["__version__", "load", "MedGemmaEdgeError", "InputError", "BundleError"]


def load(bundle_dir, device="auto", threads=None, context=None, fit=None, **options):
    """Load a bundle: see `runtime.model.load` (options: image_cache_dir, image_cache_mb).
    Imported lazily so `import runtime` stays light."""
    from runtime.model import load as _load
    from runtime.preprocess import DEFAULT_FIT

    return _load(bundle_dir, device=device, threads=threads, context=context, fit=fit or DEFAULT_FIT, **options)
