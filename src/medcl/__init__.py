"""medcl: domain-specific contrastive pretraining of medical imaging backbones.

Implements USCL (Chen et al., MICCAI 2021) for ultrasound video pretraining of 2D backbones and
MixCL (Li, Quan, Zhou) for pixel-label contrastive pretraining of UNETR encoders, with ingestion,
leakage-free evaluation, reports and export around them.
"""

from medcl._version import __version__  # noqa: F401


def __getattr__(name: str):
    # Lazy: `import medcl` stays light (no torch import) until the loader is used.
    if name == "load_backbone":
        from medcl.weights import load_backbone

        return load_backbone
    raise AttributeError(f"module 'medcl' has no attribute {name!r}")
