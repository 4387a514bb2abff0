"""Retrieval over a gallery of student image embeddings: a faiss index folder (``index``) and the local search page
(``app``, FastAPI). See docs/export.md."""
