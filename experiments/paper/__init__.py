"""Reproduce the sDPO paper's findings in miniature: `python -m experiments.paper` (see __main__)."""
