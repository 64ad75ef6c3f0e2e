"""The command-line programs, installed as console scripts (see ``pyproject.toml``)."""
