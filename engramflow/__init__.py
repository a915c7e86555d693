"""engramflow: rewrite facts inside language models at scale, with an auditable edit history."""

__version__ = "0.1.0"
