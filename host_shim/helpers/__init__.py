"""The migration helpers as the host drives them: helper VMs and their memory,
the mailbox client, the fw_cfg request, transport keys, and the reference
and host-built backends.
"""
