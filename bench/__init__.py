"""The benchmark suite of issue #7 (`python bench/run.py`, `make bench`): speed as ratios measured in one run."""
