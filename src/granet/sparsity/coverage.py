"""The coverage report: which weights are under masks, which are dense, and why.

Built by :func:`granet.describe_sparsity` or :meth:`granet.Sparsifier.coverage` (see
:mod:`granet.sparsity.targets` for the rules). ``str(report)`` is a table for people; :meth:`Coverage.to_dict`
is the same as JSON.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: Share of the model's 2-D+ weights left dense without the user asking above which a warning is logged.
DENSE_WARNING_SHARE = 0.25


@dataclass(frozen=True)
class ParameterEntry:
    """One distinct parameter tensor in the report.

    Attributes:
        name: its first name (the one the sparsifier uses).
        aliases: its other names when the tensor is tied (shared).
        shape: its shape.
        numel: its number of elements.
        kind: see :mod:`granet.sparsity.targets` (``linear``, ``conv1d_hf``, ``mha_in_proj``, ...).
        selected: whether it is under a mask.
        reason: why it is dense (empty when selected).
        density: its density when selected (``None`` when dense).
    """

    name: str
    aliases: tuple[str, ...]
    shape: tuple[int, ...]
    numel: int
    kind: str
    selected: bool
    reason: str
    density: Optional[float] = None

    @property
    def unrequested(self) -> bool:
        """Dense although the user asked for nothing about it (a type or name that was not selected)."""
        return not self.selected and len(self.shape) >= 2 and (
            self.reason.startswith("type not selected") or self.reason.startswith("not a layer weight")
        )


@dataclass
class Coverage:
    """Coverage of a model by a sparsifier's masks.

    Attributes:
        entries: one :class:`ParameterEntry` per distinct tensor, in model order.
        layer_types: labels of the layer types that were selected.
    """

    entries: list[ParameterEntry]
    layer_types: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_params(self) -> int:
        """Elements of all parameters (tied tensors counted once)."""
        return sum(e.numel for e in self.entries)

    @property
    def weights_2d(self) -> int:
        """Elements of all parameters with 2+ dimensions."""
        return sum(e.numel for e in self.entries if len(e.shape) >= 2)

    @property
    def masked_params(self) -> int:
        """Elements of the tensors under masks."""
        return sum(e.numel for e in self.entries if e.selected)

    @property
    def active_params(self) -> int:
        """Non-zero elements allowed by the masks (exact when densities come from a sparsifier)."""
        return sum(round(e.numel * e.density) for e in self.entries if e.selected and e.density is not None)

    @property
    def masked_fraction(self) -> float:
        """Share of all parameters under masks."""
        return self.masked_params / self.total_params if self.total_params else 0.0

    @property
    def masked_fraction_2d(self) -> float:
        """Share of the 2-D+ weights under masks."""
        return self.masked_params / self.weights_2d if self.weights_2d else 0.0

    @property
    def unrequested_dense(self) -> int:
        """Elements of 2-D+ weights left dense only because their type or name was not selected."""
        return sum(e.numel for e in self.entries if e.unrequested)

    def selected(self) -> list[ParameterEntry]:
        """The entries under masks."""
        return [e for e in self.entries if e.selected]

    def dense(self) -> list[ParameterEntry]:
        """The 2-D+ entries left dense."""
        return [e for e in self.entries if not e.selected and len(e.shape) >= 2]

    def warning(self) -> Optional[str]:
        """A one-line warning when > 25% of the 2-D+ weights are dense without the user asking."""
        if not self.weights_2d or self.unrequested_dense <= DENSE_WARNING_SHARE * self.weights_2d:
            return None
        names = [e.name for e in self.entries if e.unrequested]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return (
            f"{self.unrequested_dense / self.weights_2d:.1%} of the model's 2-D weights stay dense because their "
            f"layer type is not selected or they are not layer weights ({shown}); add the type to layer_types "
            f"or name them with include=[...]"
        )

    def dense_reasons(self) -> str:
        """One line: the selected layer types and why each 2-D weight is dense."""
        dense = self.dense()
        shown = "; ".join(f"{e.name}: {e.reason}" for e in dense[:6]) + ("; ..." if len(dense) > 6 else "")
        return f"selected layer types {', '.join(self.layer_types) or 'none'}; " + (
            f"dense 2-D weights: {shown}" if dense else "the model has no parameter with 2+ dimensions")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form: totals and one dict per tensor."""
        return {
            "total_params": self.total_params,
            "weights_2d": self.weights_2d,
            "masked_params": self.masked_params,
            "active_params": self.active_params,
            "masked_fraction": self.masked_fraction,
            "masked_fraction_2d": self.masked_fraction_2d,
            "unrequested_dense": self.unrequested_dense,
            "layer_types": list(self.layer_types),
            "parameters": [dict(asdict(e), shape=list(e.shape), aliases=list(e.aliases)) for e in self.entries],
        }

    def summary(self) -> str:
        """One line: how much of the model is under masks."""
        return (
            f"{len(self.selected())} tensors under masks: {self.masked_params:,} of {self.total_params:,} parameters "
            f"({self.masked_fraction:.1%}; {self.masked_fraction_2d:.1%} of the 2-D weights); "
            f"{len(self.dense())} 2-D weight tensors dense"
        )

    def __str__(self) -> str:
        return f"{self.table()}\n{self.summary()}"

    def table(self) -> str:
        """One line per 2-D weight (its shape, size and density, or why it stays dense) and one for
        the 1-D tensors: ``str(coverage)`` without the :meth:`summary` line."""
        rows = [("parameter", "shape", "params", "status")]
        for e in self.entries:
            if len(e.shape) < 2:
                continue
            name = e.name + "".join(f" = {a}" for a in e.aliases)
            status = f"masked, density {e.density:.4f}" if e.selected and e.density is not None else (
                "masked" if e.selected else f"dense: {e.reason}")
            rows.append((name, "x".join(map(str, e.shape)), f"{e.numel:,}", status))
        one_d = [e for e in self.entries if len(e.shape) < 2]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows]
        if one_d:
            lines.append(f"({len(one_d)} 1-D tensors, {sum(e.numel for e in one_d):,} params: biases / norms, dense)")
        return "\n".join(lines)


def log_coverage(report: Coverage) -> None:
    """Log the report once (info) and the dense-share warning if it applies."""
    logger.info("sparsity coverage: %s", report.summary())
    message = report.warning()
    if message:
        logger.warning(message)
