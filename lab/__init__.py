"""The multi-host lab: ebpf-sticky behind an L4 balancer, in network namespaces of its own.

`scripts/lab` runs it by hand (``up``, ``drain``, ``down``); tests/e2e/test_multihost.py builds and
removes labs of its own with the same module, ``lab.multihost``.
"""
