"""Development tools that a user's install does not need: the benchmarks and the GPU kit. Each runs from the
repository's root as `PYTHONPATH=scripts python -m dev.<tool>` (scripts/ holds the dev kit they share with the
tests); the tests import them through tests/pytest.ini's pythonpath."""
