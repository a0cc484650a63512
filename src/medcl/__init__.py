"""medcl: domain-specific contrastive pretraining of medical imaging backbones.

Implements USCL (Chen et al., MICCAI 2021) for ultrasound video pretraining of 2D backbones and
MixCL (Li, Quan, Zhou) for pixel-label contrastive pretraining of UNETR encoders, with ingestion,
leakage-free evaluation, reports and export around them.
"""

__version__ = "0.1.0"
