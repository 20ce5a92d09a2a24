"""Model families: prompt builders, preprocessing specs and output parsers per model."""
