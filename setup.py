"""dsp_fast: a fast, faithful trainer for DSP (Dual Soft-Paste) domain adaptation.

`kernels/` and `pipelines/` sit at the top of the repository (docs/layout.md) but install as `dsp_fast.kernels` and
`dsp_fast.pipelines`: bare top-level names `kernels` / `pipelines` collide with existing PyPI packages.
"""

from setuptools import setup

setup(
    name="dsp_fast",
    version="0.1.0",
    description="Fast, faithful DSP (Dual Soft-Paste) unsupervised domain adaptation for semantic segmentation",
    python_requires=">=3.10",
    packages=["dsp_fast", "dsp_fast.config", "dsp_fast.data", "dsp_fast.models", "dsp_fast.kernels",
              "dsp_fast.pipelines", "dsp_fast.engine", "dsp_fast.reference"],
    package_dir={"dsp_fast.kernels": "kernels", "dsp_fast.pipelines": "pipelines"},
    package_data={"dsp_fast": ["configs/*.yaml"]},  # the presets, found by name from any folder
    install_requires=["torch>=2.4", "numpy>=1.24", "pillow>=10", "pyyaml>=6", "tqdm>=4.60"],
    extras_require={
        "gpu": ["triton>=3.0", "nvidia-dali-cuda130>=1.40"],
        "plot": ["matplotlib>=3.7"],  # python -m dsp_fast.ablate's chart
        "test": ["pytest>=8", "pytest-benchmark>=4", "matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],  # fast.tensorboard: scalars beside metrics.jsonl when installed
    },
)
