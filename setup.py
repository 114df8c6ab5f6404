"""alignx: multilingual representation alignment for causal LMs (AlignX), on DeepSpeed ZeRO with fused Triton kernels.

The top-level folder ``kernels/`` is installed as ``alignx.kernels`` (never as a top-level ``kernels`` module,
which is the import name of Hugging Face's ``kernels`` package that transformers probes).
"""

from setuptools import find_packages, setup

setup(
    name="alignx",
    version="0.1.0",
    description="Multilingual representation alignment (AlignX) trainer with fused Triton kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["alignx", "alignx.*"]) + ["alignx.kernels"],
    package_dir={"alignx.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0",
        "deepspeed>=0.16",
        "transformers>=4.45",
        "datasets",
        "PyYAML",
        "tqdm",
        "numpy",
    ],
    # pip install -c constraints.txt --no-build-isolation -e ".[gpu]" on a CUDA machine, after the CUDA torch 2.13.0:
    # FlashAttention-2 for training (model.attn_implementation auto) and the peer kernels the GPU benchmarks compare
    # with (README, "GPU"). The CPU install (make install) does not use them.
    extras_require={
        "gpu": [
            "flash-attn>=2.6",
            "liger-kernel>=0.5",
            "inf-cl>=1.2",
            "cut-cross-entropy>=25.1",
            "memeff>=0.3",
        ]
    },
    entry_points={"console_scripts": ["alignx=alignx.cli:main"]},
)
