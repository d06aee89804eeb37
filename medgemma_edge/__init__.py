"""medgemma-edge: offline MedGemma. `model = medgemma_edge.load(bundle_dir)`, then `model.chat(...)`.

The face of the package: `load`, the error types, `__version__`, `longitudinal_messages` (a prior
X-ray beside the current one, medgemma_edge/longitudinal.py) and the CLI (`medgemma_edge.cli`).
The design card's folders install beneath it: `medgemma_edge.runtime` (no torch at run time),
`medgemma_edge.export` (checkpoint → bundle) and `medgemma_edge.kernels` (numeric inner loops).
"""

from medgemma_edge.runtime import __version__
from medgemma_edge.runtime.errors import BundleError, ExportError, InputError, MedGemmaEdgeError
from medgemma_edge.longitudinal import longitudinal_messages

__all__ = ["__version__", "load", "longitudinal_messages", "MedGemmaEdgeError", "InputError", "BundleError",
           "ExportError"]


def load(bundle_dir, device="auto", threads=None, context=None, fit=None, **options):
    """Load a bundle folder made by `medgemma-edge export`; see `medgemma_edge.runtime.model.load`
    (options: image_cache_dir, image_cache_mb, vision). Imported lazily so `import medgemma_edge` stays light."""
    from medgemma_edge.runtime.model import load as _load
    from medgemma_edge.runtime.preprocess import DEFAULT_FIT

    return _load(bundle_dir, device=device, threads=threads, context=context, fit=fit or DEFAULT_FIT, **options)
