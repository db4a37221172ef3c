"""TensorBoard logging of training records (needs ``pip install -c constraints.txt -e ".[tensorboard]"``).

``granet train --tensorboard`` writes, beside ``metrics.jsonl``, one event file with every numeric
field of each epoch record as a scalar (losses, accuracies, lr, density, pruned / regrown,
exploration rate, ...) and the per-layer densities as a histogram plus one scalar per layer::

    writer = TensorBoardWriter(run_dir / "tensorboard")
    writer.log_epoch(record, step=record["step"], layer_density=sparsifier.layer_density())
    writer.close()

Under ``torch.distributed`` only rank 0 writes (other ranks get a writer that does nothing), so
``torchrun`` does not produce one event file per process.
"""
from __future__ import annotations

import logging
import math
import numbers
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..errors import install_hint

logger = logging.getLogger(__name__)

try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as exc:  # torch's writer imports the tensorboard package
    raise ImportError(
        f"granet.train.tensorboard needs the 'tensorboard' package: {install_hint('tensorboard', 'tensorboard')}"
    ) from exc


def _is_main_rank() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class TensorBoardWriter:
    """Writes granet's epoch records to a TensorBoard log directory.

    Args:
        log_dir: directory of the event file (created if missing).
        enabled: ``None`` (default) writes on rank 0 only; ``False`` writes nothing.
    """

    def __init__(self, log_dir: Union[str, Path], enabled: Optional[bool] = None) -> None:
        self.enabled = _is_main_rank() if enabled is None else bool(enabled)
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir)) if self.enabled else None

    def log_epoch(
        self, record: Mapping[str, Any], step: int, layer_density: Optional[Mapping[str, float]] = None
    ) -> int:
        """Write the numeric fields of ``record`` as scalars at ``step``, and the layer densities.

        Args:
            record: one epoch record (``metrics.jsonl`` line). Numbers become scalars under their key;
                ``None``, booleans, strings and ``step``/``epoch`` counters are skipped; a nested
                ``layer_density`` mapping is used as ``layer_density``.
            step: the global step (x axis), normally the optimizer step.
            layer_density: density of each sparsified tensor: histogram ``layer_density`` and scalars
                ``layer_density/<name>``.

        Returns:
            The number of scalars written (0 when disabled).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self._writer is None:
            return 0
        densities = layer_density if layer_density is not None else record.get("layer_density")
        written = 0
        for key, value in record.items():
            if key in ("step", "epoch") or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if not math.isfinite(float(value)):
                continue  # TensorBoard cannot show inf/NaN usefully; the JSONL keeps them
            self._writer.add_scalar(key, float(value), step)
            written += 1
        if densities:
            values = torch.tensor([float(d) for d in densities.values()], dtype=torch.float64)
            self._writer.add_histogram("layer_density", values, step, bins=20)
            for name, density in densities.items():
                self._writer.add_scalar(f"layer_density/{name}", float(density), step)
                written += 1
        self._writer.flush()
        return written

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
