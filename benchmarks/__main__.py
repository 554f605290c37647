"""``python -m benchmarks [--no-gemm] [--threads N]``: this machine's CPU, ISA flags and measured GEMM peak, as JSON."""
import sys

from benchmarks._harness import main

if __name__ == "__main__":
    sys.exit(main())
