"""GeoChat's vision side computed by the project itself: preprocessing, the CLIP tower read from
an mmproj GGUF, the MLP projector, and the libmtmd self-test that decides whether a llama.cpp
build may encode images instead (core/vision/*; imports numpy, gguf, torch lazily)."""
