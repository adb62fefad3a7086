"""Language models for policygrad: the embedded offline default (SmolLM2-135M-Instruct) and any HF causal LM."""
