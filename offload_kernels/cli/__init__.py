"""The ``offload-kernels`` command line: demo, plan, bench, info, run."""
