"""The one package that ties dynamo's core, the analyses and the figures together.

The analysis registry (`registry`), ``analyze``, ``profile``, ``study`` (comparisons across
models) and the command line (`cli`). Nothing in the core, the analyses or the figures imports it.
"""
