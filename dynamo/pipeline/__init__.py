"""The one package that ties dynamo's core, the analyses and the figures together; nothing else imports it."""

__all__ = ["analyze", "arguments", "cli", "cluster", "concepts", "fit", "ladder", "phases", "profile", "registry",
           "study", "summaries"]
