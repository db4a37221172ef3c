"""Training runs behind ``granet train``: config, runtime, checkpoints, the loop, and the run itself.

A run is described by one frozen :class:`TrainConfig` (sections: data, sparsity, lottery, optim,
machine, output), built and checked once from flat keys and passed down unchanged.

Layers (each imports only those above it): :mod:`.config` (what a run is) → :mod:`.runtime` (device,
process group, seeding, optimizer, signals) → :mod:`.parts` (model, data, evaluation) → :mod:`.fsdp`
(sharding the model, full-state checkpoints) → :mod:`.checkpoint` (what is saved and how it is read
back) → :mod:`.loop` (the Trainer) → :mod:`.lottery_run` (the lottery-ticket rounds, ``--method lth``)
→ :mod:`.run` (``train`` and ``evaluate_run``).

Schedules are in optimizer steps. ``batch_size`` is the *global* batch (split evenly over the
processes of a ``torchrun`` job), so the number of optimizer steps — and therefore every sparsity
schedule — is the same on 1 or N processes.
"""
from ..errors import ConfigError
from .config import (
                     DataConfig,
                     LotteryOptions,
                     MachineConfig,
                     OptimConfig,
                     OutputConfig,
                     SparsityOptions,
                     TrainConfig,
                     load_config,
)
from .run import default_out_dir, evaluate_run, resume_point, train
from .runtime import lr_factor

__all__ = ["TrainConfig", "DataConfig", "SparsityOptions", "LotteryOptions", "OptimConfig", "MachineConfig",
           "OutputConfig", "ConfigError", "train", "evaluate_run", "load_config", "resume_point", "lr_factor",
           "default_out_dir"]
