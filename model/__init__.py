"""PT-RAG science: data, splits, simulator, networks, training and evaluation."""
