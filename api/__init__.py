"""PT-RAG surfaces: the ``ptrag`` CLI, the REST API and the batch client."""
