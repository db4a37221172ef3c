"""Test-session settings: under pytest-xdist each worker gets one torch thread, so the workers
share the machine's cores instead of oversubscribing them."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
