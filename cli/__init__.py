"""The ``morph`` command line, installed as ``morph.cli`` (see pyproject.toml)."""
