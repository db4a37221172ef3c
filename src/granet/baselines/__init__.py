"""Baselines outside the during-training engine: pruning at initialisation (SNIP, GraSP, SynFlow)
and lottery tickets (iterative magnitude pruning with rewinding)."""
