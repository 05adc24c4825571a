"""The HTTP transport: FastAPI routes over the inference core (see `app.create_app`)."""
