"""Experiments that use the engine but are not part of the service (ablations, paper reproduction)."""
