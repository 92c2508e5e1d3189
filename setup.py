"""Build script: metadata lives in pyproject.toml; this only adds the optional CUDA extension fip_fast._C.

csrc/setup_ext.py decides (FIP_FAST_BUILD_CUDA=1 forces it, =0 forbids it, unset: built when torch has CUDA and a
matching toolkit is found); see csrc/README.md.
"""
import importlib.util
import os

from setuptools import setup

_spec = importlib.util.spec_from_file_location(
    "_fip_fast_setup_ext", os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "setup_ext.py"))
_setup_ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_setup_ext)

setup(**_setup_ext.build_kwargs())
