"""A finished run's model into the registry: exported (onnx and torch_export), registered with its lineage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from maas.registry import ModelVersion, Registry
from maas.runtimes.export import ClassifierHead, export
from maas.training.config import TrainConfig
from maas.training.data import fingerprint, gather


def publish(
    model: nn.Module,
    cfg: TrainConfig,
    run_id: str,
    metrics: dict[str, float],
    train_set: Any,
    run_dir: Path,
    registry: Registry | None = None,
) -> ModelVersion:
    """Export the trained model into the run directory and register it as the next version of
    ``publish.name`` (moving ``publish.alias`` when set)."""
    assert cfg.publish is not None
    pub = cfg.publish
    registry = registry or Registry()
    model = model.cpu().eval()
    served: nn.Module = ClassifierHead(model) if pub.head == "classifier" else model
    example = gather(train_set, torch.arange(min(4, len(train_set))))[0].cpu()
    output_names = pub.output_names or (["probabilities", "label"] if pub.head == "classifier" else None)
    formats = tuple(dict.fromkeys([pub.register_format, *pub.formats]))
    files = export(
        served,
        (example,),
        run_dir / "export",
        name=pub.name,
        input_names=pub.input_names or ["input"],
        output_names=output_names,
        formats=formats,
    )
    return registry.register(
        files[pub.register_format],
        pub.name,
        description=pub.description or f"trained by run {run_id} ({cfg.strategy.name})",
        metrics=metrics,
        alias=pub.alias,
        source_run=run_id,
        tags={"run": run_id, "strategy": cfg.strategy.name},
        lineage_extra={
            "config_hash": cfg.config_hash(),
            "dataset_fingerprint": fingerprint(train_set),
            "strategy": cfg.strategy.name,
            "exports": {fmt: str(path) for fmt, path in files.items()},
        },
    )
