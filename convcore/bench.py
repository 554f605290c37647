"""``python -m convcore.bench`` still runs the engine benchmark, which now lives in ``benchmarks/engine.py``."""
if __name__ == "__main__":  # only as a command: importing convcore.bench must not import the benchmarks package
    import runpy

    runpy.run_module("benchmarks.engine", run_name="__main__", alter_sys=True)
