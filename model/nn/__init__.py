"""PT-RAG networks: encoders, refiner (Gumbel top-k selection), set generator and the PT-RAG module."""

from model.nn.batch import Batch
from model.nn.encoder import CellEncoder, GeneMLP
from model.nn.generator import CandidateTokens, SetGenerator
from model.nn.ptrag import PTRAG, VARIANTS, PTRAGConfig
from model.nn.refiner import Refiner, first_k, gumbel_topk

__all__ = [
    "PTRAG",
    "VARIANTS",
    "Batch",
    "CandidateTokens",
    "CellEncoder",
    "GeneMLP",
    "PTRAGConfig",
    "Refiner",
    "SetGenerator",
    "first_k",
    "gumbel_topk",
]
