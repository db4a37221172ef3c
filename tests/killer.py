"""Run ``granet`` and SIGKILL the process at a chosen moment of the end-of-epoch writes (test helper).

    python tests/killer.py MOMENT EPOCH granet-args...

MOMENT is one of
    checkpoint_tmp     the epoch's checkpoint.pt.tmp is written but not yet renamed
    after_checkpoint   checkpoint.pt was just renamed (model.pt and the metrics line not written yet)
    model_tmp          a model.pt.tmp is written but not renamed (first one at or after EPOCH)
    after_metrics      the epoch's metrics line was just appended
    kept_tmp           the copy checkpoint_epochEPOCH.pt.tmp (--keep-checkpoints) is written but not renamed
The process dies like a power cut: no handler, no cleanup.
"""
import os
import signal
import sys

from granet.cli import main
from granet.train import loop

MOMENT, EPOCH = sys.argv[1], int(sys.argv[2])
_replace = os.replace
_append = loop.append_metrics
_checkpoints = 0


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patched_replace(src, dst):
    global _checkpoints
    name = os.path.basename(str(dst))
    if name == "checkpoint.pt":
        if MOMENT == "checkpoint_tmp" and _checkpoints + 1 == EPOCH:
            _die()
        _replace(src, dst)
        _checkpoints += 1
        if MOMENT == "after_checkpoint" and _checkpoints == EPOCH:
            _die()
        return
    if name == "model.pt" and MOMENT == "model_tmp" and _checkpoints >= EPOCH:
        _die()
    if name == f"checkpoint_epoch{EPOCH}.pt" and MOMENT == "kept_tmp":
        _die()
    _replace(src, dst)


def _patched_append(path, record):
    _append(path, record)
    if MOMENT == "after_metrics" and record.epoch == EPOCH:
        _die()


os.replace = _patched_replace
loop.append_metrics = _patched_append
sys.exit(main(sys.argv[3:]))
