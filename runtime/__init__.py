"""The runtime: images and DICOM in, MedGemma answers out. No torch, no transformers.

Apps import the face, `medgemma_edge` (`medgemma_edge.load`), not this package.
"""

__version__ = "0.1.0"
