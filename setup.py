"""ppow_jax: speculative-decoding drafters for JAX, trained token-level and with window-level RL."""

from setuptools import find_packages, setup

# jax, jaxlib, flax, optax, orbax-checkpoint and chex are pinned together: these versions are
# tested together here (CPython 3.11, CPU) and all ship wheels for CPython 3.12.
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "chex==0.1.92",
    "ml-collections==1.1.0",
    "numpy>=2.0,<3",
    "gguf==0.19.0",
    "tokenizers==0.23.3",
    "safetensors==0.8.0",
    "jinja2>=3.1,<4",
    "tqdm>=4.66",
    "matplotlib==3.10.7",  # eval plots
    "grain==0.2.18",  # input pipeline
    "array-record==0.8.6",  # self-distillation and feature caches
    "tensorboardX==2.6.4",  # training logs TensorBoard reads (no TensorFlow)
]

EXTRAS = {
    # Peer conformance tests compare against Hugging Face transformers on the CPU build of torch.
    # pytest-xdist runs the test files on two workers (CI has 2 cores).
    "test": ["pytest==9.0.3", "pytest-xdist==3.8.0", "hypothesis>=6.100", "scipy==1.16.3", "torch==2.13.0",
             "transformers==5.23.0", "accelerate==1.15.0"],  # transformers needs accelerate to load GGUF files
    "bench": ["torch==2.13.0", "transformers==5.23.0", "accelerate==1.15.0"],
    # Optional data source for datasets a user already prepared with TFDS (no TensorFlow needed).
    "tfds": ["tensorflow-datasets>=4.9"],
}

setup(
    name="ppow_jax",
    version="0.1.0",
    description=__doc__,
    packages=find_packages(include=["ppow_jax", "ppow_jax.*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
)
