"""ebpf-sticky against the routers users would use instead, side by side in one run.

Every router fronts the very same worker program, the same load generator hits each in interleaved
rounds, and every figure is a median over rounds; ratios are medians of per-round ratios. Run as
``python -m bench`` from the repository (root: BPF), or through ``scripts/bench``, which also sets
up the venvs. The parts: ``main`` (options), ``machine`` (the tree measured, the machine's load,
the C tools), ``common`` (settings, processes, CPU), ``routers``, ``workloads/*`` (one module per
workload), ``stats`` (pure arithmetic), ``profiles`` (py-spy), ``levers`` (A/B of one server
setting), ``report`` and ``plots``, ``kernel_figures`` (program cost, hash). The load
generators and Node.js workers are in ``native/``, the Python workers in ``apps/``.
"""
