"""Fully sharded data parallel training (FSDP2) for ``granet train --fsdp true``.

The model is wrapped with ``torch.distributed.fsdp.fully_shard`` (every module owning parameters
is one unit, then the root) before the optimizer and the sparsifier are built, so both see the
sharded ``DTensor`` parameters; the sparsifier then keeps its masks sharded too (see
:mod:`granet.sparsity.fsdp_layout`).

Buffers (BatchNorm running statistics) are not sharded, so without help every rank would keep its own
running averages. DDP broadcasts rank 0's buffers before every forward pass that follows a
gradient-synchronising one, i.e. before the first forward pass of every optimizer step;
:func:`broadcast_buffers_like_ddp` does the same under FSDP, so each rank's statistics, hence the
validation metrics and the selected epoch, equal the DDP run's.

Checkpoints stay in the single-process format, so a run can be resumed or continued with another
strategy: the model and optimizer entries are *full* state dicts gathered with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True, cpu_offload=True``: rank 0
receives them and writes the file), the optimizer's keyed by parameter index like
``optimizer.state_dict()``; the sparsifier entry holds full masks. Loading broadcasts rank 0's
copy and every rank keeps its shard. Gathering is a collective: every rank takes part in a save.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["broadcast_buffers_like_ddp", "check_fsdp", "shard_model", "full_model_state", "full_optimizer_state",
           "load_full_model_state",
           "load_full_optimizer_state"]


def check_fsdp(world_size: int, amp: str, method: str) -> None:
    """Refuse, in one line, what FSDP training cannot do here."""
    if world_size < 2:
        raise ConfigError("fsdp: true needs 2 or more processes: launch with torchrun --nproc_per_node=N (N >= 2)")
    if amp == "fp16":
        raise ConfigError(
            "fsdp: true does not support amp fp16 (GradScaler on sharded gradients); use --amp bf16 or off")
    from ..baselines.saliency import needs_init_scoring

    if needs_init_scoring(method):
        raise ConfigError(f"fsdp: true does not support method {method!r} (scoring at initialisation); use DDP")


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` every submodule that owns parameters, then the root (FSDP2, ``Shard(0)``)."""
    from torch.distributed.fsdp import fully_shard

    owners = [m for m in model.modules() if m is not model and any(True for _ in m.parameters(recurse=False))]
    for module in owners:
        fully_shard(module)
    fully_shard(model)  # in place: the module's class becomes an FSDPModule subclass
    return model


def broadcast_buffers_like_ddp(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Before the first training forward pass (gradients enabled) after each optimizer step, and
    before the first one of all, overwrite every rank's buffers with rank 0's, as DDP's
    ``broadcast_buffers`` does (see the module docstring). Forward passes without gradients
    (evaluation) neither broadcast nor count. One coalesced broadcast per buffer dtype."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    buffers = [b for b in model.buffers() if b is not None and b.numel()]
    if not buffers:
        return
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault((b.device, b.dtype), []).append(b)
    due = [True]

    def before_forward(module: nn.Module, args: Any) -> None:
        if not (due[0] and torch.is_grad_enabled()):
            return
        due[0] = False
        with torch.no_grad():
            for tensors in groups.values():
                flat = _flatten_dense_tensors(tensors)
                dist.broadcast(flat, src=0)
                for b, value in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    b.copy_(value)

    def after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        due[0] = True

    model.register_forward_pre_hook(before_forward)
    optimizer.register_step_post_hook(after_step)


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The full model state dict on rank 0 (CPU tensors), ``{}`` elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True))


def _names_by_index(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The full optimizer state on rank 0 in ``optimizer.state_dict()``'s format (parameter
    indices, not names), ``{}`` elsewhere. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state: Mapping[str, Any] = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not state:
        return {}
    index = {n: i for i, n in enumerate(_names_by_index(model, optimizer))}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]],
    }


def load_full_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a full model state dict (rank 0's copy is broadcast; every rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_options(broadcast_from_rank0=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an ``optimizer.state_dict()``-format full state (rank 0's copy is broadcast)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _names_by_index(model, optimizer)
    named: dict[str, Any] = {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, named, options=_options(broadcast_from_rank0=True))
