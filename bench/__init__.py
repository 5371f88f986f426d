"""The benchmark suite (pytest-benchmark): `python3 -m pytest bench/ -m gpu` on a GPU machine.

A package so that its modules import as ``bench.*`` and never collide with ``tests/`` files of
the same name when both are collected; nothing in ``bullet_kernels`` imports it.
"""
