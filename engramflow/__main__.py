"""`python -m engramflow` = the `engramflow` command."""

from engramflow.cli import app

app(prog_name="engramflow")
