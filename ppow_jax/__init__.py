"""ppow_jax: speculative-decoding drafters for JAX, trained token-level and with window-level RL."""

__version__ = "0.1.0"
