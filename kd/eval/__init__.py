"""Evaluation of trained models on held-out tasks (STS Benchmark for sentence encoders)."""

from kd.eval import sts

__all__ = ['sts']
