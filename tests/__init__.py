"""pyvmm's tests.  A package, so that tests/framework is `tests.framework` both
under pytest (which puts the repository root on sys.path for a package's
conftest) and for `python -m benches` run from the repository root."""
