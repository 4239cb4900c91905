"""Batch inference on Heroku Managed Inference: submit, track and report chat-completion jobs."""
