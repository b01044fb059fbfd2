from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

GRADIO = "gradio>=6,<7"  # scripts/app.py's page

setup(
    name="rear",
    version="0.1.0",
    description="reAR: visual autoregressive generation with generator-tokenizer consistency regularisation",
    python_requires=">=3.10",
    license="Apache-2.0",
    packages=find_packages(include=["modeling", "modeling.*", "utils", "utils.*", "evaluator", "evaluator.*"]),
    install_requires=requirements,
    extras_require={
        "test": ["pytest>=7", "wandb", GRADIO, "playwright>=1.40"],  # playwright drives the system's Chromium
        "app": [GRADIO],
        "wandb": ["wandb"],
        "swanlab": ["swanlab"],
    },
)
