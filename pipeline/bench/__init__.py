"""Benchmarks behind ``invsort bench``: invsort against its peers (model only, naive loop, Ray Data) and the
catalog upsert benchmark. The top of ``pipeline/``: it may import any layer and the job service.
"""
