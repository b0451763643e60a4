"""PT-RAG retrieval service: a perturbation vector store (FAISS index + profile cache).

Knows nothing of AnnData, torch or cell biology beyond "an entry has an id, a key vector, a cell type and
arrays attached", so it can be deployed and scaled on its own.
"""
