"""Pictures of what a model computes: attention maps (attention.py) and position encodings (positions.py)."""
