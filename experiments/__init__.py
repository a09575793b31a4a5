"""Runnable entry points: training, sweeps, benchmarks, plots."""
