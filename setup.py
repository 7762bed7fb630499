"""Package discovery: the tokenizer stage lives in the folder `RQ-VAE/` but imports as `rqvae`,
which pyproject's automatic discovery cannot express; everything else is found by name."""
from setuptools import find_packages, setup

STAGES = ["core", "retriever", "cir", "mir", "tools", "bench"]
packages = [p for p in find_packages(include=[f"{s}*" for s in STAGES])]
packages += ["rqvae"] + [f"rqvae.{p}" for p in find_packages("RQ-VAE")]

setup(packages=packages, package_dir={"rqvae": "RQ-VAE"})
