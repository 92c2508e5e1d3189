"""Build script: pure-Python by default; the optional CUDA extension is added by csrc/ when it can be built."""
from setuptools import setup

setup()
