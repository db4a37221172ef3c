"""Per-layer FLOPs tables: what ``granet flops`` prints (dense and sparse FLOPs of every layer)."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from .flops import ExampleInput, LayerFlops, _check_densities, inference_flops, layer_flops


def flops_table(
    model: nn.Module,
    example_input: ExampleInput,
    layer_density: Mapping[str, float],
    measured: Optional[LayerFlops] = None,
) -> dict[str, Any]:
    """Per-layer parameters, densities and FLOPs of a (sparse) model, plus totals.

    Args:
        model: the model.
        example_input: one example (see :func:`layer_flops`).
        layer_density: density of each sparsified weight by name; the weights named here are the
            sparsified set, the others are dense.
        measured: the model's :func:`layer_flops` if already measured (skips the forward pass).

    Returns:
        ``{"layers": [{"name", "shape", "params", "density", "sparsified", "dense_flops",
        "flops"}, ...], "params", "sparsified_params", "active_params", "density", "other_flops",
        "dense_inference_flops", "inference_flops", "inference_flops_relative"}``. ``params`` counts
        every parameter of the model; ``active_params`` is ``params`` minus the pruned weights;
        ``density`` is the density of the sparsified weights.
    """
    flops = measured if measured is not None else layer_flops(model, example_input)
    _check_densities(flops, layer_density)
    rows = []
    sparsified = active_sparsified = pruned = 0
    for name, dense_f in flops.layers.items():
        shape = flops.shapes.get(name, ())
        size = math.prod(shape)
        density = float(layer_density.get(name, 1.0))
        kept = int(round(size * density))
        if name in layer_density:
            sparsified += size
            active_sparsified += kept
        pruned += size - kept
        rows.append({
            "name": name,
            "shape": list(shape),
            "params": size,
            "density": density,
            "sparsified": name in layer_density,
            "dense_flops": dense_f,
            "flops": dense_f * density,
        })
    params = sum(p.numel() for p in model.parameters())  # model.parameters() de-duplicates tied ones
    sparse = inference_flops(flops, layer_density)
    return {
        "layers": rows,
        "params": params,
        "sparsified_params": sparsified,
        "active_params": params - pruned,
        "density": active_sparsified / sparsified if sparsified else 1.0,
        "other_flops": flops.other,
        "dense_inference_flops": flops.dense,
        "inference_flops": sparse,
        "inference_flops_relative": sparse / flops.dense if flops.dense > 0 else 1.0,
    }


def human_readable(value: float) -> str:
    """``8178368512 -> "8.18G"``, ``25502912 -> "25.50M"``, ``512 -> "512"`` (powers of 1000)."""
    magnitude = abs(value)
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if magnitude >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.2f}"


def format_flops_table(table: Mapping[str, Any]) -> str:
    """Render :func:`flops_table`'s result as an aligned plain-text table.

    Kept-dense layers are marked ``*`` after their density.
    """
    header = ("layer", "shape", "params", "density", "dense FLOPs", "FLOPs")
    lines = [
        (
            row["name"],
            "x".join(str(d) for d in row["shape"]),
            human_readable(row["params"]),
            f"{row['density']:.4f}" + ("" if row["sparsified"] else "*"),
            human_readable(row["dense_flops"]),
            human_readable(row["flops"]),
        )
        for row in table["layers"]
    ]
    if table.get("other_flops"):
        lines.append(("(other ops)", "", "", "1.0000*", human_readable(table["other_flops"]),
                      human_readable(table["other_flops"])))
    widths = [max(len(r[i]) for r in [header] + lines) for i in range(len(header))]
    # Names and shapes read left-aligned, numbers right-aligned.
    align = ["<", "<", ">", ">", ">", ">"]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(f"{cell:{a}{w}}" for cell, a, w in zip(row, align, widths)).rstrip()

    out = [fmt(header), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in lines]
    out.append(fmt(["-" * w for w in widths]))
    out.append(
        f"params: {human_readable(table['params'])} total, {human_readable(table['sparsified_params'])} "
        f"sparsified at density {table['density']:.4f}, {human_readable(table['active_params'])} non-zero"
    )
    out.append(
        f"inference FLOPs: {human_readable(table['inference_flops'])} sparse / "
        f"{human_readable(table['dense_inference_flops'])} dense = {table['inference_flops_relative']:.4f}x"
        + ("  (* = not sparsified)" if any(not r["sparsified"] for r in table["layers"]) or table.get("other_flops")
           else "")
    )
    return "\n".join(out)


__all__ = ["flops_table", "format_flops_table", "human_readable"]
