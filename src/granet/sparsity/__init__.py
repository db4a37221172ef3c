"""The sparsity core: configuration, schedules, criteria, masks, the update policy and the sparsifier.

:mod:`.sparsifier` owns the masks (:mod:`.masking`), an update policy (:mod:`.updater`, whose
steps are in :mod:`.topology`) and a process layout (:mod:`.layouts`; FSDP2 shards in
:mod:`.fsdp_layout`). :mod:`.structure` holds structured sparsity (N:M, constant fan-in): the
exact per-group and per-row selections that the update policy uses when ``SparsityConfig.structure``
is set. It depends only on :mod:`granet.kernels`, :mod:`granet.parallel` and the
foundation modules (:mod:`granet.errors`, :mod:`granet.registry`).
"""
