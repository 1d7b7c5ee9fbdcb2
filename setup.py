"""Packaging for blockswap-plugin.

Install with ``tools/install.sh``, which also builds mmcv with its ops; a plain
``pip install -e .`` installs only this package and its pure-Python needs.
"""
from setuptools import find_packages, setup

setup(
    name="blockswap-plugin",
    version="0.1.0",
    description="BlockSwap network compression (Turner et al., ICLR 2020) as a timm and mmdetection plugin",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["blockswap_plugin", "blockswap_plugin.*"]),
    # The C++ source of the fused scoring kernel, compiled on first use.
    package_data={"blockswap_plugin.core": ["csrc/*.cpp", "csrc/*.h"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.0", "tqdm"],
    extras_require={
        "timm": ["timm>=1.0.20", "pyyaml"],
        "mmdet": ["mmengine>=0.10,<0.11", "mmdet==3.3.0", "mmcv>=2.0.0rc4,<2.2.0"],
    },
    entry_points={"console_scripts": ["blockswap=blockswap_plugin.cli:main"]},
)
