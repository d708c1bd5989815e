"""Pallas kernels with jnp references (installed as jaxdec.pallas_kernels).

Each kernel is a folder: `reference.py` (the readable jnp oracle), `gpu.py` (Triton-lowered
Pallas), `tpu.py` (Mosaic TPU Pallas) and an `__init__` that dispatches by backend.

  tree_attention  decode, chain and tree verification attention over the KV cache
"""
