"""Package layout: the repository keeps `models/` and `pallas_kernels/` at its top, but they
install only inside the jaxdec namespace (jaxdec.models, jaxdec.pallas_kernels), so no
top-level `models` package reaches site-packages and collides with a user's own."""

from setuptools import find_packages, setup

_MAPPED = {"jaxdec.models": "models", "jaxdec.pallas_kernels": "pallas_kernels"}


def _packages():
    packages = find_packages(include=["jaxdec", "jaxdec.*"])
    for name, folder in _MAPPED.items():
        packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]
    return packages


setup(packages=_packages(), package_dir={"jaxdec": "jaxdec", **_MAPPED})
