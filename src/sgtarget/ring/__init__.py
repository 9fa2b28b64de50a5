"""TCMU-compatible command rings to backstores in their own processes (see abi.py onwards).

The full design note is filled in below as the package lands.
"""
