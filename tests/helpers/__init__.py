"""Helpers the tests share: running the CLI as a user does, reading W&B offline records."""
