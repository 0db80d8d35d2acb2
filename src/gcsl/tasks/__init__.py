"""Evaluation tasks: loaders, scorers and metrics, one module per task."""
