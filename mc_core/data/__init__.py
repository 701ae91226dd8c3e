"""Dialogue datasets: the schema, the synthetic world, the MT-GQA / MT-VQA-v2 builders and what
they share (``assemble``), your own dialogues from a saved folder (``dataset``) and the one
image conversion (``images``).

Submodules are imported on use (``from mc_core.data import synthetic``): importing the package
stays cheap and pulls in neither ``datasets`` nor the real builders.
"""
