"""pyvmm benchmarks: `python -m benches [names...] [--reps N]` (see README.md)."""
