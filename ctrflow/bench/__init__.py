"""Benchmark helpers: the open-loop load generator for the serving layer (`ctrflow bench serve`)."""
from ctrflow.bench.loadgen import LoadOptions, LoadReport, LoadResult, arrival_times, latency_summary, run_load

__all__ = ["LoadOptions", "LoadReport", "LoadResult", "arrival_times", "latency_summary", "run_load"]
