"""Build the C half of wakegate's hot path; everything else lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "proxy._speedups",
            sources=["proxy/_speedups.c", "proxy/_warm.c", "proxy/_access.c"], depends=["proxy/_speedups.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Werror=implicit-function-declaration"],
        )
    ]
)
