"""Dialogue datasets: the schema, the synthetic world and the MT-GQA / MT-VQA-v2 builders.

Submodules are imported on use (``from mc_core.data import synthetic``): importing the package
stays cheap and pulls in neither ``datasets`` nor the real builders.
"""
