"""Recipes: the typed sections (args.py) and the YAML loader (config.py)."""
