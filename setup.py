"""canon-jax: Canon layers (Physics of Language Models, Part 4.1) in JAX/Flax, with Pallas kernels."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "grain>=0.2.18",
    "chex>=0.1.92",
    "safetensors>=0.4",
    "numpy>=1.26",
    # experiments: YAML configs with typed dataclasses and dotted overrides, progress bar, TensorBoard, plots,
    # real-text tokenisation and Parquet input.
    "omegaconf>=2.3",
    "pyyaml>=6.0",
    "tqdm>=4.66",
    "tensorboardX>=2.6",
    "matplotlib>=3.8",
    "tokenizers>=0.19",
    "pyarrow>=15",
]

setup(
    name="canon-jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of Canon layers (Physics of Language Models: Part 4.1) with Pallas kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["canon_jax", "canon_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    package_data={"canon_jax.data": ["assets/NOTICE.md", "assets/capo_fields/*.txt", "assets/lano_cfgs/*.json"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # lm-evaluation-harness for the canon-jax benchmark adapter (no torch; ~30 s / ~300 MB to install, so the
        # test extra includes it and CI runs the harness tests)
        "eval": ["lm_eval>=0.4.13"],
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "lm_eval>=0.4.13"],
        "torch": ["torch>=2.2"],
    },
)
