"""Datasets (synthetic, NYUD-v2, PASCAL-Context), the shared datamodule and joint transforms."""
