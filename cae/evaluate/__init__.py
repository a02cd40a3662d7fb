"""Counterfactual evaluation: the field's hold-out protocol, baselines, metrics and report.

``cae evaluate`` runs it; :func:`cae.evaluate.run.run_evaluation` is the same from Python.
"""
