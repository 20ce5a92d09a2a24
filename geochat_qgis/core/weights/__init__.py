"""Model weights: catalog, downloads, GeoChat conversion, GGUF writing, tiny test models."""
