"""Many runs at once: resumable parallel sweeps and the pruning-plasticity study."""
