"""The firmware: stuart build, the second EDK2 tree, image inspection and
comparison, launch measurement, reproducibility, boot checks.
"""
