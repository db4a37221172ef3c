"""Integrations with training frameworks; each submodule needs its framework installed.

* :mod:`granet.integrations.lightning` — ``SparsityCallback`` for Lightning's ``Trainer``
  (``pip install granet[lightning]``).
* :mod:`granet.integrations.hf` — ``SparsityCallback`` for Hugging Face's ``Trainer``
  (``pip install granet[hf]``).

Importing this package imports neither framework.
"""
