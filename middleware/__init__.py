"""Pure-ASGI middleware, one concern per module, assembled in vault.app.create_app."""
