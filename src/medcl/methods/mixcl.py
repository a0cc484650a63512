"""MixCL: pixel labels in contrastive pretraining (Li, Quan, Zhou, "MixCL: Pixel label matters to
contrastive learning in medical image segmentation").

    L = L_id + alpha * L_label + beta * L_recon,            alpha = beta = 0.01

- Model: UNETR = ViT encoder theta (``backbone``, exported) + reconstruction decoder phi, and a
  projector sigma^l (1x1 convs [c, c, 2c]) on every encoder layer's token grid.
- Views (:mod:`medcl.data.mixcl_views`): patch P1 -> two pixel-aligned intensity views V1, V1';
  auxiliary patch P2 from the same image or another image of the same source (1:1) -> V2.
- L_id (:mod:`medcl.losses.pixel_barlow`): Barlow Twins between Z1 = sigma(theta(V1)) and
  Z1' = sigma(theta(V1')) at every position, summed over ALL layers.
- L_label (:mod:`medcl.losses.pixel_contrast`): supervised pixel contrast (tau 0.1) on layer 2
  between pixels of Z1 and Z2, sampled per class with boundary weights
  (:mod:`medcl.sampling.pixels`); background-background pairs and unannotated classes ignored.
- L_recon (:mod:`medcl.losses.reconstruction`): MSE between phi(theta(V)) and the clean patch.
Switches ``use_label`` / ``use_recon`` give the paper's ablation (identity / + label / + recon).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from medcl.config import MethodConfig, Section
from medcl.losses.pixel_barlow import PixelBarlowTwinsLoss
from medcl.losses.pixel_contrast import PixelContrastLoss
from medcl.losses.reconstruction import ReconstructionLoss
from medcl.methods.base import Method
from medcl.models.unetr import Projector, UNETREncoder, build_decoder, encoder_kwargs
from medcl.sampling.pixels import PixelSample, gather_tokens, labels_to_grid, sample_pixels


class Encoded(NamedTuple):
    """One encoder pass over the views ``x`` = [V1; V1'; V2] (V2 only when a term needs it)."""

    x: Tensor  # the encoder's input
    last: Tensor  # last layer's normalised tokens
    hidden: list[Tensor]  # every layer's tokens
    z: list[Tensor]  # every layer's projection sigma^l on the token grid [views, 2c, *grid]


class MixCL(Method):
    """See the module docstring. ``training_step`` = :meth:`encode` -> :meth:`sample` ->
    :meth:`reconstruct` -> :meth:`loss_terms` -> :meth:`combine`."""

    name: ClassVar[str] = "mixcl"

    def __init__(self, encoder: UNETREncoder, feature_size: int = 16, projector_norm: str = "batch",
                 lambda_offdiag: float = 5e-3, temperature: float = 0.1, alpha: float = 0.01, beta: float = 0.01,
                 use_label: bool = True, use_recon: bool = True, label_layer: int = 2, pixel_budget: int = 32,
                 mu: float = 8.0, eps: float = 0.05, label_pooling: str = "majority",
                 label_min_fraction: float = 0.25, cross_view_only: bool = False, log_grad_norms: bool = False) -> None:
        super().__init__()
        if not 1 <= label_layer <= encoder.num_layers:
            raise ValueError(f"label_layer must be in [1, {encoder.num_layers}], got {label_layer}")
        self.backbone = encoder  # theta
        self.backbone_spec = {"name": "unetr_encoder", "kwargs": encoder_kwargs(encoder)}
        dims, width = encoder.spatial_dims, encoder.hidden_size
        self.projectors = nn.ModuleList(Projector(dims, width, projector_norm) for _ in range(encoder.num_layers))
        self.decoder = build_decoder(encoder, out_channels=encoder.kwargs["in_channels"], feature_size=feature_size) if use_recon else None
        self._set_terms(lambda_offdiag, temperature, alpha, beta, use_label, use_recon, label_layer - 1, pixel_budget,
                        mu, eps, label_pooling, label_min_fraction, cross_view_only, log_grad_norms)

    def _set_terms(self, lambda_offdiag: float, temperature: float, alpha: float, beta: float, use_label: bool,
                   use_recon: bool, label_index: int, pixel_budget: int, mu: float, eps: float, label_pooling: str,
                   label_min_fraction: float, cross_view_only: bool, log_grad_norms: bool) -> None:
        """The loss terms and their options (shared with :class:`medcl.methods.mixcl_cnn.MixCLCNN`);
        ``label_index``: 0-based layer / stage of the label term."""
        self.identity_loss = PixelBarlowTwinsLoss(lambda_offdiag)
        self.label_loss = PixelContrastLoss(temperature)
        self.recon_loss = ReconstructionLoss()
        self.alpha, self.beta, self.use_label, self.use_recon = alpha, beta, use_label, use_recon
        self.label_layer, self.pixel_budget, self.mu, self.eps = label_index, pixel_budget, mu, eps
        self.label_pooling, self.label_min_fraction, self.cross_view_only = label_pooling, label_min_fraction, cross_view_only
        self.log_grad_norms = log_grad_norms

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """One step from the public sub-steps (``benchmarks/mixcl_step.py`` times each of them)."""
        encoded = self.encode(batch)
        grid = tuple(encoded.z[self.label_layer].shape[2:])
        samples = self.sample(batch, grid) if self.use_label else None
        restored = self.reconstruct(encoded) if self.use_recon else None
        terms = self.loss_terms(batch, encoded, samples, restored)
        out = self.combine(terms)
        if self.log_grad_norms and torch.is_grad_enabled():
            out.update(self.term_gradient_norms(terms))
        return out

    def term_gradient_norms(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``grad_id`` / ``grad_label`` / ``grad_recon``: the norm of each WEIGHTED term's gradient on the
        encoder's parameters (theta), i.e. how hard each term pushes the encoder this step; logged with
        ``log_grad_norms`` (one extra backward pass per term) to see which term drives pretraining."""
        weights = {"loss_id": 1.0, "loss_label": self.alpha, "loss_recon": self.beta}
        return self.backbone_gradient_norms({"grad_" + key.removeprefix("loss_"): weights[key] * value
                                             for key, value in terms.items()})

    def encode(self, batch: dict[str, Any]) -> Encoded:
        """One encoder pass over V1, V1' (and V2): input, last layer, hidden states, projections."""
        views = [batch["view1"], batch["view1b"]] + ([batch["view2"]] if self.use_label or self.use_recon else [])
        x = torch.cat(views)
        last, hidden = self.backbone(x)
        z = [proj(self.backbone.to_grid(h)) for proj, h in zip(self.projectors, hidden)]
        return Encoded(x, last, hidden, z)

    def reconstruct(self, encoded: Encoded) -> Tensor:
        """phi(theta(V)): the decoder's restoration of every encoded view."""
        return self.decoder(encoded.x, encoded.last, encoded.hidden)

    def loss_terms(self, batch: dict[str, Any], encoded: Encoded, samples: list[PixelSample] | None,
                   restored: Tensor | None) -> dict[str, Tensor]:
        """The unweighted terms, with gradients: ``loss_id`` (V1 vs V1', all layers), ``loss_label``
        (layer ``label_layer``: P1 vs P2 at ``samples``) and ``loss_recon`` when switched on."""
        n = batch["view1"].shape[0]
        z = encoded.z
        terms = {"loss_id": self.identity_loss([zl[:n] for zl in z], [zl[n:2 * n] for zl in z])}
        if self.use_label:
            z_label = z[self.label_layer]
            terms["loss_label"] = self.label_consistency(z_label[:n], z_label[2 * n:], batch, samples)
        if self.use_recon:
            terms["loss_recon"] = self.recon_loss(restored, self.recon_target(batch))
        return terms

    def combine(self, terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{"loss": L_id + alpha * L_label + beta * L_recon}`` plus every term, detached, for the log."""
        total = terms["loss_id"]
        if "loss_label" in terms:
            total = total + self.alpha * terms["loss_label"]
        if "loss_recon" in terms:
            total = total + self.beta * terms["loss_recon"]
        return {"loss": total, **{key: value.detach() for key, value in terms.items()}}

    def recon_target(self, batch: dict[str, Any]) -> Tensor:
        return torch.cat([batch["patch1"], batch["patch1"], batch["patch2"]])

    @torch.no_grad()
    def sample(self, batch: dict[str, Any], grid: tuple[int, ...]) -> list[PixelSample]:
        """Boundary-weighted pixel samples of S1 and S2 on the token grid (r per class and patch)."""
        grids = [labels_to_grid(batch[key], grid, self.label_pooling, self.label_min_fraction) for key in ("label1", "label2")]
        return [sample_pixels(g, self.pixel_budget, self.mu, self.eps) for g in grids]

    def label_consistency(self, z1: Tensor, z2: Tensor, batch: dict[str, Any], samples: list[PixelSample]) -> Tensor:
        """L_label between the sampled pixels of Z1 (from P1) and Z2 (from P2)."""
        feats = torch.cat([gather_tokens(z, s) for z, s in zip((z1, z2), samples)])
        labels = torch.cat([s.label for s in samples])
        annotated = torch.cat([batch[f"annotated{k}"][s.sample] for k, s in zip((1, 2), samples)])
        view = torch.cat([torch.full_like(s.label, k) for k, s in enumerate(samples)])
        return self.label_loss(feats, labels, annotated, view if self.cross_view_only else None)


class DatasetEntry(Section):
    """One source of the pool: adapter (medcl.data.pool.ADAPTERS), root, optional name + options."""

    model_config = Section.model_config | {"extra": "allow"}
    adapter: str
    root: Path
    name: str | None = None


class MixCLConfig(MethodConfig):
    """The ``mixcl:`` section (defaults: the paper; presets: configs/mixcl-2d.yaml, mixcl-3d.yaml)."""

    # only optim, train and this section: data, views and model options are all here
    shared_sections: ClassVar[tuple[str, ...]] = ()
    needs_manifest: ClassVar[bool] = False
    # data and views
    datasets: list[DatasetEntry] = Field(min_length=1)
    spatial_dims: Literal[2, 3] = 3
    patch_size: int = Field(96, ge=16)  # pixels per side of P1 / P2
    spacing: list[float] | None = None  # 3D resampling (mm); the paper: [1.5, 1.5, 2.0]
    image_size: list[int] | None = None  # 2D: resize images + masks to [H, W] first (match fine-tuning's size)
    cache: int = -1  # pooled items kept in memory (LRU), -1 all, 0 none
    same_image_prob: float = Field(0.5, ge=0.0, le=1.0)  # P2 from I1 (else another image of the source)
    fg_crop_prob: float = Field(0.5, ge=0.0, le=1.0)
    affine_prob: float = Field(0.5, ge=0.0, le=1.0)
    elastic_prob: float = Field(0.5, ge=0.0, le=1.0)
    intensity_prob: float = Field(0.2, ge=0.0, le=1.0)
    # model
    vit_patch: int = Field(16, ge=4)
    hidden_size: int = Field(768, ge=8)
    mlp_dim: int = Field(3072, ge=8)
    num_layers: int = Field(12, ge=1)
    num_heads: int = Field(12, ge=1)
    feature_size: int = Field(16, ge=1)
    projector_norm: Literal["batch", "instance"] = "batch"
    # losses
    lambda_offdiag: float = Field(5e-3, ge=0.0)
    temperature: float = Field(0.1, gt=0.0)
    alpha: float = Field(0.01, ge=0.0)
    beta: float = Field(0.01, ge=0.0)
    use_label: bool = True
    use_recon: bool = True
    label_layer: int = Field(2, ge=1)
    pixel_budget: int = Field(32, ge=1)  # r: pixels per class and patch
    mu: float = Field(8.0, gt=0.0)
    eps: float = Field(0.05, ge=0.0)
    label_pooling: Literal["majority", "nearest", "foreground"] = "majority"  # labels -> token grid
    label_min_fraction: float = Field(0.25, gt=0.0, le=1.0)  # "foreground" pooling threshold
    label_pairs: Literal["all", "cross"] = "all"  # all sampled pixel pairs, or only P1-P2 pairs
    log_grad_norms: bool = False  # log each weighted term's gradient norm on the encoder (grad_id, grad_label, grad_recon)

    @field_validator("spacing")
    @classmethod
    def _spacing_positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (len(value) != 3 or min(value) <= 0):
            raise ValueError("expected three positive spacings in mm")
        return value


def build_method(p: MixCLConfig, in_channels: int = 1) -> MixCL:
    if p.hidden_size % p.num_heads:
        raise ValueError(f"mixcl.hidden_size={p.hidden_size} must be divisible by mixcl.num_heads={p.num_heads}")
    if p.patch_size % p.vit_patch:
        raise ValueError(f"mixcl.patch_size={p.patch_size} must be divisible by mixcl.vit_patch={p.vit_patch}")
    if p.label_layer > p.num_layers:
        raise ValueError(f"mixcl.label_layer={p.label_layer} exceeds mixcl.num_layers={p.num_layers}")
    encoder = UNETREncoder(spatial_dims=p.spatial_dims, img_size=p.patch_size, in_channels=in_channels,
                           patch_size=p.vit_patch, hidden_size=p.hidden_size, mlp_dim=p.mlp_dim,
                           num_layers=p.num_layers, num_heads=p.num_heads)
    return MixCL(encoder, feature_size=p.feature_size, projector_norm=p.projector_norm,
                 lambda_offdiag=p.lambda_offdiag, temperature=p.temperature, alpha=p.alpha, beta=p.beta,
                 use_label=p.use_label, use_recon=p.use_recon, label_layer=p.label_layer,
                 pixel_budget=p.pixel_budget, mu=p.mu, eps=p.eps, label_pooling=p.label_pooling,
                 label_min_fraction=p.label_min_fraction,
                 cross_view_only=p.label_pairs == "cross", log_grad_norms=p.log_grad_norms)


def build(config, *, rank: int = 0, world_size: int = 1):
    """``(method, loader)`` for the shared trainer (medcl.methods.base registry)."""
    loader, metadata = pool_loader(config, rank=rank, world_size=world_size)
    method = build_method(config.params, in_channels=1)
    method.metadata = metadata
    return method, loader


def pool_loader(config, *, rank: int = 0, world_size: int = 1, params: MixCLConfig | None = None,
                batch_size: int | None = None):
    """``(loader, metadata)``: the pooled datasets, their views and batches (shared with
    :mod:`medcl.methods.mixcl_cnn` and :mod:`medcl.methods.joint`, which passes its ``pixel``
    section as ``params`` and its own ``batch_size``); metadata = class names and sources."""
    from medcl.data.mixcl_views import MixCLViewMaker
    from medcl.data.pool import pool_from_specs
    from medcl.sampling.loader import IndexBatchLoader

    p: MixCLConfig = params if params is not None else config.params
    specs = [entry.model_dump(exclude_none=True) for entry in p.datasets]
    pool = pool_from_specs(specs, cache=p.cache, spacing=p.spacing, image_size=p.image_size)
    if pool.spatial_dims != p.spatial_dims:
        raise ValueError(f"mixcl.spatial_dims={p.spatial_dims} but the datasets are {pool.spatial_dims}D")
    views = MixCLViewMaker(pool, p.patch_size, same_image_prob=p.same_image_prob, fg_crop_prob=p.fg_crop_prob,
                           affine_prob=p.affine_prob, elastic_prob=p.elastic_prob, intensity_prob=p.intensity_prob)
    loader = IndexBatchLoader(len(pool), batch_size or config.optim.batch_size, views.make_batch, seed=config.train.seed,
                              rank=rank, world_size=world_size, what="pooled images")
    return loader, {"class_names": pool.class_names, "sources": [s.name for s in pool.sources]}
