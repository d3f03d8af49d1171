"""Only the optional C scanner lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler (or Python headers) the build carries on, and
pgmux runs the same scan in Python (proxy/protocol/stream.py, scan_backend_py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy.protocol._scan",
            sources=["proxy/protocol/_scan.c"],
            optional=True,
        )
    ]
)
