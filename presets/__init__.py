"""Shipped YAML presets (one file per model x resolution); read through sparge.presets."""
