"""Development tools that a user's install does not need: the dev kit the tests share (devkit), the benchmarks, the
GPU kit and the batch client's benchmarks. Each runs from the repository's root as
`PYTHONPATH=scripts python -m dev.<tool>` (scripts/ holds the client they drive); the tests import them through
tests/pytest.ini's pythonpath."""
