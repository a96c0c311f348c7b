"""Benchmarks, side by side in one process (ratios, not absolute times): one module per suite,
each returning its rows and writing run.json (and its JSON) into the options' folder.

throughput, early_exit, capture, vllm_vs_native (the engines); sim_speed, fidelity, validation
(the simulator).
"""
