"""The transfer pipeline: the container that carries helper streams, and
export/import of a RAM file through helpers.
"""
