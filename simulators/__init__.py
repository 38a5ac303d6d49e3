"""Simulators of mobile units, lab analyzers and modalities."""
