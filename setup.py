"""Build script: metadata lives in pyproject.toml; this file maps kernels/ to adfast.kernels."""
from setuptools import setup

setup(
    packages=["adfast", "adfast.kernels"],
    package_dir={"adfast": "adfast", "adfast.kernels": "kernels"},
)
