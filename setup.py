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
    install_requires=["torch>=2.4", "numpy", "tqdm", "transformers>=4.46"],
    extras_require={
        "triton": ["triton>=3.1"],
        "test": ["pytest>=8", "triton>=3.1", "trl>=0.19"],
        "bench": ["pytest-benchmark>=4", "matplotlib", "liger-kernel>=0.5", "trl>=0.19", "psutil"],
        "gpu": ["flash-attn>=2.6"],
        "dev": ["ruff>=0.6"],
    },
    entry_points={"console_scripts": ["vcrd=vcrd.app.cli:main"]},
)
