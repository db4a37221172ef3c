"""The pieces a training run is built from: its model, its data, and evaluation over ranks."""
from __future__ import annotations

from collections.abc import Sized

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data import DatasetError, DatasetInfo, DatasetSplits, build_datasets
from ..errors import ConfigError
from ..models import create_model
from . import runtime
from .config import TrainConfig


def dataset_size(dataset: Dataset) -> int:
    """The number of samples of a map-style dataset (torch's ``Dataset`` type does not declare ``len``)."""
    if not isinstance(dataset, Sized):
        raise TypeError(f"{type(dataset).__name__} is not a map-style dataset with a length")
    return len(dataset)


def build_model(config: TrainConfig, info: DatasetInfo) -> nn.Module:
    """The config's model, shaped for the dataset (classes, channels, image size)."""
    try:
        return create_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels,
                            input_size=info.image_size, input_dims=info.input_dims)
    except ValueError as exc:
        raise ConfigError(f"model {config.model!r} on dataset {config.data.dataset!r}: {exc}") from None


def load_data(config: TrainConfig, download: bool, augment: bool) -> DatasetSplits:
    """The config's dataset splits; a missing or corrupt dataset or a bad option is a one-line error."""
    data = config.data
    try:
        return build_datasets(data.dataset, data.data_dir, val_fraction=data.val_fraction, seed=config.seed,
                              download=download, augment=augment, **data.dataset_options)
    except DatasetError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"dataset {data.dataset!r} with options {data.dataset_options}: {exc}") from None


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, config: TrainConfig, device: torch.device, dist: runtime.Dist,
             channels_last: bool = False, lockstep: bool = False) -> dict[str, float]:
    """Loss and accuracy over ``dataset`` (sharded over ranks and all-reduced).

    ``lockstep`` (FSDP, whose forward pass is a collective): every rank runs as many forward passes
    as the rank with the most batches, the extra ones on empty batches.
    """
    was_training = model.training
    model.eval()
    indices = list(range(dist.rank, dataset_size(dataset), dist.world_size))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=max(1, config.optim.batch_size // dist.world_size) * 2,
        shuffle=False, num_workers=config.machine.workers, pin_memory=device.type == "cuda",
    )
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
    amp = runtime.amp_mode(config.machine.amp, device)
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, amp):
            out = model(x)
        totals[0] += nn.functional.cross_entropy(out.float(), y, reduction="sum")
        totals[1] += (out.argmax(1) == y).sum()
        totals[2] += y.numel()
    if lockstep:
        batches = torch.tensor([len(loader)], device=device)
        torch.distributed.all_reduce(batches, op=torch.distributed.ReduceOp.MAX)
        empty = dataset[0][0].unsqueeze(0)[:0].to(device)
        for _ in range(int(batches) - len(loader)):
            with runtime.autocast(device, amp):
                model(empty.contiguous(memory_format=torch.channels_last) if channels_last else empty)
    if dist.world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    count = max(1.0, float(totals[2]))
    return {"loss": float(totals[0]) / count, "accuracy": float(totals[1]) / count}
