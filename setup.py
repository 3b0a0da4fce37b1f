from pathlib import Path

from setuptools import find_packages, setup

DEMO = ["scikit-image>=0.22", "gradio>=6.31,<7"]
TEST = [
    *DEMO,
    "pytest>=8",
    "pytest-xdist>=3.5",  # the README's test command runs two workers
    "parameterized>=0.9",  # transformers' common model tests
    "timm>=1.0.9",  # the export tests load exported encoders into timm
    "selenium>=4.20,<5",  # drives headless Chromium in the demo's browser test
]

setup(
    name="sgmae",
    version="0.1.0",
    description="Self-Guided Masked Autoencoder (SG-MAE) for Hugging Face Transformers",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["modeling_sgmae", "sgmae_training", "sgmae_training.*"]),
    package_data={"sgmae_training": ["metrics/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "transformers>=5.20,<6",  # strict configs with type_validators; 5.12 fails the config and ViTMAE tests
        "accelerate>=1.10,<2",
        "datasets>=4,<6",
        "evaluate>=0.4.6,<0.5",
        "safetensors>=0.4",
        "huggingface_hub>=1.0",
        "pillow>=10",
        "tqdm>=4.66",
        "pyyaml>=6",
        "matplotlib>=3.8",  # mask panels with column titles, written by every pre-training run
        "torchmetrics>=1.4",  # COCO box and mask AP (run_detection.py)
        "pycocotools>=2.0.7",  # its backend, and COCO polygons / RLE
        "scipy>=1.10",  # transformers' Hungarian matcher (DETR family)
    ],
    extras_require={
        # The README's first command: the demo pre-training (scikit-image's photos) and its page (app.py)
        "demo": DEMO,
        "tensorboard": ["tensorboard>=2.15"],
        # The README's test command: the tests, the demo's own included
        "test": TEST,
        # Everything, for CI and contributors: tests, the linter, the TensorBoard tracker
        "dev": [*TEST, "ruff>=0.6", "tensorboard>=2.15"],
    },
)
