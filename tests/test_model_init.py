"""``model.init``: a pretraining run whose backbone starts from given weights (continued
pretraining, e.g. on a hospital's own videos after a public corpus)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from uscl_fixtures import tiny_overrides, write_frame_sets

from medcl.config import ConfigError, load_config
from medcl.models.backbones import resnet18_backbone
from medcl.train.api import pretrain
from medcl.train.trainer import TrainerCallback
from medcl.weights import load_checkpoint

PROJECT = Path(__file__).resolve().parents[1]


class FirstStep(TrainerCallback):
    """Copies of the method's backbone (and MoCo's key backbone) as the first update starts."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def on_step_start(self, trainer, step: int) -> None:
        if not self.seen:
            for name in ("backbone", "key_backbone"):
                part = getattr(trainer.method, name, None)
                if part is not None:
                    self.seen[name] = {k: v.detach().clone() for k, v in part.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].float(), b[k].float()) for k in a)


@pytest.mark.parametrize("method", ["uscl", "moco"])
def test_pretraining_starts_from_the_given_backbone(tmp_path, method):
    frames = write_frame_sets(tmp_path / "frames")
    first = pretrain(PROJECT / f"configs/{method}.yaml", tiny_overrides(frames, tmp_path / "first",
                                                                       **({"moco.queue_size": 8} if method == "moco" else {})))
    start = {k[len("backbone."):]: v for k, v in load_checkpoint(first / "checkpoints" / "final.pt")["model"].items()
             if k.startswith("backbone.")}
    hook = FirstStep()
    extra = {"model.init": first / "checkpoints" / "final.pt", **({"moco.queue_size": 8} if method == "moco" else {})}
    pretrain(PROJECT / f"configs/{method}.yaml", tiny_overrides(frames, tmp_path / "second", **extra), callbacks=[hook])
    assert _same(hook.seen["backbone"], start)
    if method == "moco":
        assert _same(hook.seen["key_backbone"], start)  # the key encoder starts as the query encoder
    # without model.init the same seed draws another backbone
    fresh = FirstStep()
    pretrain(PROJECT / f"configs/{method}.yaml", tiny_overrides(frames, tmp_path / "third",
                                                               **({"moco.queue_size": 8} if method == "moco" else {})),
             callbacks=[fresh])
    assert not _same(fresh.seen["backbone"], start)


def test_model_init_accepts_a_torchvision_state_dict_and_refuses_bad_ones(tmp_path):
    from medcl.models import layouts

    frames = write_frame_sets(tmp_path / "frames")
    torch.manual_seed(3)
    monai_net = resnet18_backbone(in_channels=1)
    torch.save(layouts.monai_to_torchvision(monai_net.state_dict()), tmp_path / "tv.pth")  # torchvision's layout
    hook = FirstStep()
    pretrain(PROJECT / "configs/simclr.yaml", tiny_overrides(frames, tmp_path / "tv", **{"model.init": tmp_path / "tv.pth"}),
             callbacks=[hook])
    assert torch.equal(hook.seen["backbone"]["layer4.1.conv2.weight"], monai_net.state_dict()["layer4.1.conv2.weight"])
    with pytest.raises(ConfigError, match="model.init.*not found"):
        load_config(PROJECT / "configs/uscl.yaml", tiny_overrides(frames, tmp_path / "x", **{"model.init": tmp_path / "nope.pt"}))
    torch.save({"weight": torch.zeros(3)}, tmp_path / "junk.pt")
    with pytest.raises(Exception, match="junk.pt"):
        pretrain(PROJECT / "configs/uscl.yaml", tiny_overrides(frames, tmp_path / "junk", **{"model.init": tmp_path / "junk.pt"}))
