"""Fuzzers for every file lutengine reads (issue 31): `python -m tests.fuzz.run --help`."""
