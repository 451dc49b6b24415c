"""``python -m morph.cli``: the ``morph`` command."""

from .main import app

app(prog_name="morph")
