"""Packaging for lisa_dist.

torch carries a lower bound only: users install the CUDA build that matches their cluster. The Makefile installs
this machine's CPU wheel before anything else so that pip never pulls a CUDA build here.
"""
from setuptools import find_packages, setup

EXTRAS = {
    "deepspeed": ["deepspeed>=0.15"],
    "mpi": ["mpi4py>=3.1"],
    # torchao: int8/NF4 frozen layers and 8-bit Adam (its wheel depends on no torch build).
    "quant": ["torchao>=0.12"],
    # Liger's fused linear cross-entropy for train.loss=chunked on CUDA.
    "liger": ["liger-kernel>=0.5"],
    # bitsandbytes: the QLoRA row of make bench (peft on a 4-bit base); scipy: the quality study's t-tests.
    "bench": ["matplotlib>=3.7", "badam>=1.2", "psutil>=5.9", "bitsandbytes>=0.45", "scipy>=1.10"],
    # Metrics trackers beside the JSONL file: logging.tensorboard, logging.wandb. wandb 0.30 is the first whose
    # login can be asked without an interactive prompt (wandb.login(prompt=False)).
    "tensorboard": ["tensorboard>=2.14"],
    "wandb": ["wandb>=0.30"],
    "test": ["pytest>=7.4", "pytest-timeout>=2.2", "ruff>=0.5", "psutil>=5.9", "scipy>=1.10", "mpich>=4.1",
             "tensorboard>=2.14", "wandb>=0.30"],
}
EXTRAS["all"] = sorted({req for name in ("deepspeed", "mpi", "quant", "bench") for req in EXTRAS[name]})

setup(
    name="lisa_dist",
    version="0.1.0",
    description="Distributed LISA (Layerwise Importance Sampled AdamW) fine-tuning for large language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lisa_dist", "lisa_dist.*"]),
    package_data={"lisa_dist": ["assets/*"]},
    install_requires=[
        # The oldest versions whose sources every private or recent API lisa_dist uses was checked against
        # (docs/internals.md): torch 2.11 and transformers 5.17, what the lent GPU machines run.
        "torch>=2.11",
        "transformers>=5.17",
        "datasets>=4.0",
        "safetensors>=0.4",
        "accelerate>=1.15",
        "peft>=0.11",
        "gguf>=0.10",
        "pyyaml>=6.0",
        "tqdm>=4.66",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lisa-dist=lisa_dist.cli:main"]},
)
