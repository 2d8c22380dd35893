"""The one package that ties dynamo's core, the analyses and the figures together.

The analysis registry (`registry`), ``analyze``, ``profile``, ``study`` (comparisons across
models) and the command line (`cli`, whose parser imports nothing heavy). Nothing in the core,
the analyses or the figures imports it.
"""

__all__ = ["analyze", "arguments", "cli", "cluster", "concepts", "fit", "ladder", "phases", "profile", "registry",
           "study", "summaries"]
