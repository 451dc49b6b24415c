"""Package discovery for morph's layout: three source folders, one import package.

``morph/`` is the package ``morph``; the top-level ``cli/`` and ``recipes/`` folders are installed as its
subpackages ``morph.cli`` and ``morph.recipes`` (so that no generic top-level ``cli`` or ``recipes`` module
lands in users' site-packages). Every subpackage below each folder (any folder with an ``__init__.py``) is
found here, so a new one cannot be left out of the wheel; ``tests/test_packaging.py`` checks the built
wheel against the source tree. Everything else (metadata, dependencies, package data) is in pyproject.toml.
"""

from setuptools import find_packages, setup

# import package -> source folder
ROOTS = {"morph": "morph", "morph.cli": "cli", "morph.recipes": "recipes"}


def discover() -> list[str]:
    """``morph``, ``morph.cli``, ``morph.recipes`` and every package below their folders."""
    packages = []
    for name, folder in ROOTS.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return sorted(set(packages))


setup(packages=discover(), package_dir=ROOTS)
