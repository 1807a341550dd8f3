"""The committed checkpoints and their experiment records (``refimpl/assets/pointer``)."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from refimpl.pointer.attention import AttentionConfig, AttentionModel
from refimpl.pointer.network import PointerConfig, PointerNet

ASSETS = Path(__file__).parent.parent / "assets" / "pointer"


def save(model: PointerNet | AttentionModel, record: dict, name: str, out_dir: Path = ASSETS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.config), "state": state}, out_dir / f"{name}.pt")
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    return out_dir / f"{name}.pt"


def checkpoint_name(task: str, n, variant: str = "") -> str:
    """``tsp10``, ``tsp5-10``, ``sort10_rpw5_10k``: the file stem in ``refimpl/assets/pointer``."""
    return f"{task}{n}" + (f"_{variant}" if variant else "")


def load(task: str, n, variant: str = "", path: Path | None = None) -> PointerNet | AttentionModel:
    """A committed checkpoint, e.g. ``load("tsp", 10)``, ``load("tsp", "5-10")``,
    ``load("sort", 10, "rpw5_10k")``; ``load("tsp", 20)`` is the attention model trained by
    POMO. Weights are stored in half precision, run in float32."""
    name = checkpoint_name(task, n, variant)
    path = path or ASSETS / f"{name}.pt"
    if not Path(path).exists():
        raise ValueError(f"no checkpoint {name!r} (task={task!r}, n={n!r}, variant={variant!r}); "
                         f"committed: {committed('pt')}")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    config = blob["config"]
    if config.get("kind") == "attention":
        model = AttentionModel(AttentionConfig(**config))
    else:
        model = PointerNet(PointerConfig(**config))
    model.load_state_dict({k: v.float() for k, v in blob["state"].items()})
    return model.eval()


def record_of(task: str, n, variant: str = "") -> dict:
    """The JSON written beside a checkpoint (training command, curve, evaluations)."""
    path = ASSETS / f"{checkpoint_name(task, n, variant)}.json"
    if not path.exists():
        raise ValueError(f"no record {path.stem!r} (task={task!r}, n={n!r}, variant={variant!r}); "
                         f"committed: {committed('json')}")
    return json.loads(path.read_text())


def committed(suffix: str) -> list[str]:
    """Stems of the committed ``refimpl/assets/pointer/*.{suffix}`` files."""
    return sorted(p.stem for p in ASSETS.glob(f"*.{suffix}"))
