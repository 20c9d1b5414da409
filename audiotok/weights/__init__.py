"""Weights: checkpoint formats (audiotok, transformers, descript ``.pth``), resolving a
``from_pretrained`` source, and the bundled ``pretrained/`` models."""
