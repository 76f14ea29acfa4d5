"""LLM2CLIP: a caption-contrastively tuned language model as the text tower, via an adapter."""
