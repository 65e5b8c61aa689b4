"""Tools for the project's own engineers: fuzzers and their corpora,
benchmarks, the reference helper's profile.
"""
