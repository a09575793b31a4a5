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
    "tiktoken>=0.8",
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
    # experiments/ is installed too: its modules are the console scripts below (run from any directory).
    packages=find_packages(include=["canon_jax", "canon_jax.*", "pallas_kernels", "pallas_kernels.*", "experiments"])
    + ["canon_jax.configs"],
    # The YAML presets (configs/) ship inside the package as canon_jax/configs, where an installed canon_jax finds
    # them (canon_jax.train.config.CONFIGS_ROOT); a source checkout reads configs/ directly.
    package_dir={"canon_jax.configs": "configs"},
    package_data={
        "canon_jax.data": ["assets/NOTICE.md", "assets/capo_fields/*.txt", "assets/lano_cfgs/*.json"],
        "canon_jax": ["aot_targets/*.txtpb", "aot_targets/NOTICE.md"],
        "canon_jax.configs": ["*.yaml", "*/*.yaml", "*/*/*.yaml", "*/*/*/*.yaml"],
    },
    include_package_data=True,
    entry_points={
        "console_scripts": [
            "canon-train = experiments.train:cli",
            "canon-sweep = experiments.sweep:main",
            "canon-plot = experiments.plot:main",
            "canon-export = experiments.export:main",
            "canon-compile = experiments.compile:main",
            "canon-demo = experiments.demo:main",
            "canon-data = canon_jax.data.cli:main",
        ]
    },
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # lm-evaluation-harness for the canon-jax benchmark adapter (no torch; ~30 s / ~300 MB to install, so the
        # test extra includes it and CI runs the harness tests)
        "eval": ["lm_eval>=0.4.13"],
        # ruff is pinned: .ci/run checks the formatting, which changes between ruff releases
        "test": ["pytest>=8", "pytest-xdist>=3.5", "scipy>=1.11", "lm_eval>=0.4.13", "ruff==0.17.6"],
        "torch": ["torch>=2.2"],
        # deviceless compilation for TPU and GPU targets (canon_jax.aot, tests/compile): versions must equal jax's;
        # cuDNN (the range jax-cuda12-plugin's with-cuda extra asks for) to compile cuDNN flash attention
        "aot": [
            "libtpu==0.0.42.1",
            "jax-cuda12-plugin==0.10.2",
            "jax-cuda12-pjrt==0.10.2",
            "nvidia-cuda-nvcc-cu12==12.9.86",
            "nvidia-cudnn-cu12>=9.8,<10",
        ],
        # the TensorBoard viewer for the events every run writes (tensorboardX above only writes them)
        "tb": ["tensorboard>=2.15"],
    },
)
