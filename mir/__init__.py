"""GenIR: mental image retrieval with generative visual feedback (text-only and prediction-feedback baselines)."""
