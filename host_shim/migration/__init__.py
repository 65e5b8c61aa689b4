"""Live migration: the source role, the target role, the control protocol
between them, the guest description and the guest VM both roles share.
"""
