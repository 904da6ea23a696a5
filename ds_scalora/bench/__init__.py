"""Layer 4: the benchmark behind tools/benchmark.py (methods x tasks x learning rates x seeds, cost, report)."""
