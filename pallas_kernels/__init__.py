"""Pallas kernels with jnp references (installed as jaxdec.pallas_kernels)."""
