from setuptools import setup

setup(cffi_modules=["lutkernels/_build.py:ffibuilder"])
