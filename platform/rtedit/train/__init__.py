"""Training library: Parquet data, the toy editing world, typed job configs and Ray-free runtime helpers.

Nothing here imports Ray; the Ray Train entrypoints live in jobs/.
"""
