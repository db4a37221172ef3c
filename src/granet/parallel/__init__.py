"""Collectives for sparsity across processes that know nothing of sparsifiers.

:mod:`.mask_sync` broadcasts and verifies masks across the ranks of a job; :mod:`.sharded_topk`
solves exact top-k problems over tensors split by rows across ranks (FSDP2). The sparsifier's
process layouts built on them are in :mod:`granet.sparsity.layouts`.
"""
