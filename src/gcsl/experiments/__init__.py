"""Experiments: methods x seeds through every stage, reports, plots and the quickstart."""
