"""The GeoChat core: tiling, georeferencing, model families, backends, merging and export.

Nothing below this package imports qgis or Qt; the command line, the Processing algorithms and
the dock all call it. Heavy libraries (torch, transformers, llama_cpp) are imported lazily by the
backend that needs them.
"""
