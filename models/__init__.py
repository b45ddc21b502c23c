"""Data-only package: the model catalog and ensemble presets (TOML), shipped inside the wheel."""
