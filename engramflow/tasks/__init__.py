"""Thin Prefect tasks over `editors/` and `storage/`: load inputs from the store, call, save.

Tasks exchange ids and store keys, never tensors, so Ray moves only small values between workers.
"""
