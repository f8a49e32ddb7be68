"""The Hydra configs, shipped as package data so the console scripts find them when installed.

Only what differs from the dataclass defaults (``dblocks/config.py``) is written here: the defaults
list, the output directory and the experiments. ``worker/config.py`` registers the schema and the
``model`` / ``data`` / ``blocks`` group options with Hydra's ConfigStore.
"""
