"""Inference backends behind one interface (llama.cpp, transformers, OpenAI-compatible HTTP)."""
