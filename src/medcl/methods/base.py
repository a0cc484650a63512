"""What every pretraining method provides, and how a method is found by name.

A method is a small ``nn.Module`` that owns its model parts and defines ONE training step:

    class MyMethod(Method):
        name = "mine"
        def __init__(self, ...):
            super().__init__()
            self.backbone = resnet18_backbone(in_channels=1)          # exported after pretraining
            self.backbone_spec = {"name": "resnet18", "kwargs": {"in_channels": 1}}
            self.head = ...
        def training_step(self, batch: dict) -> dict[str, Tensor]:
            ...
            return {"loss": total, "loss_con": l_con.detach(), ...}   # "loss" is optimised

Interface (what the trainer relies on):
- ``backbone``: the network exported after pretraining. Its parameters live under the
  ``backbone.`` prefix of ``state_dict()``; ``backbone_spec`` ({"name", "kwargs"}) rebuilds it
  with ``medcl.models.backbones.build_backbone(name, **kwargs)``.
- ``training_step(batch) -> dict[str, Tensor]`` with key ``"loss"`` (scalar total, with grad);
  every other key is logged (scalars). ``forward(batch)`` calls it, so DDP can wrap a method.
- ``metadata``: plain-types dict saved in checkpoints (e.g. the class names of a classifier).
- Methods never implement optimisation, checkpointing, logging or device placement: the batch
  arrives on the method's device; mixed precision is applied around the step by the trainer.

Registry: :data:`METHOD_MODULES` maps a method name (the config's ``method:``) to a module with
``build(config, *, rank=0, world_size=1) -> tuple[Method, loader]``; ``loader`` follows the
protocol documented in ``medcl.train.trainer`` (``BatchLoader``). :func:`build_method` imports
the module lazily. To add MixCL: write ``medcl/methods/mixcl.py`` with ``build`` and add
``"mixcl": "medcl.methods.mixcl"`` here (its config section: see ``medcl.config``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from medcl.inputs import InputSpec

if TYPE_CHECKING:
    from medcl.config import Config

METHOD_MODULES: dict[str, str] = {
    "uscl": "medcl.methods.uscl",
    "simclr": "medcl.methods.simclr",
    "supervised": "medcl.methods.supervised",
    "mixcl": "medcl.methods.mixcl",
    "mixcl_cnn": "medcl.methods.mixcl_cnn",
    "joint": "medcl.methods.joint",
    "moco": "medcl.methods.moco",
    "fixmatch": "medcl.methods.fixmatch",
    "pimodel": "medcl.methods.pimodel",
    "temporal_ensembling": "medcl.methods.temporal_ensembling",
}


class Method(nn.Module):
    """Base class of pretraining methods (see the module docstring for the contract)."""

    name: ClassVar[str] = "method"
    backbone: nn.Module
    backbone_spec: dict[str, Any]

    def __init__(self) -> None:
        super().__init__()
        self.metadata: dict[str, Any] = {}

    def training_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        return self.training_step(batch)

    def start_backbone_from(self, state: dict[str, Tensor], source: str) -> None:
        """Load a backbone state dict (``model.init``: a pretraining run that starts from given
        weights); every key must match. Methods holding a copy of the backbone (MoCo's key
        encoder) override this to refresh it too."""
        try:
            self.backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"model.init={source}: does not fit the {self.backbone_spec.get('name')} backbone "
                             f"({first})") from None

    def backbone_gradient_norms(self, weighted_terms: dict[str, Tensor]) -> dict[str, Tensor]:
        """``{name: ||d term / d theta||}`` for each (already weighted) loss term, theta = the
        backbone's trainable parameters: how hard each term pushes the shared encoder this step.
        One extra backward pass per term (the graph is kept for the real backward); for
        diagnostics (``log_grad_norms``), not for every run."""
        params = [p for p in self.backbone.parameters() if p.requires_grad]
        norms = {}
        for key, value in weighted_terms.items():
            grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            squares = [g.float().pow(2).sum() for g in grads if g is not None]
            norms[key] = torch.stack(squares).sum().sqrt() if squares else value.new_zeros(())
        return norms

    def backbone_info(self) -> dict[str, Any]:
        """The checkpoint's ``backbone`` entry: name, kwargs and state-dict prefix."""
        spec = getattr(self, "backbone_spec", None)
        if not spec or "name" not in spec:
            raise ValueError(f"{type(self).__name__} must set backbone_spec = {{'name': ..., 'kwargs': {{...}}}}")
        kwargs = dict(spec.get("kwargs", {}))
        spec_input = spec.get("input") or InputSpec(in_channels=int(kwargs.get("in_channels", 1)))
        return {"name": spec["name"], "kwargs": kwargs, "prefix": "backbone.", "input": spec_input.to_dict()}


def build_method(config: Config, *, rank: int = 0, world_size: int = 1) -> tuple[Method, Any]:
    """Build ``(method, loader)`` for ``config.method`` via its registered module."""
    if config.method not in METHOD_MODULES:
        raise ValueError(f"method={config.method!r}: no implementation registered; known: {sorted(METHOD_MODULES)}")
    module = importlib.import_module(METHOD_MODULES[config.method])
    return module.build(config, rank=rank, world_size=world_size)
