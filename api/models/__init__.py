"""/v1/models: the base models an admin registered, and the caller's fine-tuned models."""
