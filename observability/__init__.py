"""Logging (and, later, metrics and tracing) set-up shared by the app and its middleware."""
