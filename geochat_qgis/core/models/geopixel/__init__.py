"""GeoPixel (InternLM-XComposer-2.5 + SAM-2) computed by the project itself, in torch."""
