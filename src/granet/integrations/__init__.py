"""Integrations with training frameworks; each submodule needs its framework installed.

* :mod:`granet.integrations.lightning` — ``SparsityCallback`` for Lightning's ``Trainer``
  (``pip install -c constraints.txt -e ".[lightning]"``).
* :mod:`granet.integrations.hf` — ``SparsityCallback`` for Hugging Face's ``Trainer``
  (``pip install -c constraints.txt -e ".[hf]"``).

Importing this package imports neither framework.
"""
