"""Fast exact top-k selection and the per-layer CPU threads of a topology update, with optional native kernels.

The lowest layer of the library: plain tensor functions that know nothing of sparsifiers, masks or
processes (:mod:`.topk`, :mod:`.layer_threads`, :mod:`.native` and its C source ``_native.c``).
"""
