"""The transformers modeling file that a structured export ships (trust_remote_code)."""
