"""Build of the optional C extension ocspmint._p11native (native/README.md).

Everything else lives in pyproject.toml. ``optional=True``: without a C
compiler or the PKCS#11 header (Debian libp11-kit-dev) the package still
installs, and signing falls back to python-pkcs11.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "ocspmint._p11native",
            sources=["native/ocspmint_p11.c"],
            include_dirs=["/usr/include/p11-kit-1"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-fvisibility=hidden"],
            libraries=["dl", "pthread"],
            optional=True,
        )
    ],
)
