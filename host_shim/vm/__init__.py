"""QEMU lifecycle: QMP-driven VMs, child processes and the reaper that ends
them, the test guest.
"""
