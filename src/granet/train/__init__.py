"""Training runs behind ``granet train``: config, runtime, checkpoints, the loop, and the run itself.

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
from .config import TrainConfig, load_config
from .run import config_for_resume, default_out_dir, evaluate_run, resume_point, train
from .runtime import lr_factor

__all__ = ["TrainConfig", "ConfigError", "train", "evaluate_run", "load_config", "config_for_resume", "resume_point", "lr_factor",
           "default_out_dir"]
