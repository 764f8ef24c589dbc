"""Analyses over a store: kNN graphs, clustering, embeddings."""
