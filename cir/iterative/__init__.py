"""Iterative composed image retrieval: each round mines hard negatives with the current model, asks a foundation
model to write modification texts that make them positives, and trains on original + augmented triplets."""
