"""Discrete-event simulator: SimPy replay of exit traces on the shared scheduler (DESIGN §7)."""
