"""Benchmarks (not part of the installed package). Run them as scripts: `python3 bench/decode.py`."""
