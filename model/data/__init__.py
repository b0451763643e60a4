"""Data layer: reading Perturb-seq AnnData, preprocessing, profiles, splits and gene embeddings."""

from model.data.data_embedding import data_derived_embeddings, fit_ridge_map, impute_missing_embeddings
from model.data.gene_text import embed_gene_texts, load_gene_texts
from model.data.simulator import SimulatorConfig, simulate, simulate_to_h5ad

__all__ = [
    "SimulatorConfig",
    "data_derived_embeddings",
    "embed_gene_texts",
    "fit_ridge_map",
    "impute_missing_embeddings",
    "load_gene_texts",
    "simulate",
    "simulate_to_h5ad",
]
